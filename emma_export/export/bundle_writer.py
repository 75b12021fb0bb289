"""Write a bundle: every component's graph, the tokenizer and manifest.json.

Everything goes to a temporary sibling folder that is renamed into place at the end, so an
interrupted or failed export leaves nothing that looks like a bundle.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import onnx

from emma_runtime.bundle import FORMAT_VERSION, ComponentInfo, Manifest, ModelDims, TensorInfo, sha256_file

from ..components import Component, all_components
from ..config import EMMAConfig
from .onnx_export import export_component
from .source import WeightSource

ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32", onnx.TensorProto.BOOL: "bool",
    onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8",
}


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
) -> ExportReport:
    cfg = source.cfg
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    comps = components or all_components(cfg)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    seconds: dict[str, float] = {}
    try:
        entries: dict[str, ComponentInfo] = {}
        with _progress(progress) as bar:
            task = bar.add_task("export", total=len(comps)) if bar else None
            for comp in comps:
                if bar:
                    bar.update(task, description=f"export {comp.name}")
                t0 = time.perf_counter()
                model = source.model_for(comp, dtype)
                f = tmp / f"{comp.name}.onnx"
                export_component(comp, cfg, model, f, dtype=dtype)
                del model
                inputs, outputs = graph_io(f)
                data = tmp / (f.name + ".data")
                entries[comp.name] = ComponentInfo(
                    file=f.name, sha256=sha256_file(f), inputs=inputs, outputs=outputs, precision=dtype,
                    data_files=((data.name, sha256_file(data)),) if data.exists() else (),
                    profile=comp.profile(cfg),
                )
                seconds[comp.name] = time.perf_counter() - t0
                if bar:
                    bar.advance(task)
        tok_path = tmp / "tokenizer.json"
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tok_path)
        else:
            from ..tokenizer import byte_level_tokenizer

            byte_level_tokenizer(cfg.llm.vocab_size).save(str(tok_path))
        weights = {"kind": "checkpoint", "path": str(source.checkpoint)} if source.checkpoint else {"kind": "random", "seed": source.seed}
        manifest = Manifest(
            format_version=FORMAT_VERSION, config_name=cfg.name, config=cfg.to_dict(), model=model_dims(cfg),
            precision=dtype, target=target, components=entries, tokenizer=(tok_path.name, sha256_file(tok_path)),
            weights=weights,
        )
        (tmp / "manifest.json").write_text(manifest.to_json())
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportReport(out, seconds)


def _replace_dir(src: Path, dst: Path) -> None:
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{int(time.time() * 1000)}")
        dst.rename(old)
        src.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        src.rename(dst)


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
