"""ONNX Runtime's profiler on one backbone decode step of a bundle: time per operator type.

    python scripts/profile_backbone.py BUNDLE [--context 2048] [--component backbone_und] [--runs 30]

What found the decode-growth cost of the old time-major cache (Split / Transpose of the whole cache per
step) and the unfused int8 MatMuls (DequantizeLinear) quoted in docs/benchmarks.md. Either graph flavour.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from emma_runtime import names  # noqa: E402
from emma_runtime.bundle import Bundle  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--component", default="backbone_und")
    ap.add_argument("--runs", type=int, default=30)
    a = ap.parse_args()
    b = Bundle.load(a.bundle)
    info = b.manifest.components[a.component]
    d = b.manifest.model
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "prof")
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if info.precision == "fp8":
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(str(b.path(info.file)), so, providers=["CPUExecutionProvider"])
    P, rng = a.context, np.random.default_rng(0)
    kv = (1, d.num_kv_heads, P, d.head_dim)
    feeds = {
        "inputs_embeds": (0.05 * rng.standard_normal((1, 1, d.hidden_size))).astype(np.float32),
        "position_ids": np.array([[P]], np.int64),
    }
    if info.attention == names.ATTENTION_GQA:  # the cache buffer holds P positions and room for the new one
        kv = (1, d.num_kv_heads, P + 1, d.head_dim)
        feeds.update({names.SEQLENS_K: np.array([P], np.int32), names.TOTAL_SEQUENCE_LENGTH: np.array(P + 1, np.int32)})
    else:
        feeds["attention_mask"] = np.ones((1, 1, P + 1), bool)
    for i in range(d.num_layers):
        k, v = names.past_kv(i)
        feeds[k] = rng.standard_normal(kv).astype(np.float32)
        feeds[v] = (0.05 * rng.standard_normal(kv)).astype(np.float32)
    feeds = {k: v for k, v in feeds.items() if k in {i.name for i in s.get_inputs()}}
    for _ in range(a.runs):
        s.run(None, feeds)
    events = json.loads(Path(s.end_profiling()).read_text())
    per, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    print(f"{a.component} of {a.bundle} ({info.precision}), one decode step at context {P}, {a.runs} runs (profiler on)")
    for op, us in per.most_common(12):
        print(f"{op:28s} {us / a.runs / 1000:8.3f} ms/run  {count[op] // a.runs:4d} nodes")
    print(f"{'total':28s} {sum(per.values()) / a.runs / 1000:8.3f} ms/run")


if __name__ == "__main__":
    main()
