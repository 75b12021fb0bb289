"""Adapters from the channel-wise fused image features to the LLM width.

Per grid cell the understanding features (4 x ViT width, after the 2x2 pixel shuffle) and the
autoencoder latent are concatenated, so an image costs (H/32)(W/32) tokens whatever the branch.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import EMMAConfig
from .layers import sincos_2d, sinusoidal_embedding


class FusedAdapter(nn.Module):
    """LN(fused) -> Linear -> GELU -> Linear(hidden), plus the fixed 2D sin-cos positions."""

    def __init__(self, cfg: EMMAConfig):
        super().__init__()
        self.hidden = cfg.llm.hidden_size
        self.norm = nn.LayerNorm(cfg.fused_dim, eps=1e-6)
        self.fc1 = nn.Linear(cfg.fused_dim, cfg.adapter_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(cfg.adapter_hidden, cfg.llm.hidden_size)

    def forward(self, und_features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """und_features (B, h, w, 4*Cv); latents (B, C, h, w), scaled. Returns (B, h*w, hidden)."""
        B, h, w, _ = und_features.shape
        fused = torch.cat([und_features, latents.permute(0, 2, 3, 1)], dim=-1).reshape(B, h * w, -1)
        x = self.fc2(self.act(self.fc1(self.norm(fused))))
        return x + sincos_2d(h, w, self.hidden, device=x.device).to(x.dtype)[None]


class TimestepEmbedding(nn.Module):
    def __init__(self, cfg: EMMAConfig):
        super().__init__()
        self.freq_dim = cfg.timestep_freq_dim
        self.scale = cfg.timestep_scale
        self.linear_1 = nn.Linear(cfg.timestep_freq_dim, cfg.llm.hidden_size)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(cfg.llm.hidden_size, cfg.llm.hidden_size)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t (B,) in [0, 1] (1 = pure noise) -> (B, hidden)."""
        emb = sinusoidal_embedding(t * self.scale, self.freq_dim).to(self.linear_1.weight.dtype)
        return self.linear_2(self.act(self.linear_1(emb)))


class GenAdapter(nn.Module):
    """The Gen branch's adapter: the fused adapter plus the timestep embedding added to every token."""

    def __init__(self, cfg: EMMAConfig):
        super().__init__()
        self.fused = FusedAdapter(cfg)
        self.timestep = TimestepEmbedding(cfg)

    def forward(self, und_features: torch.Tensor, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        x = self.fused(und_features, latents)
        return x + self.timestep(timestep).to(x.dtype)[:, None, :]
