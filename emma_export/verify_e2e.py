"""End-to-end parity: each pipeline through the runtime and through the PyTorch reference, fed the
same image, prompt and initial noise."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from emma_runtime.backends import make_backend
from emma_runtime.images import psnr
from emma_runtime.names import EDIT, GENERATE, TASKS, UNDERSTAND
from emma_runtime.bundle import Bundle
from emma_runtime.pipelines import Pipeline
from emma_runtime.sampling import initial_noise
from emma_runtime.trace import StepTrace

from .model import pipelines as ref

# End-to-end floors per precision, against the fp32 PyTorch pipeline. Keys:
#   token_agreement, psnr_db, top5_agreement: minimums (greedy tokens, final image, top-5 logit sets per step);
#   logits_rel_l2, velocity_rel_l2, latents_rel_l2: maximums of the relative L2 error of the logits at every
#   decode step, of the guided velocity at every denoising step and of the final latents.
# fp32 floors come from what fp32 measures (tiny and the trained shapes checkpoint, 2-core CPU; the
# worst figure in the comment) with about 10x margin, so a small bug cannot hide under a loose floor:
# a runtime decoding against a stale prefix is 4.9% off in its logits, one image attending causally
# instead of bidirectionally 52 dB. The other precisions' per-step floors come from `emma-export build`
# on tiny (measured figures in the comments) with margin.
E2E_MIN: dict[str, dict[str, float]] = {
    # measured (worst step of tiny and shapes): logits 8.4e-7, velocity 2.9e-6, final latents 2.8e-7, images 132-139 dB
    "fp32": {"token_agreement": 1.0, "psnr_db": 110.0, "top5_agreement": 1.0,
             "logits_rel_l2": 1e-5, "velocity_rel_l2": 3e-5, "latents_rel_l2": 3e-6},
    # measured on tiny: tokens 1.0, top-5 1.0, logits 6.7e-4, velocity 1.0e-3, latents 4.0e-4, 73 dB
    "fp16": {"token_agreement": 1.0, "psnr_db": 40.0, "top5_agreement": 0.8,
             "logits_rel_l2": 5e-3, "velocity_rel_l2": 1e-2, "latents_rel_l2": 5e-3},
    # the quantized rows' per-step figures: `emma-export build --recipe quick` of tiny for the cpu target
    # (logits / velocity / final latents rel L2, top-5 agreement), floors about 10x above
    "bf16": {"token_agreement": 0.75, "psnr_db": 35.0, "top5_agreement": 0.8,  # 1.0, 61 dB; 5.5e-3 / 3.3e-4 / 2.3e-4, 1.0
             "logits_rel_l2": 0.05, "velocity_rel_l2": 5e-3, "latents_rel_l2": 5e-3},
    "int8": {"token_agreement": 0.5, "psnr_db": 25.0, "top5_agreement": 0.6,  # 1.0, 32.5 dB; 0.028 / 2.6e-3 / 1.8e-3, 0.96
             "logits_rel_l2": 0.3, "velocity_rel_l2": 0.03, "latents_rel_l2": 0.02},
    "fp8": {"token_agreement": 0.5, "psnr_db": 25.0, "top5_agreement": 0.6,  # 1.0, 32.4 dB; 0.073 / 6.8e-3 / 4.3e-3, 0.93
            "logits_rel_l2": 0.5, "velocity_rel_l2": 0.07, "latents_rel_l2": 0.04},
    "int4w": {"token_agreement": 0.5, "psnr_db": 30.0, "top5_agreement": 0.6,  # 1.0, 70 dB; 0.030 / 1.3e-3 / 9e-4, 0.96
              "logits_rel_l2": 0.3, "velocity_rel_l2": 0.02, "latents_rel_l2": 0.01},
}
# An 8-bit KV cache's own floors (the cache quantized per layer and tensor, on top of any precision).
# Measured with `emma-export build --precision fp32 --kv-cache int8|fp8` (worst logits / velocity /
# final latents rel L2, lowest PSNR; tokens and top-5 always agreed): tiny (quick calibration) int8
# 6.8e-3 / 5.6e-4 / 4.0e-4, 77 dB; fp8 0.021 / 1.6e-3 / 1.2e-3, 67 dB; the trained shapes checkpoint
# int8 1.9e-3 / 8.3e-3 / 2.7e-3, 53.7 dB; fp8 2.6e-3 / 0.042 / 9.4e-3, 47.7 dB (the velocity's worst
# is the last, smallest step of an edit). Floors 2.4-10x above the worst of the two.
E2E_KV_CACHE: dict[str, dict[str, float]] = {
    "int8": {"token_agreement": 0.75, "psnr_db": 40.0, "top5_agreement": 0.8,
             "logits_rel_l2": 0.07, "velocity_rel_l2": 0.03, "latents_rel_l2": 0.02},
    "float8e4m3fn": {"token_agreement": 0.75, "psnr_db": 35.0, "top5_agreement": 0.8,
                     "logits_rel_l2": 0.2, "velocity_rel_l2": 0.1, "latents_rel_l2": 0.05},
}
# an fp16 cache rounds every cached value as an fp16 graph's activations do: fp16's floors
E2E_KV_CACHE["float16"] = E2E_MIN["fp16"]
_MINIMUMS = ("token_agreement", "psnr_db", "top5_agreement")
DEFAULT_FLOOR = {"token_agreement": 0.5, "psnr_db": 20.0, "top5_agreement": 0.4,
                 "logits_rel_l2": 0.5, "velocity_rel_l2": 1.0, "latents_rel_l2": 0.5}
PROMPT_UNDERSTAND = "What is in this picture?"
PROMPT_GENERATE = "a red circle left of a blue square"
PROMPT_EDIT = "make the circle green"


def image_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two model images in [-1, 1], on the [0, 1] scale a viewer sees."""
    return psnr(np.clip((a.astype(np.float64) + 1) / 2, 0, 1), np.clip((b.astype(np.float64) + 1) / 2, 0, 1), peak=1.0)


