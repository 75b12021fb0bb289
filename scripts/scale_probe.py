"""One emma-4b-width backbone with a few layers, through the layer-by-layer path the emma-4b build
takes: streamed export, sliced quantization (Model Optimizer on every layer, or replayed where its
rules hold: emma_export/quantize/replay.py), and its error against the fp32 graph on held-out feeds.
Each stage's wall time and the process's peak RSS go to a JSON file, so a figure in docs/scale.md
is this command's output.

    python scripts/scale_probe.py --precision fp8 --shared 4 --decoupled 3 --out out/probe
    python scripts/scale_probe.py --precision int4w --int4-method rtn_dq --shared 4 --decoupled 3 --out out/probe
    python scripts/scale_probe.py --precision fp8 --no-replay ...     # Model Optimizer on every layer

Feeds are the backbone's own random verify-shaped inputs (the capture at emma-4b costs most of an
hour), the first ``--calib`` for calibration and the next two held out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "runtime")]


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", choices=["fp8", "int4w"], required=True)
    ap.add_argument("--base", default="emma-4b", help="the config whose widths to take")
    ap.add_argument("--component", default="backbone_und", choices=["backbone_und", "und_trunk"],
                    help="und_trunk: the vision trunk with all its layers (quantized layer by layer past EMMA_SLICE_QUANTIZE_BYTES)")
    ap.add_argument("--shared", type=int, default=4, help="shared-Q/K layers (emma-4b: 18)")
    ap.add_argument("--decoupled", type=int, default=3, help="decoupled layers (emma-4b: 18)")
    ap.add_argument("--int4-method", default="", help="Model Optimizer's INT4 method (default: the policy's)")
    ap.add_argument("--calib", type=int, default=4, help="calibration feeds")
    ap.add_argument("--no-replay", action="store_true", help="Model Optimizer on every layer")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import onnxruntime as ort

    from emma_export.components import get_component
    from emma_export.config import get_config
    from emma_export.export.onnx_export import export_component
    from emma_export.export.source import WeightSource
    from emma_export.layer_slices import SlicedGraph, SliceRunner
    from emma_export.quantize.policy import plan
    from emma_export.quantize.sliced import apply_plan_sliced
    from emma_export.verify import rel_l2

    base = get_config(args.base)
    cfg = dataclasses.replace(base, llm=dataclasses.replace(base.llm, shared_layers=args.shared, decoupled_layers=args.decoupled))
    comp = get_component(cfg, args.component, "standard")
    out = args.out / (f"{args.base}-{args.shared}+{args.decoupled}" if args.component == "backbone_und" else f"{args.base}-{args.component}")
    out.mkdir(parents=True, exist_ok=True)
    what = (f"{args.shared} shared + {args.decoupled} decoupled layers" if args.component == "backbone_und"
            else f"the vision trunk, {cfg.vision.trunk_layers} layers")
    rep: dict = {"config": f"{args.base} widths, {what}", "component": args.component, "precision": args.precision}
    fp32 = out / f"{args.component}.onnx"
    t = time.perf_counter()
    if not fp32.exists():
        export_component(comp, cfg, WeightSource(cfg, 0), fp32)
        rep["export_s"] = round(time.perf_counter() - t, 1)
    dims = comp.verify_dims(cfg)
    feeds = [comp.sample_inputs(cfg, dims[i % len(dims)], np.random.default_rng(i)) for i in range(args.calib + 2)]
    calib, held = feeds[: args.calib], feeds[args.calib:]
    p = plan(args.component, args.precision, True, cfg)
    if args.int4_method:
        p = dataclasses.replace(p, calibration_method=args.int4_method)
    rep["plan"] = p.describe()
    label = f"{args.precision}{'-' + args.int4_method if args.int4_method else ''}{'-modelopt' if args.no_replay else '-replay'}"
    q = out / label / f"{args.component}.onnx"
    q.parent.mkdir(exist_ok=True)
    slices: list[tuple[str, float]] = []
    last = [time.perf_counter()]

    def progress(msg: str) -> None:
        now = time.perf_counter()
        slices.append((msg, round(now - last[0], 1)))
        last[0] = now
        print(f"[{now - t0:7.1f} s] {msg}", flush=True)

    t0 = time.perf_counter()
    rep["details"] = apply_plan_sliced(p, fp32, q, calib, len(calib), progress=progress, replay=not args.no_replay)
    rep["quantize_s"] = round(time.perf_counter() - t0, 1)
    rep["steps"] = slices  # each line's time is the step before it
    rep["peak_rss_gb"] = round(peak_gb(), 2)

    def session(b):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # FP8 Q/DQ on the cpu
        return ort.InferenceSession(b, so, providers=["CPUExecutionProvider"])

    ref = SliceRunner(SlicedGraph(fp32), session).run(held)
    got = SliceRunner(SlicedGraph(q), session).run(held)
    first = next(iter(ref[0]))  # the component's first output (hidden_states, features)
    rep[f"rel_l2_{first}"] = [round(float(rel_l2(g[first], r[first])), 5) for g, r in zip(got, ref)]
    rep["bytes"] = sum(f.stat().st_size for f in q.parent.iterdir())
    rep["peak_rss_gb"] = round(peak_gb(), 2)
    (out / f"{label}.json").write_text(json.dumps(rep, indent=1))
    print(json.dumps({k: v for k, v in rep.items() if k != "steps"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
