"""Peak memory of Model Optimizer's fp8 ONNX PTQ on one LM-head-shaped MatMul (hidden 2560 -> V), the
measurement behind the policy's keeping emma-4b's LM head high (quantize/policy.py, ``_large_head``).

    /usr/bin/time -v python scripts/lm_head_probe.py 19000   # 0.195 GB of weights: 2.87 GB peak RSS
    /usr/bin/time -v python scripts/lm_head_probe.py 38000   # 0.39 GB: 5.34 GB (12.7x the weight bytes)

emma-4b's head (V = 151936, 1.56 GB) extrapolates to about 20 GB.
"""
import sys
import tempfile
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from emma_export.export.external_data import save_graph
from emma_export.quantize import apply_plan
from emma_export.quantize.policy import plan


def main(vocab: int, hidden: int = 2560) -> None:
    w = np.random.default_rng(0).standard_normal((hidden, vocab), dtype=np.float32) * 0.02
    g = helper.make_graph([helper.make_node("MatMul", ["hidden", "W"], ["logits"], name="/lm_head/MatMul")], "lm_head",
                          [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["b", "s", hidden])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", vocab])], [numpy_helper.from_array(w, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    del w
    feeds = [{"hidden": np.random.default_rng(i).standard_normal((1, 64, hidden)).astype(np.float32)} for i in range(8)]
    with tempfile.TemporaryDirectory() as td:
        src = Path(td) / "src.onnx"
        save_graph(m, src, limit=0)
        del m
        # cfg=None: the policy's fp8 LM head as at every size below the threshold (Model Optimizer)
        print(apply_plan(plan("lm_head", "fp8", True, None), src, Path(td) / "out.onnx", feeds, 16, sliced=False))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 19000)