def test_image(height: int, width: int) -> np.ndarray:
    """A real photograph (scikit-image's sample) resized to (height, width), as (1, 3, H, W) in [-1, 1]."""
    from PIL import Image

    try:
        from skimage import data

        rgb = data.astronaut()
    except ImportError:  # a synthetic but structured picture when scikit-image is absent
        yy, xx = np.mgrid[0:256, 0:256]
        rgb = np.stack([xx, yy, (xx + yy) // 2], -1).astype(np.uint8)
    im = Image.fromarray(rgb).resize((width, height), Image.BICUBIC)
    return (np.asarray(im, np.float32) / 127.5 - 1.0).transpose(2, 0, 1)[None].copy()


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| in float64 (b the reference)."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(b64), 1e-30))


def top5_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Share of the reference's 5 most likely tokens that are also among the runtime's 5."""
    k = min(5, a.size)
    return len(set(np.argsort(-a, kind="stable")[:k]) & set(np.argsort(-b, kind="stable")[:k])) / k


@dataclass
class StepFigures:
    """Per-step comparison of two traces: the worst step and where it is."""

    worst_rel_l2: float
    worst_step: int
    steps: int


def compare_steps(run: list[np.ndarray], ref: list[np.ndarray]) -> StepFigures:
    errs = [rel_l2(a, b) for a, b in zip(run, ref)]
    i = int(np.argmax(errs)) if errs else -1
    return StepFigures(max(errs) if errs else 0.0, i, len(errs))


def _rms(arrays: list[np.ndarray]) -> float:
    return float(np.sqrt(np.mean([np.mean(np.square(a, dtype=np.float64)) for a in arrays]))) if arrays else 0.0


def floor_for(precision: str, kv_cache: str | None = None) -> dict[str, float]:
    """The precision's floors, loosened to an 8-bit ``kv_cache``'s (a manifest dtype) where those are looser."""
    base = E2E_MIN.get(precision, DEFAULT_FLOOR)
    kv = E2E_KV_CACHE.get(kv_cache or "")
    if kv is None:
        return base
    return {k: (min if k in _MINIMUMS else max)(v, kv[k]) for k, v in base.items()}


def understand_parity(pipe: Pipeline, model, image: np.ndarray, prompt: str, floor: dict[str, float],
                      expected_visual_tokens: int, max_new_tokens: int = 8) -> dict:
    """Greedy decode on both sides with the logits of every step compared. Logits are compared up to and
    including the first step whose greedy token differs (after it the two sides condition on different text)."""
    t_run, t_ref = StepTrace(), StepTrace()
    r_run = pipe.understand(image, prompt, max_new_tokens=max_new_tokens, trace=t_run)
    r_ref = ref.understand(model, pipe.tokenizer, torch.from_numpy(image), prompt, max_new_tokens=max_new_tokens, trace=t_ref)
    n = max(len(r_ref.token_ids), len(r_run.token_ids), 1)
    agree = sum(a == b for a, b in zip(r_ref.token_ids, r_run.token_ids)) / n
    same = next((i for i, (a, b) in enumerate(zip(r_run.token_ids, r_ref.token_ids)) if a != b),
                min(len(r_run.token_ids), len(r_ref.token_ids)))
    steps = min(same + 1, len(t_run.logits), len(t_ref.logits))
    lg = compare_steps(t_run.logits[:steps], t_ref.logits[:steps])
    top5 = float(np.mean([top5_overlap(a, b) for a, b in zip(t_run.logits[:steps], t_ref.logits[:steps])])) if steps else 0.0
    exact = floor["token_agreement"] >= 1.0
    tokens_ok = r_run.token_ids == r_ref.token_ids if exact else agree >= floor["token_agreement"]
    reasons = []
    if not tokens_ok:
        reasons.append(f"runtime tokens {r_run.token_ids} vs reference {r_ref.token_ids}")
    if exact and r_run.expert != r_ref.expert:
        reasons.append(f"experts {r_run.expert}/{r_ref.expert}")
    if not (r_run.visual_tokens == expected_visual_tokens == r_ref.visual_tokens):
        reasons.append(f"visual tokens {r_run.visual_tokens}/{r_ref.visual_tokens}, expected {expected_visual_tokens}")
    if lg.worst_rel_l2 > floor["logits_rel_l2"]:
        reasons.append(f"logits rel L2 {lg.worst_rel_l2:.3g} > {floor['logits_rel_l2']:g} at decode step {lg.worst_step}")
    if top5 < floor["top5_agreement"]:
        reasons.append(f"top-5 agreement {top5:.3f} < {floor['top5_agreement']:g}")
    return {
        "passed": not reasons, "token_agreement": round(agree, 4), "tokens": len(r_ref.token_ids), "expert": r_run.expert,
        "text": r_run.text, "reference_text": r_ref.text,
        "visual_tokens": r_run.visual_tokens, "expected_visual_tokens": expected_visual_tokens,
        "logits_rel_l2": float(f"{lg.worst_rel_l2:.3g}"), "logits_steps": lg.steps, "logits_worst_step": lg.worst_step,
        "top5_agreement": round(top5, 4), "min_top5_agreement": floor["top5_agreement"],
        "max_logits_rel_l2": floor["logits_rel_l2"], "reason": "; ".join(reasons),
    }


def _image_parity(run_out, run_trace: StepTrace, ref_out, ref_trace: StepTrace, floor: dict[str, float],
                  expected_visual_tokens: int) -> dict:
    p = float(image_psnr(run_out.image, ref_out.image.numpy()))
    vel = compare_steps(run_trace.velocities, ref_trace.velocities)
    lat = rel_l2(run_out.latents, ref_out.latents.numpy())
    reasons = []
    if p < floor["psnr_db"]:
        reasons.append(f"PSNR {p:.2f} dB < {floor['psnr_db']}")
    if vel.steps != len(ref_trace.velocities) or vel.steps == 0:
        reasons.append(f"runtime ran {len(run_trace.velocities)} denoising steps, reference {len(ref_trace.velocities)}")
    if vel.worst_rel_l2 > floor["velocity_rel_l2"]:
        reasons.append(f"velocity rel L2 {vel.worst_rel_l2:.3g} > {floor['velocity_rel_l2']:g} at step {vel.worst_step}")
    if lat > floor["latents_rel_l2"]:
        reasons.append(f"final latents rel L2 {lat:.3g} > {floor['latents_rel_l2']:g}")
    if run_out.visual_tokens != expected_visual_tokens:
        reasons.append(f"visual tokens {run_out.visual_tokens} != {expected_visual_tokens}")
    return {
        "passed": not reasons, "psnr_db": round(p, 2), "min_psnr_db": floor["psnr_db"],
        "velocity_rel_l2": float(f"{vel.worst_rel_l2:.3g}"), "velocity_steps": vel.steps, "velocity_worst_step": vel.worst_step,
        "max_velocity_rel_l2": floor["velocity_rel_l2"],
        # a freshly initialised checkpoint has the paper's zero Gen head: v = 0 on both sides, and the
        # velocity and image comparisons then check only the decoder (reported, so a reader can tell)
        "reference_velocity_rms": float(f"{_rms(ref_trace.velocities):.3g}"),
        "latents_rel_l2": float(f"{lat:.3g}"), "max_latents_rel_l2": floor["latents_rel_l2"],
        "visual_tokens": run_out.visual_tokens, "expected_visual_tokens": expected_visual_tokens,
        "reason": "; ".join(reasons),
    }


def e2e_tasks(bundle: Bundle) -> tuple[str, ...]:
    """The pipelines a bundle is checked end to end on: its tasks (a task-subset bundle's), in
    registry order; every task when the manifest names none."""
    have = set(bundle.manifest.tasks) or set(TASKS)
    return tuple(t for t in TASKS if t in have)


def verify_pipelines(bundle: Bundle, model, height: int | None = None, width: int | None = None, max_new_tokens: int = 8,
                     image: np.ndarray | None = None, prompt_understand: str = PROMPT_UNDERSTAND) -> dict[str, dict]:
    """The bundle's pipelines (``e2e_tasks``: a task-subset bundle's own, else all three) through the
    runtime and the reference, compared per step (logits, velocity) and per result (tokens, final
    latents, image), against the bundle precision's floors in ``E2E_MIN``. Keys: the tasks checked."""
    cfg = model.cfg
    if image is not None:
        height, width = image.shape[2], image.shape[3]
    H = height or cfg.image_size
    W = width or cfg.image_size
    gh, gw = cfg.grid(H, W)
    L = gh * gw
    tasks = e2e_tasks(bundle)
    pipe = Pipeline(bundle, make_backend("ort", "cpu"))
    tok = pipe.tokenizer
    kv = bundle.manifest.kv_cache
    floor = floor_for(bundle.manifest.precision, kv.dtype if kv else None)
    image = test_image(H, W) if image is None else np.ascontiguousarray(image, dtype=np.float32)
    out: dict[str, dict] = {}
    if UNDERSTAND in tasks:
        out[UNDERSTAND] = understand_parity(pipe, model, image, prompt_understand, floor, L, max_new_tokens)

    # generate and edit start from the same noise, as they did when all three always ran
    noise = initial_noise(7, cfg.ae.latent_channels, gh, gw)
    if GENERATE in tasks:
        tr_run, tr_ref = StepTrace(), StepTrace()
        g_run = pipe.generate(PROMPT_GENERATE, H, W, noise=noise, trace=tr_run)
        g_ref = ref.generate(model, tok, PROMPT_GENERATE, noise, trace=tr_ref)
        out[GENERATE] = _image_parity(g_run, tr_run, g_ref, tr_ref, floor, L)

    if EDIT in tasks:
        tr_run, tr_ref = StepTrace(), StepTrace()
        e_run = pipe.edit(image, PROMPT_EDIT, noise=noise, trace=tr_run)
        e_ref = ref.edit(model, tok, torch.from_numpy(image), PROMPT_EDIT, noise, trace=tr_ref)
        out[EDIT] = _image_parity(e_run, tr_run, e_ref, tr_ref, floor, 2 * L)
        if e_ref.visual_tokens != 2 * L:
            out[EDIT]["passed"] = False
            out[EDIT]["reason"] = "; ".join(filter(None, [out[EDIT]["reason"], f"reference visual tokens {e_ref.visual_tokens} != {2 * L}"]))
    return out
