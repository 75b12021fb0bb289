"""End-to-end parity: each pipeline through the runtime and through the PyTorch reference, fed the
same image, prompt and initial noise."""

from __future__ import annotations

import numpy as np
import torch

from emma_runtime.backends import make_backend
from emma_runtime.bundle import Bundle
from emma_runtime.pipelines import Pipeline
from emma_runtime.sampling import initial_noise

from .model import pipelines as ref

# End-to-end minimums per precision, against the fp32 PyTorch pipeline: greedy-token agreement and
# image PSNR. fp32 must reproduce the reference (identical tokens, >= 40 dB); the others were set from
# what `emma-export build` measured on tiny (in the comments), with margin.
E2E_MIN: dict[str, dict[str, float]] = {
    "fp32": {"token_agreement": 1.0, "psnr_db": 40.0},
    "fp16": {"token_agreement": 1.0, "psnr_db": 40.0},  # measured 1.0, 75 dB
    "bf16": {"token_agreement": 0.75, "psnr_db": 35.0},  # measured 1.0, 61 dB
    "int8": {"token_agreement": 0.5, "psnr_db": 25.0},  # measured 1.0, 32.5 dB
    "fp8": {"token_agreement": 0.5, "psnr_db": 25.0},  # measured 1.0, 32.8 dB
    "int4w": {"token_agreement": 0.5, "psnr_db": 30.0},  # measured 1.0, 48 dB
}
PROMPT_UNDERSTAND = "What is in this picture?"
PROMPT_GENERATE = "a red circle left of a blue square"
PROMPT_EDIT = "make the circle green"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two images in [-1, 1], on the [0, 1] scale a viewer sees."""
    a01 = np.clip((a.astype(np.float64) + 1) / 2, 0, 1)
    b01 = np.clip((b.astype(np.float64) + 1) / 2, 0, 1)
    mse = float(np.mean((a01 - b01) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


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


def verify_pipelines(bundle: Bundle, model, height: int | None = None, width: int | None = None, max_new_tokens: int = 8) -> dict[str, dict]:
    cfg = model.cfg
    H = height or cfg.image_size
    W = width or cfg.image_size
    gh, gw = cfg.grid(H, W)
    L = gh * gw
    pipe = Pipeline(bundle, make_backend("ort", "cpu"))
    tok = pipe.tokenizer
    floor = E2E_MIN.get(bundle.manifest.precision, {"token_agreement": 0.5, "psnr_db": 20.0})
    min_psnr = floor["psnr_db"]
    image = test_image(H, W)
    out: dict[str, dict] = {}

    r_run = pipe.understand(image, PROMPT_UNDERSTAND, max_new_tokens=max_new_tokens)
    r_ref = ref.understand(model, tok, torch.from_numpy(image), PROMPT_UNDERSTAND, max_new_tokens=max_new_tokens)
    n = max(len(r_ref.token_ids), len(r_run.token_ids), 1)
    agree = sum(a == b for a, b in zip(r_ref.token_ids, r_run.token_ids)) / n
    exact = floor["token_agreement"] >= 1.0
    tokens_ok = r_run.token_ids == r_ref.token_ids if exact else agree >= floor["token_agreement"]
    ok = tokens_ok and (r_run.expert == r_ref.expert or not exact) and r_run.visual_tokens == L == r_ref.visual_tokens
    out["understand"] = {
        "passed": ok, "token_agreement": round(agree, 4), "tokens": len(r_ref.token_ids), "expert": r_run.expert,
        "visual_tokens": r_run.visual_tokens, "expected_visual_tokens": L,
        "reason": "" if ok else f"runtime tokens {r_run.token_ids} vs reference {r_ref.token_ids}, experts {r_run.expert}/{r_ref.expert}, visual tokens {r_run.visual_tokens}/{L}",
    }

    noise = initial_noise(7, cfg.ae.latent_channels, gh, gw)
    g_run = pipe.generate(PROMPT_GENERATE, H, W, noise=noise)
    g_ref = ref.generate(model, tok, PROMPT_GENERATE, noise)
    p = psnr(g_run.image, g_ref.image.numpy())
    ok = p >= min_psnr and g_run.visual_tokens == L
    out["generate"] = {"passed": ok, "psnr_db": round(p, 2), "min_psnr_db": min_psnr, "visual_tokens": g_run.visual_tokens,
                       "expected_visual_tokens": L, "reason": "" if ok else f"PSNR {p:.2f} dB < {min_psnr} or visual tokens {g_run.visual_tokens} != {L}"}

    e_run = pipe.edit(image, PROMPT_EDIT, noise=noise)
    e_ref = ref.edit(model, tok, torch.from_numpy(image), PROMPT_EDIT, noise)
    p = psnr(e_run.image, e_ref.image.numpy())
    ok = p >= min_psnr and e_run.visual_tokens == 2 * L == e_ref.visual_tokens
    out["edit"] = {"passed": ok, "psnr_db": round(p, 2), "min_psnr_db": min_psnr, "visual_tokens": e_run.visual_tokens,
                   "expected_visual_tokens": 2 * L, "reason": "" if ok else f"PSNR {p:.2f} dB < {min_psnr} or visual tokens {e_run.visual_tokens} != {2 * L}"}
    return out
