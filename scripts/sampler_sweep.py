"""Guidance and step count of the shapes checkpoint's sampler, chosen on the VAL split (never the held-out
one): generation and editing success of the PyTorch reference for a grid of settings, same scenes and
noise for every setting. Prints a table and writes out/shapes/sampler-sweep.json.

    python scripts/sampler_sweep.py [--checkpoint checkpoints/shapes] [--n 40] [--cfg ...] [--steps ...] [--shift ...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from emma_export.model import pipelines as P
from shapes_world import world
from shapes_world.detector import detect, scene_matches
from shapes_world.evaluate import _to_model, _to_uint8
from emma_export.weights.checkpoint import load_checkpoint
from emma_runtime.sampling import initial_noise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="checkpoints/shapes")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cfg", type=float, nargs="+", default=[1.5, 2.0, 3.0, 4.0])
    ap.add_argument("--steps", type=int, nargs="+", default=[16])
    ap.add_argument("--shift", type=float, nargs="+", default=[1.0])
    ap.add_argument("--cfg-text", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    ap.add_argument("--cfg-image", type=float, nargs="+", default=[1.0, 1.5, 2.0])
    ap.add_argument("--out", default="out/shapes/sampler-sweep.json")
    a = ap.parse_args()
    torch.set_num_threads(2)
    ck = Path(a.checkpoint)
    model = load_checkpoint(ck / "model.safetensors").float().eval()
    tok = Tokenizer.from_file(str(ck / "tokenizer.json"))
    s = model.cfg.sampler
    exs = world.dataset("val", a.n, seed=a.seed)
    C = model.cfg.ae.latent_channels
    res: dict = {"checkpoint": str(ck), "split": "val", "n": a.n, "config_sampler": s.__dict__, "generate": [], "edit": []}

    for cfg, steps, shift in itertools.product(a.cfg, a.steps, a.shift):
        t0 = time.perf_counter()
        ok = []
        for i, e in enumerate(exs):
            img = P.generate(model, tok, e.caption_detailed, initial_noise(a.seed + i, C, 2, 2), steps=steps, cfg_scale=cfg, shift=shift).image
            ok.append(bool(scene_matches(detect(_to_uint8(img.numpy())), e.caption_detailed)["all"]))
        res["generate"].append({"cfg": cfg, "steps": steps, "shift": shift, "success": float(np.mean(ok)), "seconds": time.perf_counter() - t0})
        print(f"generate cfg {cfg:g} steps {steps} shift {shift:g}: {np.mean(ok):.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)

    for ct, ci in itertools.product(a.cfg_text, a.cfg_image):
        t0 = time.perf_counter()
        ok = []
        for i, e in enumerate(exs):
            pair = e.edits[i % len(e.edits)]
            img = P.edit(model, tok, _to_model(e.image), pair.instruction, initial_noise(a.seed + 10_000 + i, C, 2, 2),
                         cfg_text=ct, cfg_image=ci).image
            ok.append(bool(scene_matches(detect(_to_uint8(img.numpy())), pair.target_scene)["all"]))
        res["edit"].append({"cfg_text": ct, "cfg_image": ci, "success": float(np.mean(ok)), "seconds": time.perf_counter() - t0})
        print(f"edit cfg_text {ct:g} cfg_image {ci:g}: {np.mean(ok):.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)

    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
