"""Component names: the one registry both sides read (the runtime owns the manifest schema, so the
names live beside it; the exporter's component classes take theirs from here).

The understanding encoder has ``num_experts`` experts, one graph each: ``expert(i)``.
"""

from __future__ import annotations

AE_ENCODER = "ae_encoder"
AE_DECODER = "ae_decoder"
UND_TRUNK = "und_trunk"  # trunk + router
UND_ADAPTER = "und_adapter"
GEN_ADAPTER = "gen_adapter"  # with the timestep embedding
EMBED_TOKENS = "embed_tokens"
BACKBONE_UND = "backbone_und"
BACKBONE_GEN = "backbone_gen"
LM_HEAD = "lm_head"
GEN_HEAD = "gen_head"
_EXPERT = "und_expert_"

FIXED = (AE_ENCODER, AE_DECODER, UND_TRUNK, UND_ADAPTER, GEN_ADAPTER, EMBED_TOKENS, BACKBONE_UND, BACKBONE_GEN, LM_HEAD, GEN_HEAD)
BACKBONES = (BACKBONE_UND, BACKBONE_GEN)


def expert(i: int) -> str:
    return f"{_EXPERT}{i}"


def is_expert(name: str) -> bool:
    return name.startswith(_EXPERT) and name[len(_EXPERT):].isdigit()


def backbone(branch: str) -> str:
    """The backbone graph of a branch ("und" or "gen")."""
    return {"und": BACKBONE_UND, "gen": BACKBONE_GEN}[branch]


def required(num_experts: int) -> tuple[str, ...]:
    """Every component a bundle of a model with ``num_experts`` experts must have."""
    return FIXED + tuple(expert(i) for i in range(num_experts))
