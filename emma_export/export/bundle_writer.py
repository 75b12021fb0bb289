"""Write a bundle: every component's graph, the tokenizer and manifest.json.

Everything goes to a temporary sibling folder that is renamed into place at the end, so an
interrupted or failed export leaves nothing that looks like a bundle; a folder that is not a bundle
of ours is never replaced unasked (``out_dir``).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import onnx

from emma_runtime import names
from emma_runtime.bundle import FORMAT_VERSION, ComponentInfo, Manifest, ModelDims, TensorInfo, sha256_file

from ..components import Component, components_for, gqa_possible
from ..config import EMMAConfig
from .onnx_export import export_component
from .out_dir import check_out, replace_dir, temp_sibling
from .source import WeightSource
from .streamed_export import threshold as streamed_threshold

ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32", onnx.TensorProto.BOOL: "bool",
    onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.FLOAT8E4M3FN: "float8e4m3fn",
}


def default_attention(cfg: EMMAConfig, target: str, precision: str = "fp32", kv_cache: str = "auto") -> str:
    """The Und backbone's flavour for a target: ONNX Runtime's fused GroupQueryAttention on an ONNX
    Runtime target (the CPU; decode speed, docs/benchmarks.md) where the model's Und chunks are all
    causal; standard ONNX operators everywhere else (TensorRT parses only those). Every precision
    quantizes either flavour (captured feeds are converted, Component.from_captured). An FP8 KV cache
    (or fp16 one) is standard everywhere: the operator takes neither on ONNX Runtime's CPU provider."""
    from ..quantize.kv_cache import GQA_KV_CACHES
    from ..targets import load_target

    if kv_cache not in GQA_KV_CACHES:
        return "standard"
    return "gqa" if load_target(target).flavour == "ort" and gqa_possible(cfg) else "standard"


def model_dims(cfg: EMMAConfig) -> ModelDims:
    s = cfg.sampler
    return ModelDims(
        hidden_size=cfg.llm.hidden_size, num_layers=cfg.llm.num_hidden_layers, num_kv_heads=cfg.llm.num_key_value_heads,
        head_dim=cfg.llm.head_dim, vocab_size=cfg.llm.vocab_size, latent_channels=cfg.ae.latent_channels, cell=cfg.cell,
        und_feature_dim=cfg.vision.feature_dim, num_experts=cfg.vision.num_experts, max_context=cfg.max_context,
        reference_branch=cfg.reference_branch, default_image_size=cfg.image_size, steps=s.steps, shift=s.shift,
        cfg=s.cfg, cfg_text=s.cfg_text, cfg_image=s.cfg_image,
    )


def graph_io(path: Path) -> tuple[tuple[TensorInfo, ...], tuple[TensorInfo, ...]]:
    """IO as the graph file itself declares it (the truth the runtime will meet)."""
    m = onnx.load(str(path), load_external_data=False)
    init = {i.name for i in m.graph.initializer}

    def info(vi) -> TensorInfo:
        tt = vi.type.tensor_type
        shape = tuple(d.dim_param if d.dim_param else d.dim_value for d in tt.shape.dim)
        return TensorInfo(vi.name, ONNX_DTYPES.get(tt.elem_type, str(tt.elem_type)), shape)

    return tuple(info(v) for v in m.graph.input if v.name not in init), tuple(info(v) for v in m.graph.output)


@dataclass
class ExportReport:
    out: Path
    seconds: dict[str, float]


