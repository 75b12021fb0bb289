"""Token sampling and the flow-matching sampler, in numpy."""

from __future__ import annotations

import numpy as np


def sample_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; else top-p by inverse CDF of one uniform draw (the reference's rule)."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    ps = p[order]
    keep = (np.cumsum(ps) - ps) < top_p
    ps = ps[keep] / ps[keep].sum()
    idx = int(np.searchsorted(np.cumsum(ps), rng.random(), side="right"))
    return int(order[min(idx, len(ps) - 1)])


def timesteps(steps: int, shift: float) -> np.ndarray:
    """t from 1 (noise) to 0 (image), shifted: t' = s t / (1 + (s - 1) t)."""
    t = np.linspace(1.0, 0.0, steps + 1)
    return shift * t / (1.0 + (shift - 1.0) * t)


def initial_noise(seed: int, channels: int, grid_h: int, grid_w: int) -> np.ndarray:
    """The pipelines' starting latent; the reference takes the same array."""
    return np.random.default_rng(seed).standard_normal((1, channels, grid_h, grid_w)).astype(np.float32)
