"""Held-out evaluation of a shapes-world EMMA (issue #10): what users see, per task.

On ``n`` examples of the ``heldout`` split (every scene holds a (colour, kind, position) combination
never seen in training), through the runtime (the bundle's ONNX graphs) and, with ``reference=True``, through the
PyTorch reference pipelines on the bundle's source checkpoint, with identical initial noise:

* understanding: greedy answers to every question of each scene, exact match per question type;
* generation: the detailed caption ("a small red triangle on the left", "a large red circle above
  a small blue square") -> image, scored by the detector (colour, shape, position, size, all);
* editing: one edit per scene (the ops in turn), success = the detector finds the edited target
  scene; PSNR of the untouched region (outside the boxes of the shapes the edit changes);
* autoencoder: reconstruction PSNR of the held-out images;
* beside them the detector's own ceiling on the rendered held-out scenes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from emma_runtime.images import psnr_from_mse
from emma_runtime.images import to_model as _to_model
from emma_runtime.images import to_uint8 as _to_uint8

from . import world
from .detector import detect, detector_ceiling, scene_matches

GEN_KEYS = ("colour", "shape", "position", "size", "count", "all", "all_with_size")
TARGETS = {"understanding": 0.85, "generation": 0.9, "edit": 0.8, "ae_psnr": 30.0}


def _mse(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, int]:
    d = a.astype(np.float64) - b.astype(np.float64)
    if mask is not None:
        d = d[mask]
    return float(np.sum(d * d)), int(d.size)


def _psnr_from(sse: float, count: int, cap: float = 100.0) -> float:
    """PSNR of pooled squared errors (uint8 scale), capped so identical images average."""
    return float("nan") if count == 0 else psnr_from_mse(sse / count, 255.0, cap)


def changed_mask(src: world.Scene, tgt: world.Scene, margin: int = 2) -> np.ndarray:
    """(H, W) bool: the boxes (plus ``margin`` px) of the shapes an edit adds, removes or changes."""
    m = np.zeros((tgt.height, tgt.width), bool)
    for s in set(src.shapes) ^ set(tgt.shapes):
        x0, y0, x1, y1 = world.shape_box(s, tgt.width, tgt.height)
        m[max(0, y0 - margin) : y1 + 1 + margin, max(0, x0 - margin) : x1 + 1 + margin] = True
    return m


# ---- the two sides ----------------------------------------------------------------------------


class RuntimeSide:
    name = "runtime"

    def __init__(self, bundle: str | Path):
        from emma_runtime.pipelines import Pipeline

        self.pipe = Pipeline.load(bundle)
        self.latent_channels = self.pipe.dims.latent_channels

    def understand(self, image: np.ndarray, question: str) -> str:
        return self.pipe.understand(_to_model(image), question, max_new_tokens=12).text

    def generate(self, prompt: str, noise: np.ndarray) -> np.ndarray:
        H, W = noise.shape[2] * self.pipe.dims.cell, noise.shape[3] * self.pipe.dims.cell
        return _to_uint8(self.pipe.generate(prompt, H, W, noise=noise).image)

    def edit(self, image: np.ndarray, prompt: str, noise: np.ndarray) -> np.ndarray:
        return _to_uint8(self.pipe.edit(_to_model(image), prompt, noise=noise).image)

    def reconstruct(self, image: np.ndarray) -> np.ndarray:
        return _to_uint8(self.pipe.decode(self.pipe.latents(_to_model(image))))


class ReferenceSide:
    name = "reference"

    def __init__(self, checkpoint: str | Path, tokenizer_file: str | Path, threads: int | None = None):
        import torch
        from tokenizers import Tokenizer

        from emma_export.weights.checkpoint import load_checkpoint

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model = load_checkpoint(checkpoint).float().eval()
        self.tok = Tokenizer.from_file(str(tokenizer_file))
        self.latent_channels = self.model.cfg.ae.latent_channels

    def understand(self, image: np.ndarray, question: str) -> str:
        from emma_export.model import pipelines as P

        return P.understand(self.model, self.tok, _to_model(image), question, max_new_tokens=12).text

    def generate(self, prompt: str, noise: np.ndarray) -> np.ndarray:
        from emma_export.model import pipelines as P

        return _to_uint8(P.generate(self.model, self.tok, prompt, noise).image.numpy())

    def edit(self, image: np.ndarray, prompt: str, noise: np.ndarray) -> np.ndarray:
        from emma_export.model import pipelines as P

        return _to_uint8(P.edit(self.model, self.tok, _to_model(image), prompt, noise).image.numpy())

    def reconstruct(self, image: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            x = self.torch.from_numpy(_to_model(image))
            return _to_uint8(self.model.ae.decode(self.model.ae.encode(x)).numpy())


def reference_checkpoint(bundle: str | Path) -> Path:
    """The checkpoint a bundle was exported from (manifest ``weights``: kind 'checkpoint')."""
    from emma_runtime.bundle import Bundle

    b = Bundle.load(bundle, check_files=False)
    w = b.manifest.weights or {}
    if w.get("kind") != "checkpoint" or not w.get("path"):
        raise ValueError(f"{bundle}: exported from {w.get('kind', 'unknown')} weights, not a checkpoint; pass --checkpoint")
    p = Path(w["path"])
    for cand in (p, Path(bundle) / p, Path(bundle).parent / p):
        if cand.exists():
            return cand
    raise ValueError(f"{bundle}: its source checkpoint {p} is not there; pass --checkpoint")


# ---- one side's suite -------------------------------------------------------------------------


def _bar(total: int, desc: str, enabled: bool):
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
        except ImportError:  # pragma: no cover
            pass
    return None


def _rates(groups: dict[str, list[int]]) -> tuple[float, dict[str, float], int]:
    """0/1 outcomes per group -> (overall rate, rate per group, count)."""
    allv = [v for vs in groups.values() for v in vs]
    overall = float(np.mean(allv)) if allv else float("nan")
    return overall, {k: float(np.mean(v)) for k, v in sorted(groups.items())}, len(allv)


def run_suite(side, examples: list[world.Example], seed: int, progress: bool = False) -> dict:
    """Every metric of one side on the given held-out examples."""
    from emma_runtime.sampling import initial_noise

    out: dict = {}
    n = len(examples)
    t0 = time.perf_counter()

    # understanding: every question of every scene
    per: dict[str, list[int]] = {}
    wrong: list[dict] = []
    bar = _bar(sum(len(e.qas) for e in examples), f"{side.name} understand", progress)
    for ex in examples:
        for qa in ex.qas:
            got = side.understand(ex.image, qa.question).strip().lower()
            ok = got == qa.answer
            per.setdefault(qa.qtype, []).append(int(ok))
            if not ok and len(wrong) < 20:
                wrong.append({"question": qa.question, "answer": qa.answer, "got": got})
            bar and bar.update(1)
    bar and bar.close()
    exact, per_type, total = _rates(per)
    out["understanding"] = {
        "exact": exact,
        "per_type": per_type,
        "questions": total,
        "examples_wrong": wrong,
    }
    t1 = time.perf_counter()

    # generation: detailed captions
    tally = dict.fromkeys(GEN_KEYS, 0)
    bar = _bar(n, f"{side.name} generate", progress)
    for i, ex in enumerate(examples):
        h, w = ex.scene.height // 32, ex.scene.width // 32
        img = side.generate(ex.caption_detailed, initial_noise(seed + i, side.latent_channels, h, w))
        dets = detect(img)
        r = scene_matches(dets, ex.caption_detailed)
        r["all_with_size"] = scene_matches(dets, ex.caption_detailed, with_size=True)["all"]
        for k in GEN_KEYS:
            tally[k] += bool(r[k])
        bar and bar.update(1)
    bar and bar.close()
    out["generation"] = {k: tally[k] / max(n, 1) for k in GEN_KEYS}
    out["generation"]["n"] = n
    t2 = time.perf_counter()

    # editing: one edit per scene, the ops in turn
    ok_ops: dict[str, list[int]] = {}
    sse, cnt = 0.0, 0
    bar = _bar(n, f"{side.name} edit", progress)
    for i, ex in enumerate(examples):
        pair = ex.edits[i % len(ex.edits)]
        target = world.render(pair.target_scene)
        h, w = ex.scene.height // 32, ex.scene.width // 32
        img = side.edit(ex.image, pair.instruction, initial_noise(seed + 10_000 + i, side.latent_channels, h, w))
        ok_ops.setdefault(pair.op, []).append(int(scene_matches(detect(img), pair.target_scene)["all"]))
        s_, c_ = _mse(img, target, ~changed_mask(ex.scene, pair.target_scene))
        sse, cnt = sse + s_, cnt + c_
        bar and bar.update(1)
    bar and bar.close()
    success, per_op, total = _rates(ok_ops)
    out["edit"] = {
        "success": success,
        "per_op": per_op,
        "untouched_psnr": _psnr_from(sse, cnt),
        "n": total,
    }
    t3 = time.perf_counter()

    # autoencoder reconstruction; its readback (the detector finds the scene in the decoded image) is
    # what the decoder lets generation reach at best
    psnrs, sse, cnt, read = [], 0.0, 0, 0
    for ex in examples:
        rec = side.reconstruct(ex.image)
        s_, c_ = _mse(rec, ex.image)
        psnrs.append(_psnr_from(s_, c_))
        sse, cnt = sse + s_, cnt + c_
        read += bool(scene_matches(detect(rec), ex.scene)["all"])
    out["ae"] = {"psnr": float(np.mean(psnrs)) if psnrs else float("nan"), "psnr_pooled": _psnr_from(sse, cnt),
                 "readback": read / max(n, 1)}
    t4 = time.perf_counter()
    out["seconds"] = {"understanding": t1 - t0, "generation": t2 - t1, "edit": t3 - t2, "ae": t4 - t3}
    return out


def headline(r: dict) -> dict[str, float]:
    """The four numbers the targets are stated on."""
    return {
        "understanding": r["understanding"]["exact"],
        "generation": r["generation"]["all"],
        "edit": r["edit"]["success"],
        "ae_psnr": r["ae"]["psnr"],
    }


def evaluate(
    bundle: str | Path,
    n: int = 100,
    seed: int = 0,
    reference: bool = False,
    checkpoint: str | Path | None = None,
    progress: bool = False,
    ceiling: bool = True,
    split: str = "heldout",
) -> dict:
    """Held-out suite on the runtime (and on the PyTorch reference); a JSON-ready dict. ``split="val"``
    runs the same suite on scenes of the training distribution (no held-out combinations): the gap between the
    two is what fails to generalise."""
    from emma_runtime.bundle import Bundle

    name = Bundle.load(bundle, check_files=False).manifest.config_name
    if name != "shapes":
        raise ValueError(f"{bundle}: a '{name}' bundle; the shapes-world suite needs a model trained on it (config 'shapes')")
    examples = world.dataset(split, n, seed=seed)
    rt = RuntimeSide(bundle)
    res: dict = {"bundle": str(bundle), "n": n, "seed": seed, "split": split, "targets": TARGETS}
    res["precision"] = rt.pipe.bundle.manifest.precision
    res["runtime"] = run_suite(rt, examples, seed, progress)
    if reference:
        ck = Path(checkpoint) if checkpoint else reference_checkpoint(bundle)
        b = Bundle.load(bundle, check_files=False)
        ref = ReferenceSide(ck, b.path(b.manifest.tokenizer[0]))
        res["checkpoint"] = str(ck)
        res["reference"] = run_suite(ref, examples, seed, progress)
        a, c = headline(res["runtime"]), headline(res["reference"])
        # fractions in percentage points, PSNR in dB
        res["delta"] = {k: (a[k] - c[k]) * (1 if k == "ae_psnr" else 100) for k in a}
    if ceiling:
        res["detector_ceiling"] = detector_ceiling(max(n, 50), seed=seed, splits=(split,))
    sides = [k for k in ("runtime", "reference") if k in res]
    res["passed"] = {s: {k: bool(v >= TARGETS[k]) for k, v in headline(res[s]).items()} for s in sides}
    return res


def table_rows(res: dict) -> list[tuple[str, ...]]:
    """(metric, runtime, [reference], target, detector ceiling) rows for printing."""
    sides = [k for k in ("runtime", "reference") if k in res]
    ceil = res.get("detector_ceiling", {})

    def pct(v):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    def db(v):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f} dB"

    rows: list[tuple[str, ...]] = []

    def add(name: str, get: Callable[[dict], float | None], fmt=pct, target: str = "", c: str = ""):
        rows.append((name, *[fmt(get(res[s])) for s in sides], target, c))

    add("understanding exact", lambda r: r["understanding"]["exact"], target=">= 0.85")
    types = sorted({t for s in sides for t in res[s]["understanding"]["per_type"]})
    for t in types:
        add(f"  {t}", lambda r, t=t: r["understanding"]["per_type"].get(t))
    for k in ("colour", "shape", "position", "size"):
        add(f"generation {k}", lambda r, k=k: r["generation"][k], c=pct(ceil.get(k)))
    add("generation all", lambda r: r["generation"]["all"], target=">= 0.9", c=pct(ceil.get("all")))
    add("edit success", lambda r: r["edit"]["success"], target=">= 0.8", c=pct(ceil.get("all")))
    ops = sorted({o for s in sides for o in res[s]["edit"]["per_op"]})
    for o in ops:
        add(f"  {o}", lambda r, o=o: r["edit"]["per_op"].get(o))
    add("edit untouched PSNR", lambda r: r["edit"]["untouched_psnr"], fmt=db)
    add("AE PSNR", lambda r: r["ae"]["psnr"], fmt=db, target=">= 30 dB")
    add("AE readback", lambda r: r["ae"].get("readback"), c=pct(ceil.get("all")))
    return rows


def print_table(res: dict, echo: Callable[[str], None] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    sides = [k for k in ("runtime", "reference") if k in res]
    t = Table(title=f"shapes world, {res.get('split', 'heldout')} n={res['n']} seed={res['seed']} ({res.get('precision', '?')} bundle)")
    for col in ("metric", *sides, "target", "detector ceiling"):
        t.add_column(col, justify="left" if col == "metric" else "right")
    for row in table_rows(res):
        t.add_row(*row)
    Console().print(t)
    if "delta" in res:
        d = res["delta"]
        line = "runtime - reference: " + ", ".join(
            f"{k} {v:+.2f}" + (" dB" if k == "ae_psnr" else " pts") for k, v in d.items()
        )
        (echo or print)(line)


def write_json(res: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2) + "\n")
    return path
