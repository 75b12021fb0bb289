"""scripts/make_tiny_upstream.py --synthetic: the folders emma4b.sh builds EMMA-4B from when no real
upstream weights are at hand. Their values must look like a model's at init (what the fp8 trunk's
verify measured is the export, not an artifact of the stand-in weights)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_synthetic_folders_start_biases_at_zero_and_norm_scales_at_one(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_tiny_upstream import make_synthetic_upstream

    from emma_export.weights.upstream import UpstreamFolder

    dirs = make_synthetic_upstream(tmp_path, "tiny")
    seen = {"bias": 0, "scale": 0, "matrix": 0}
    for d in dirs.values():
        f = UpstreamFolder(d)
        for k in f.keys():
            t = f.get(k).float()
            if not t.is_floating_point():
                continue
            if k.endswith(".bias"):
                assert torch.all(t == 0), k  # 1.0 put +1 on every channel of every projection
                seen["bias"] += 1
            elif t.dim() == 1:
                assert torch.all(t == 1), k
                seen["scale"] += 1
            else:
                assert 0.015 < float(t.std()) < 0.025 or t.numel() < 64, (k, float(t.std()))
                seen["matrix"] += 1
    assert all(seen.values()), seen  # SigLIP and DC-AE have biases, every model norms
