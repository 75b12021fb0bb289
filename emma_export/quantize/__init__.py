"""Quantization and half-precision conversion of an exported fp32 bundle, component by component,
following the precision policy (``policy.py``), with calibration feeds captured from the reference
pipelines on real data (``calibrate.py``).

``quantize_bundle`` rewrites the graphs of a bundle folder IN PLACE and then its manifest (through
the ``Manifest`` type: new sha256s, graph IO, per-component precision, the precision policy). The
build (``emma_export/build.py``) calls it on a temporary folder that is renamed into place at the
end, so a failure leaves nothing that looks like a bundle.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Collection

import numpy as np

from .policy import PRECISIONS, QUANTIZED, Plan, gemm_ops, plan
from ..heap import give_back, steady_heap

Feed = dict[str, np.ndarray]

__all__ = ["PRECISIONS", "QUANTIZED", "Plan", "plan", "quantize_bundle", "apply_plan", "ComponentOutcome"]


@dataclass
class ComponentOutcome:
    component: str
    plan: Plan
    seconds: float
    bytes: int
    details: dict


def apply_plan(p: Plan, src: Path, dst: Path, feeds: list[Feed] | None, calib_samples: int = 64,
               sliced: bool | None = None) -> dict:
    """Writes the component graph ``dst`` from the fp32 graph ``src`` as ``p`` says. Returns details.
    ``sliced``: one decoder layer at a time (``sliced.py``); None: when the graph's weights are past
    ``sliced.threshold()`` (1e9 bytes, or ``EMMA_STREAM_BYTES`` if lower: emma-4b's backbones and its
    vision trunk)."""
    from . import calibrate, fp16, modelopt_driver

    from ..export import external_data
    from ..export.external_data import copy_graph

    src, dst = Path(src), Path(dst)
    if p.method == "none":
        if src != dst:
            copy_graph(src, dst)
        return {}
    if sliced is None and p.method == "fp16" and external_data.has_external(src):
        from ..export.streamed_export import threshold as stream_threshold

        # converted on its structure, its weights streamed (fp16.convert_fp16): one slice per layer only
        # where the overflow check could not run the graph whole (the backbones, past EMMA_STREAM_BYTES)
        sliced = external_data.graph_weight_bytes(src) > stream_threshold()
    if sliced is None:
        from ..export.external_data import graph_weight_bytes
        from .sliced import threshold

        sliced = graph_weight_bytes(src) > threshold()
    if sliced:
        from .sliced import apply_plan_sliced

        return apply_plan_sliced(p, src, dst, feeds, calib_samples)
    if p.method == "fp16":
        sample = calibrate.select(feeds, 8) if feeds else None
        return fp16.convert_fp16(src, dst, keep_ops=p.keep_fp32_ops, keep_nodes=p.keep_fp32, feeds=sample)
    if p.method == "bf16-weights":
        return {"bf16_weights": fp16.convert_bf16_weights(src, dst, keep_nodes=p.keep_fp32)}
    if p.method == "bf16-autocast":
        return fp16.convert_bf16_autocast(src, dst, keep_ops=p.keep_fp32_ops, keep_nodes=p.keep_fp32)
    if not feeds:
        raise ValueError(f"{p.component}: {p.precision} needs calibration feeds and none were captured")
    mode = {"modelopt-int8": "int8", "modelopt-fp8": "fp8", "modelopt-int4": "int4"}[p.method]
    chosen = calibrate.select(feeds, calib_samples)
    # Model Optimizer's own fp16 pass keeps op types only; nodes the plan keeps fp32 need ours, after
    # (as int4's: Model Optimizer leaves int4 graphs fp32 elsewhere)
    ours = p.high_precision == "fp16" and mode != "int4" and bool(p.keep_fp32 or p.keep_fp32_ops)
    modelopt_driver.quantize(
        src, dst, mode, chosen, high_precision="fp32" if ours else p.high_precision, nodes_to_exclude=list(p.exclude),
        op_types_to_quantize=gemm_ops() if mode != "int4" else None,
        calibration_method=p.calibration_method or None, block_size=p.block_size,
    )
    details: dict = {"calibration_feeds": len(chosen)}
    if p.reduce_range:
        details["reduced_range_weights"] = modelopt_driver.reduce_weight_range(dst)
    if mode in ("int8", "fp8"):
        details["folded_weights"] = modelopt_driver.fold_weight_quantizers(dst)
    if mode == "int8" and p.reduce_range:  # the cpu target (ONNX Runtime's integer kernels)
        details["uint8_activations"] = modelopt_driver.activations_to_uint8(dst)
    if (mode == "int4" and p.high_precision == "fp16") or ours:
        details["kept_fp32_nodes"] = rest_fp16(dst, p.keep_fp32_ops, p.keep_fp32)["kept_fp32_nodes"]
    return details


def rest_fp16(path: Path, keep_ops: tuple[str, ...], keep_nodes: tuple[str, ...]) -> dict:
    """A Q/DQ or INT4 weight-only graph's float part to fp16 (a GPU target), in place; the plan's
    ``keep_*`` (op types, node patterns) stay fp32."""
    from . import fp16
    from ..export.external_data import load_graph, save_graph

    tmp = path.with_suffix(".fp16.onnx")
    kept = fp16.convert_fp16(path, tmp, keep_ops=keep_ops, keep_nodes=keep_nodes)
    save_graph(load_graph(tmp), path)  # under its own name, its data file named for it
    tmp.unlink()
    (tmp.parent / (tmp.name + ".data")).unlink(missing_ok=True)
    return kept


def quantize_bundle(bundle_dir: str | Path, precision: str, target, feeds: dict[str, list[Feed]] | None,
                    calib_samples: int = 64, progress=None, only: Collection[str] = (),
                    consume: bool = False) -> list[ComponentOutcome]:
    """Rewrites every component graph of the fp32 bundle ``bundle_dir`` to ``precision`` for ``target``
    (a ``targets.Target``) and rewrites manifest.json. ``feeds``: component -> calibration feeds.
    ``only``: quantize just these components, the others get the target's high precision (fp32 on
    cpu): one component at a time is how a precision's task loss is traced to its cause.
    ``consume``: the folder is the caller's own (a build's work folder, thrown away if anything
    fails): each source graph is moved out to be converted, not copied, and is gone once converted.
    Otherwise (a user's bundle) the sources stay whole until every result replaces them."""
    from emma_runtime.bundle import MANIFEST, Bundle, sha256_file

    from ..components import get_component
    from ..config import EMMAConfig
    from ..export.bundle_writer import bundle_bytes, data_files, graph_io, share_tied_embedding
    from ..export.trt_ops import check_model

    bundle_dir = Path(bundle_dir)
    steady_heap()
    bundle = Bundle.load(bundle_dir)
    m = bundle.manifest
    if m.precision != "fp32" or any(c.precision != "fp32" for c in m.components.values()):
        raise ValueError(f"{bundle_dir}: quantize starts from an fp32 bundle (this one is {m.precision})")
    if m.kv_cache is not None:
        raise ValueError(f"{bundle_dir}: quantize starts from an exported bundle (this one's KV cache is already {m.kv_cache.dtype})")
    cfg = EMMAConfig.from_dict(m.config)
    gpu = bool(getattr(target, "is_gpu", False))
    unknown = sorted(set(only) - set(m.components))
    if unknown:
        raise ValueError(f"{bundle_dir}: no component {', '.join(unknown)} (the bundle has {', '.join(m.components)})")
    entries = dict(m.components)
    policy: dict[str, str] = {}
    out: list[ComponentOutcome] = []
    # Every graph is written to out/ and moved into the bundle only when all are done: a source
    # graph may read a file another component's result replaces (the tied embedding).
    # a file two components read (the tied embedding's table) is never moved out from under the other
    files = {n: {c.file, *(f for f, _ in c.data_files)} for n, c in m.components.items()}
    readers = Counter(f for fs in files.values() for f in fs)
    shared = {n for n, fs in files.items() if any(readers[f] > 1 for f in fs)}
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=bundle_dir) as td:
        work, done = Path(td) / "src", Path(td) / "out"
        for name, info in m.components.items():
            p = plan(name, precision, gpu, cfg)
            if only and name not in only:
                p = plan(name, "fp16" if gpu else "fp32", gpu, cfg)
                p = replace(p, notes=p.notes + (f"kept high: {precision} for {', '.join(sorted(only))} only",))
            t0 = time.perf_counter()
            src = _plain_graph(bundle.path(info.file), work / info.file, move=consume and name not in shared)
            tmp = done / info.file
            tmp.parent.mkdir(parents=True, exist_ok=True)
            comp_feeds = (feeds or {}).get(name)
            if comp_feeds:
                comp_feeds = get_component(cfg, name, info.attention).from_captured(cfg, comp_feeds)
            details = apply_plan(p, src, tmp, comp_feeds, calib_samples)
            bad = nonfinite_scales(tmp)
            if bad:
                # Model Optimizer's FP8 scale is its INT8 one times 448/127 in fp16 arithmetic: an
                # activation amax past about 18,500 makes it inf, and the graph computes NaN
                raise ValueError(f"{name}: quantization scale '{bad[0]}' is not finite (or zero where it divides) "
                                 f"({len(bad)} such scale{'s' if len(bad) > 1 else ''}); keep its node high in the policy")
            # the converted copy is done with: held to the end, the two emma-4b backbones' copies
            # (14.5 GB each) took the fp8 build's temporary files to 69 GB and the next build out of disk
            for f in [src] + [src.parent / r for r in onnx_refs(src)]:
                f.unlink(missing_ok=True)
            if gpu:  # what TensorRT's parser cannot take is named now, not at engine-build time
                import onnx

                issues = check_model(onnx.load(str(tmp), load_external_data=False))
                if issues:
                    details["trt_issues"] = [str(i) for i in issues[:5]]
            inputs, outputs = graph_io(tmp)
            entries[name] = replace(info, inputs=inputs, outputs=outputs, precision=p.precision)
            policy[name] = p.describe()
            out.append(ComponentOutcome(name, p, time.perf_counter() - t0, 0, details))
            give_back()
        for name in m.components:
            f = Path(entries[name].file)
            for rel in [f] + [f.parent / d for d in onnx_refs(done / f)]:
                (bundle_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                (done / rel).replace(bundle_dir / rel)
    for name, info in entries.items():
        g = bundle_dir / info.file
        entries[name] = replace(info, sha256=sha256_file(g), data_files=data_files(g))
    entries = share_tied_embedding(bundle_dir, entries)
    _remove_unreferenced(bundle_dir, m.components.values(), entries.values())
    for o in out:
        o.bytes = bundle_bytes(bundle_dir, [entries[o.component]])
        if progress:
            progress(o)
    new = replace(m, precision=precision, target=getattr(target, "name", str(target)), components=entries, precision_policy=policy)
    tmp_manifest = bundle_dir / (MANIFEST + ".tmp")
    tmp_manifest.write_text(new.to_json())
    tmp_manifest.replace(bundle_dir / MANIFEST)
    return out


def _plain_graph(src: Path, dst: Path, move: bool = False) -> Path:
    """``src`` as every conversion expects it, at ``dst``: the tied embedding untied (the quantizer
    sees GEMM weights only as initializers) and its data beside it. The export's bytes otherwise."""
    import onnx

    from ..export.external_data import copy_graph, load_graph, save_graph
    from ..export.tied_embedding import TIED_FILE, untie

    dst.parent.mkdir(parents=True, exist_ok=True)
    if TIED_FILE in onnx_refs(src):
        m = load_graph(src)
        untie(m)
        # the table in a file of its own: fp16 of a graph with external data streams its weights file to
        # file (fp16._stream_weights) instead of holding the table several times over
        save_graph(m, dst, limit=0)
    else:
        # moved when the folder is a build's own: an emma-4b build's disk peaked at its 36 GB export
        # plus a backbone's 14.5 GB copy, and beside an init checkpoint (57 GB free) the second
        # backbone would not have fit
        copy_graph(src, dst, move=move)
    return dst


def nonfinite_scales(path: Path) -> list[str]:
    """Scale inputs of the graph's Quantize/DequantizeLinear nodes that hold an inf or a NaN, or a zero
    where a value is quantized; each read alone (a backbone's weights are not loaded)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path), load_external_data=False)
    scales = {n.input[1] for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 1}
    # a zero scale divides only where something is quantized (an all-zero weight block dequantizes
    # to zeros with it, harmlessly)
    divides = {n.input[1] for n in m.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 1}
    bad = []
    for t in m.graph.initializer:
        if t.name in scales:
            a = numpy_helper.to_array(t, base_dir=str(path.parent)).astype(np.float32)
            if not np.all(np.isfinite(a)) or (t.name in divides and np.any(a == 0)):
                bad.append(t.name)
    return bad


def onnx_refs(path: Path) -> list[str]:
    from ..export.external_data import referenced_files, refs_only

    return referenced_files(refs_only(path))


def _remove_unreferenced(bundle_dir: Path, before, after) -> None:
    """Data files the old manifest listed and the new one does not (a tied table now quantized
    apart, a graph now small enough to hold its weights): gone, so the folder holds what it lists."""
    keep = {f for c in after for f, _ in c.data_files} | {c.file for c in after}
    for c in before:
        for f, _ in c.data_files:
            if f not in keep:
                (bundle_dir / f).unlink(missing_ok=True)
