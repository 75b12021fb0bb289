"""EMMA assembled: autoencoder, understanding encoder, adapters, backbone and heads."""

from __future__ import annotations

import torch
from torch import nn

from ..config import EMMAConfig
from .adapters import FusedAdapter, GenAdapter
from .autoencoder import Autoencoder
from .backbone import GEN, UND, Backbone
from .heads import GenHead, LMHead
from .vision import UnderstandingEncoder


class EMMA(nn.Module):
    def __init__(self, cfg: EMMAConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.ae = Autoencoder(cfg.ae)
        self.vision = UnderstandingEncoder(cfg.vision)
        self.und_adapter = FusedAdapter(cfg)
        self.gen_adapter = GenAdapter(cfg)
        self.llm = Backbone(cfg.llm)
        self.lm_head = LMHead(cfg, self.llm.embed_tokens)
        self.gen_head = GenHead(cfg)

    # ---- image tokens ---------------------------------------------------------------------------
    def und_image_tokens(self, image: torch.Tensor, expert: int | None = None):
        """Understanding input: fused (und features + clean latent) through the Und adapter.
        Returns (tokens (B, L, hidden), chosen expert (B,))."""
        feats, chosen = self.vision(image, expert=expert)
        return self.und_adapter(feats, self.ae.encode(image)), chosen

    def reference_tokens(self, image: torch.Tensor, branch: str = "gen") -> torch.Tensor:
        """Editing reference: fused features and clean latent; timestep 0 on the Gen branch."""
        feats, _ = self.vision(image, expert=0)
        latents = self.ae.encode(image)
        if branch == "und":
            return self.und_adapter(feats, latents)
        t = torch.zeros(image.shape[0], dtype=image.dtype, device=image.device)
        return self.gen_adapter(feats, latents, t)

    def target_tokens(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Noisy target: no understanding features exist for noise, so that slice is zero."""
        B, _, h, w = latents.shape
        zeros = latents.new_zeros(B, h, w, self.cfg.vision.feature_dim)
        return self.gen_adapter(zeros, latents, t)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.embed_tokens(ids)


def build_model(cfg: EMMAConfig, seed: int = 0, zero_gen_head: bool = False) -> EMMA:
    """Deterministic random initialisation (the same weights for the same config and seed).

    Every tensor is drawn from (seed, its name) alone (``weights/init.py``), so a component
    materialised on its own gets the same weights as in the whole model. The paper starts training
    from a zero Gen head (``zero_gen_head=True``, what ``init`` does); a random-weight model for
    parity work keeps a random head, since with v = 0 an image comparison proves nothing.
    """
    from ..weights.init import materialize

    with torch.device("meta"):
        model = EMMA(cfg)
    return materialize(model, seed, zero_gen_head=zero_gen_head).eval()


__all__ = ["EMMA", "build_model", "UND", "GEN"]
