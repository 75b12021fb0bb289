"""Task heads: the tied LM head and the flow-matching velocity (Gen) head."""

from __future__ import annotations

import torch
from torch import nn

from ..config import EMMAConfig
from .layers import RMSNorm


class LMHead(nn.Module):
    """Final RMSNorm + projection onto the vocabulary; the weight is the token embedding (tied)."""

    def __init__(self, cfg: EMMAConfig, embedding: nn.Embedding):
        super().__init__()
        self.norm = RMSNorm(cfg.llm.hidden_size, cfg.llm.rms_norm_eps)
        self.embedding = [embedding]  # a list, so the tied weight is registered once (in the backbone)

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding[0].weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.norm(hidden), self.weight)


class GenHead(nn.Module):
    """Final RMSNorm + Linear(hidden -> latent channels), zero-initialised so training starts at v = 0."""

    def __init__(self, cfg: EMMAConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.llm.hidden_size, cfg.llm.rms_norm_eps)
        self.proj = nn.Linear(cfg.llm.hidden_size, cfg.ae.latent_channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, L, hidden) -> velocity (B, L, C) in token order."""
        return self.proj(self.norm(hidden))
