"""Small building blocks shared by the EMMA modules, written out so that every ONNX exporter
and opset sees plain ops (no ``aten::rms_norm`` below opset 23)."""

from __future__ import annotations

import math

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32: half-precision sums of squares overflow for LLM activations.
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) -> (B, dim): [cos | sin] halves, the DiT/diffusers convention with flip_sin_to_cos."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_2d(h: torch.Tensor | int, w: torch.Tensor | int, dim: int, device=None) -> torch.Tensor:
    """Fixed 2D sin-cos position table (h*w, dim), row-major over the token grid.

    The first half of the channels encodes the row, the second half the column (MAE layout).
    ``h``/``w`` may be traced sizes, so one exported graph serves every grid.
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos positions need a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter))
    ys = torch.arange(h, dtype=torch.float32, device=device)
    xs = torch.arange(w, dtype=torch.float32, device=device)
    ey = ys[:, None] * omega[None]  # (h, q)
    ex = xs[:, None] * omega[None]  # (w, q)
    ey = torch.cat([torch.sin(ey), torch.cos(ey)], dim=-1)  # (h, 2q)
    ex = torch.cat([torch.sin(ex), torch.cos(ex)], dim=-1)  # (w, 2q)
    grid_y = ey[:, None, :].expand(-1, ex.shape[0], -1)
    grid_x = ex[None, :, :].expand(ey.shape[0], -1, -1)
    return torch.cat([grid_y, grid_x], dim=-1).reshape(-1, dim)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S) positions -> cos, sin of shape (B, 1, S, head_dim), the Qwen3 (rotate-half) layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # (B, S, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos()[:, None], emb.sin()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)