def export_bundle(
    source: WeightSource,
    out: str | Path,
    dtype: str = "fp32",
    target: str = "cpu",
    components: list[Component] | None = None,
    progress: bool = True,
    tokenizer_file: Path | None = None,
    overwrite: bool = False,
    tasks: tuple[str, ...] = (),
    attention: str | None = None,
) -> ExportReport:
    """``tasks``: a task-subset bundle (only the components those tasks' pipelines run, and the
    manifest says which tasks); empty: every task. ``attention``: the Und backbone's flavour (None:
    the target's, ``default_attention``)."""
    cfg = source.cfg
    out = check_out(out, "bundle", overwrite)
    tasks = tuple(dict.fromkeys(tasks))
    attention = attention or default_attention(cfg, target, dtype)
    comps = components or components_for(cfg, tasks, attention)
    tokenizer_file = tokenizer_file or source.tokenizer_file
    tmp = temp_sibling(out, "partial")
    seconds: dict[str, float] = {}
    try:
        entries: dict[str, ComponentInfo] = {}
        with _progress(progress) as bar:
            task = bar.add_task("export", total=len(comps)) if bar else None
            for comp in comps:
                if bar:
                    bar.update(task, description=f"export {comp.name}")
                t0 = time.perf_counter()
                f = tmp / f"{comp.name}.onnx"
                # past the threshold the weights are streamed from the source, never all in memory
                model = source if source.weight_bytes(comp, dtype) > streamed_threshold() else source.model_for(comp, dtype)
                export_component(comp, cfg, model, f, dtype=dtype)
                del model
                inputs, outputs = graph_io(f)
                entries[comp.name] = ComponentInfo(
                    file=f.name, sha256=sha256_file(f), inputs=inputs, outputs=outputs, precision=dtype,
                    data_files=data_files(f), profile=comp.profile(cfg), attention=getattr(comp, "attention", "standard"),
                )
                seconds[comp.name] = time.perf_counter() - t0
                if bar:
                    bar.advance(task)
        entries = share_tied_embedding(tmp, entries)
        tok_path = tmp / "tokenizer.json"
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tok_path)
        else:
            from ..tokenizer import byte_level_tokenizer

            byte_level_tokenizer(cfg.llm.vocab_size).save(str(tok_path))
        # absolute: verify finds the reference weights from any working directory
        weights = {"kind": "checkpoint", "path": str(Path(source.checkpoint).resolve())} if source.checkpoint else {"kind": "random", "seed": source.seed}
        if source.world:
            weights["world"] = source.world
        manifest = Manifest(
            format_version=FORMAT_VERSION, config_name=cfg.name, config=cfg.to_dict(), model=model_dims(cfg),
            precision=dtype, target=target, components=entries, tokenizer=(tok_path.name, sha256_file(tok_path)),
            weights=weights, tasks=tasks,
        )
        (tmp / "manifest.json").write_text(manifest.to_json())
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportReport(out, seconds)


def share_tied_embedding(folder: Path, entries: dict[str, ComponentInfo]) -> dict[str, ComponentInfo]:
    """The embedding table stored once for ``embed_tokens`` and ``lm_head`` when both hold the same
    bytes (``tied_embedding.py``); their entries get the new sha256s and data files."""
    from .tied_embedding import tie

    e, h = entries.get(names.EMBED_TOKENS), entries.get(names.LM_HEAD)
    if e is None or h is None or not tie(folder, e.file, h.file):
        return entries
    out = dict(entries)
    for name, info in ((names.EMBED_TOKENS, e), (names.LM_HEAD, h)):
        f = folder / info.file
        out[name] = replace(info, sha256=sha256_file(f), data_files=data_files(f))
    return out


def bundle_bytes(folder: Path, components) -> int:
    """Bytes the components' files take on disk, a file shared by several counted once."""
    files = {c.file for c in components} | {f for c in components for f, _ in c.data_files}
    return sum((folder / f).stat().st_size for f in files)


def data_files(graph: Path) -> tuple[tuple[str, str], ...]:
    """(name, sha256) of every external data file the graph references, relative to its folder: the
    runtime hands ONNX Runtime exactly these, so one left out here would not load."""
    m = onnx.load(str(graph), load_external_data=False)
    names: set[str] = set()
    tensors = list(m.graph.initializer)
    for node in m.graph.node:
        tensors += [a.t for a in node.attribute if a.HasField("t")]
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            names.update(e.value for e in t.external_data if e.key == "location")
    return tuple((n, sha256_file(graph.parent / n)) for n in sorted(names))


class _NoBar:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def _progress(enabled: bool):
    if not enabled:
        return _NoBar()
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description:<28}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
