"""Parameter counts per component, computed on the meta device (no weights are allocated)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from emma_runtime import names

from .config import EMMAConfig
from .model.emma import EMMA


@dataclass(frozen=True)
class ModelInfo:
    config: str
    parameters: dict[str, int]  # per component
    total: int
    llm_stored: int
    llm_active_per_token: int
    visual_tokens_at_default_size: int

    def to_dict(self) -> dict:
        return asdict(self)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_info(cfg: EMMAConfig) -> ModelInfo:
    with torch.device("meta"):
        m = EMMA(cfg)
    llm_layers = _count(m.llm.layers)
    embed = _count(m.llm.embed_tokens)
    # One branch's share of the layers: shared Q/K count once, everything else per branch halves.
    shared_qk = sum(
        _count(layer.self_attn.q_proj) + _count(layer.self_attn.k_proj) + _count(layer.self_attn.q_norm) + _count(layer.self_attn.k_norm)
        for layer in m.llm.layers[: cfg.llm.shared_layers]
    )
    active = shared_qk + (llm_layers - shared_qk) // 2 + embed
    parts = {
        "ae_encoder": _count(m.ae.encoder),
        "ae_decoder": _count(m.ae.decoder),
        "und_trunk": _count(m.vision.trunk),
        **{names.expert(i): _count(e) for i, e in enumerate(m.vision.experts)},
        "und_adapter": _count(m.und_adapter),
        "gen_adapter": _count(m.gen_adapter),
        "embed_tokens": embed,
        "llm_shared_qk_layers": _count(m.llm.layers[: cfg.llm.shared_layers]),
        "llm_decoupled_layers": _count(m.llm.layers[cfg.llm.shared_layers :]),
        "lm_head_norm": _count(m.lm_head),
        "gen_head": _count(m.gen_head),
    }
    total = sum(parts.values())
    assert total == _count(m), "component split must cover every parameter once"
    return ModelInfo(
        config=cfg.name,
        parameters=parts,
        total=total,
        llm_stored=embed + llm_layers,
        llm_active_per_token=active,
        visual_tokens_at_default_size=cfg.num_visual_tokens(cfg.image_size, cfg.image_size),
    )
