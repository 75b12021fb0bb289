"""Where every upstream weight goes in the EMMA state dict: the one documented key map.

Three upstream checkpoints initialise EMMA (``emma-export init``, the conformance checks). Per source,
upstream key -> EMMA key(s):

Qwen3 (``llm``; layers ``i < shared_layers`` are the shallow, shared-Q/K ones)::

    model.embed_tokens.weight                      -> llm.embed_tokens.weight   (also the tied LM head)
    model.norm.weight                              -> lm_head.norm.weight
    lm_head.weight                                 -> none: absent, or equal to the embedding (checked)
    model.layers.i.self_attn.{q,k}_proj.weight     -> llm.layers.i.self_attn.{q,k}_proj.shared.weight   (shallow)
    model.layers.i.self_attn.{q,k}_norm.weight     -> llm.layers.i.self_attn.{q,k}_norm.shared.weight   (shallow)
                                                      llm.layers.i.self_attn.{q,k}_{proj,norm}.{und,gen}.weight (deep)
    model.layers.i.self_attn.{v,o}_proj.weight     -> llm.layers.i.self_attn.{v,o}_proj.{und,gen}.weight
    model.layers.i.input_layernorm.weight          -> llm.layers.i.input_layernorm.{und,gen}.weight
    model.layers.i.post_attention_layernorm.weight -> llm.layers.i.post_attention_layernorm.{und,gen}.weight
    model.layers.i.mlp.{gate,up,down}_proj.weight  -> llm.layers.i.mlp.{und,gen}.{gate,up,down}_proj.weight

SigLIP (``vision``; ``vision_model.`` prefix optional; the mapping of ``model/vision.py``)::

    vision_model.embeddings.*                      -> vision.trunk.embeddings.*
    vision_model.encoder.layers.i.*                -> vision.trunk.layers.i.*                     (i < trunk_layers)
    vision_model.encoder.layers.i.*                -> vision.experts.{0..E-1}.layers.(i - trunk).*   (the last layers)
    vision_model.post_layernorm.*                  -> vision.experts.{0..E-1}.post_layernorm.*

DC-AE (``ae``)::

    encoder.* / decoder.*                          -> ae.encoder.* / ae.decoder.*   (same names)

Qwen3 has ``shared_layers + decoupled_layers`` layers (Qwen3-4B: 36 = 18 + 18). Both branches of every
layer start from the same upstream layer [P]; the shallow layers' shared Q/K (and q/k norms) too.
Both understanding experts start from the upstream ViT's last ``expert_layers`` layers.

Upstream tensors EMMA does not use are *documented drops* (:data:`DROPPED`), reported by ``init``:
RoPE tables (recomputed from ``rope_theta``), the tied ``lm_head.weight``, SigLIP's position-id buffer,
its attention-pooling head and, for a full ``SiglipModel`` folder, its text tower and logit scale/bias.
Any other upstream key is an error.

EMMA tensors with no upstream source are *fresh* (:data:`FRESH_PREFIXES`): the Und and Gen adapters
(the timestep MLP included), the Gen head and the expert router. Any other uncovered EMMA tensor is
an error. :func:`build_plan` enforces both directions and raises naming the first offending key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch

from ..config import EMMAConfig, LLMConfig, VisionConfig

__all__ = [
    "SOURCES",
    "FRESH_PREFIXES",
    "DROPPED",
    "KeyMapError",
    "Mapped",
    "Dropped",
    "KeyPlan",
    "is_fresh",
    "drop_reason",
    "map_qwen3_key",
    "map_siglip_key",
    "map_dcae_key",
    "map_upstream_key",
    "expected_upstream_keys",
    "emma_shapes",
    "build_plan",
]

SOURCES = ("llm", "vision", "ae")
SOURCE_NAMES = {"llm": "Qwen3 (--llm)", "vision": "SigLIP (--vision)", "ae": "DC-AE (--ae)"}

#: EMMA tensors that no upstream checkpoint provides; ``init`` draws them with ``weights.init.init_tensor``
#: (Gen head projection zero).
FRESH_PREFIXES: tuple[str, ...] = (
    "und_adapter.",  # Und adapter: LN -> Linear -> GELU -> Linear
    "gen_adapter.",  # Gen adapter, its timestep MLP included (gen_adapter.timestep.*)
    "gen_head.",  # final RMSNorm + Linear(hidden -> latent channels), projection zero [G]
    "vision.trunk.router.",  # per-image top-1 expert router
)

#: Upstream tensors EMMA deliberately does not use: (source, regex on the key, reason).
DROPPED: tuple[tuple[str, str, str], ...] = (
    ("llm", r"(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq", "RoPE frequency table, recomputed from rope_theta"),
    ("llm", r"lm_head\.weight", "tied to model.embed_tokens.weight (checked equal)"),
    ("vision", r"(vision_model\.)?embeddings\.position_ids", "position-id buffer, recomputed"),
    ("vision", r"(vision_model\.)?head\..+", "SigLIP attention-pooling head: EMMA uses the patch tokens"),
    ("vision", r"text_model\..+", "SigLIP text tower (full SiglipModel folder): not part of EMMA"),
    ("vision", r"logit_(scale|bias)", "SigLIP contrastive logit scale/bias: not part of EMMA"),
)
_DROPPED_RE = [(s, re.compile(p), r) for s, p, r in DROPPED]


class KeyMapError(ValueError):
    """An upstream key with no place in EMMA, or an EMMA tensor with no source; names the key."""


def is_fresh(emma_key: str) -> bool:
    return emma_key.startswith(FRESH_PREFIXES)


def drop_reason(source: str, key: str) -> str | None:
    """Why the upstream ``key`` is deliberately unused, or None when it must be mapped."""
    for s, rx, reason in _DROPPED_RE:
        if s == source and rx.fullmatch(key):
            return reason
    return None


# ---- Qwen3 -> llm.* / lm_head.* ---------------------------------------------------------------------

_QWEN3_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
# upstream suffix -> (EMMA module path, leaf under the branch wrapper, shared-in-shallow-layers)
_QWEN3_LAYER_PARAMS: dict[str, tuple[str, str, bool]] = {
    "self_attn.q_proj.weight": ("self_attn.q_proj", "weight", True),
    "self_attn.k_proj.weight": ("self_attn.k_proj", "weight", True),
    "self_attn.q_norm.weight": ("self_attn.q_norm", "weight", True),
    "self_attn.k_norm.weight": ("self_attn.k_norm", "weight", True),
    "self_attn.v_proj.weight": ("self_attn.v_proj", "weight", False),
    "self_attn.o_proj.weight": ("self_attn.o_proj", "weight", False),
    "input_layernorm.weight": ("input_layernorm", "weight", False),
    "post_attention_layernorm.weight": ("post_attention_layernorm", "weight", False),
    "mlp.gate_proj.weight": ("mlp", "gate_proj.weight", False),
    "mlp.up_proj.weight": ("mlp", "up_proj.weight", False),
    "mlp.down_proj.weight": ("mlp", "down_proj.weight", False),
}


def map_qwen3_key(key: str, cfg: LLMConfig) -> list[str]:
    """EMMA keys initialised from the Qwen3 tensor ``key`` ([] for a documented drop)."""
    if drop_reason("llm", key) is not None:
        return []
    if key == "model.embed_tokens.weight":
        return ["llm.embed_tokens.weight"]
    if key == "model.norm.weight":
        return ["lm_head.norm.weight"]
    m = _QWEN3_LAYER.fullmatch(key)
    if m and m.group(2) in _QWEN3_LAYER_PARAMS:
        i = int(m.group(1))
        if i >= cfg.num_hidden_layers:
            raise KeyMapError(
                f"Qwen3 key {key!r}: layer {i} does not exist in EMMA "
                f"(shared_layers {cfg.shared_layers} + decoupled_layers {cfg.decoupled_layers})"
            )
        module, leaf, shared_in_shallow = _QWEN3_LAYER_PARAMS[m.group(2)]
        if shared_in_shallow and i < cfg.shared_layers:
            return [f"llm.layers.{i}.{module}.shared.{leaf}"]
        return [f"llm.layers.{i}.{module}.{b}.{leaf}" for b in ("und", "gen")]
    raise KeyMapError(f"Qwen3 key {key!r} has no place in EMMA (unsupported upstream tensor)")


def _qwen3_keys(cfg: LLMConfig) -> list[str]:
    keys = ["model.embed_tokens.weight"]
    for i in range(cfg.num_hidden_layers):
        keys += [f"model.layers.{i}.{p}" for p in _QWEN3_LAYER_PARAMS]
    keys.append("model.norm.weight")
    return keys


# ---- SigLIP -> vision.* (the mapping of model/vision.py) ---------------------------------------------


def _siglip_table(cfg: VisionConfig) -> dict[str, list[str]]:
    """SigLIP key without ``vision_model.`` -> EMMA keys, from :func:`model.vision._siglip_targets`."""
    from ..model.vision import UnderstandingEncoder, _siglip_targets

    with torch.device("meta"):
        enc = UnderstandingEncoder(cfg)
    names = {id(p): n for n, p in enc.named_parameters()}
    return {k: [f"vision.{names[id(p)]}" for p in params] for k, params in _siglip_targets(enc).items()}


_SIGLIP_CACHE: dict[VisionConfig, dict[str, list[str]]] = {}


def _siglip(cfg: VisionConfig) -> dict[str, list[str]]:
    if cfg not in _SIGLIP_CACHE:
        _SIGLIP_CACHE[cfg] = _siglip_table(cfg)
    return _SIGLIP_CACHE[cfg]


def map_siglip_key(key: str, cfg: VisionConfig) -> list[str]:
    """EMMA keys initialised from the SigLIP tensor ``key`` (with or without ``vision_model.``)."""
    if drop_reason("vision", key) is not None:
        return []
    k = key[len("vision_model."):] if key.startswith("vision_model.") else key
    table = _siglip(cfg)
    if k not in table:
        raise KeyMapError(f"SigLIP key {key!r} has no place in EMMA (unsupported upstream tensor)")
    return list(table[k])


def _siglip_keys(cfg: VisionConfig) -> list[str]:
    return [f"vision_model.{k}" for k in _siglip(cfg)]


# ---- DC-AE -> ae.* --------------------------------------------------------------------------------


def map_dcae_key(key: str) -> list[str]:
    """DC-AE tensors keep their names under ``ae.`` (EMMA's Autoencoder mirrors AutoencoderDC)."""
    if key.startswith(("encoder.", "decoder.")):
        return [f"ae.{key}"]
    raise KeyMapError(f"DC-AE key {key!r} has no place in EMMA (unsupported upstream tensor)")


# ---- dispatch -------------------------------------------------------------------------------------


def map_upstream_key(source: str, key: str, cfg: EMMAConfig) -> list[str]:
    if source == "llm":
        return map_qwen3_key(key, cfg.llm)
    if source == "vision":
        return map_siglip_key(key, cfg.vision)
    if source == "ae":
        return map_dcae_key(key)
    raise ValueError(f"unknown upstream source {source!r}; expected one of {SOURCES}")


def emma_shapes(cfg: EMMAConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of EMMA's state dict with its shape, from a meta-device model (no memory)."""
    from ..model.emma import EMMA

    with torch.device("meta"):
        model = EMMA(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def expected_upstream_keys(cfg: EMMAConfig, emma_keys: Iterable[str] | None = None) -> dict[str, list[str]]:
    """The upstream keys EMMA needs, per source (the DC-AE ones read off EMMA's own ``ae.*`` names)."""
    if emma_keys is None:
        emma_keys = emma_shapes(cfg)
    return {
        "llm": _qwen3_keys(cfg.llm),
        "vision": _siglip_keys(cfg.vision),
        "ae": [k[len("ae."):] for k in emma_keys if k.startswith("ae.")],
    }


# ---- the plan -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mapped:
    source: str
    key: str
    targets: tuple[str, ...]


@dataclass(frozen=True)
class Dropped:
    source: str
    key: str
    reason: str


@dataclass
class KeyPlan:
    """Every upstream tensor (mapped or dropped) and every fresh EMMA tensor, in a stable order."""

    mapped: list[Mapped] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)

    def sources(self) -> dict[str, tuple[str, str]]:
        """EMMA key -> (source, upstream key) for every mapped EMMA tensor."""
        return {t: (m.source, m.key) for m in self.mapped for t in m.targets}

    def summary(self) -> dict[str, int]:
        return {
            "upstream_mapped": len(self.mapped),
            "emma_from_upstream": sum(len(m.targets) for m in self.mapped),
            "emma_fresh": len(self.fresh),
            "upstream_dropped": len(self.dropped),
        }


def build_plan(
    cfg: EMMAConfig,
    upstream: Mapping[str, Mapping[str, tuple[int, ...]]],
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> KeyPlan:
    """Map every upstream tensor and check coverage both ways.

    ``upstream``: source (``llm``/``vision``/``ae``) -> {upstream key: shape}. ``shapes``: EMMA key -> shape
    (default: :func:`emma_shapes`). Raises :class:`KeyMapError` naming the first upstream key with no
    place in EMMA, target mapped twice, shape mismatch, or EMMA tensor neither covered nor fresh.
    """
    if shapes is None:
        shapes = emma_shapes(cfg)
    missing_sources = [s for s in SOURCES if s not in upstream]
    if missing_sources:
        raise ValueError(f"no upstream keys given for {missing_sources}")
    plan = KeyPlan()
    owner: dict[str, tuple[str, str]] = {}
    for source in SOURCES:
        for key, shape in upstream[source].items():
            targets = map_upstream_key(source, key, cfg)
            if not targets:
                plan.dropped.append(Dropped(source, key, drop_reason(source, key) or "unused"))
                continue
            for t in targets:
                if t not in shapes:
                    raise KeyMapError(
                        f"{SOURCE_NAMES[source]} key {key!r} maps to {t!r}, which EMMA (config {cfg.name}) has no tensor for"
                    )
                if is_fresh(t):
                    raise KeyMapError(f"{SOURCE_NAMES[source]} key {key!r} maps to fresh EMMA tensor {t!r}")
                if t in owner:
                    raise KeyMapError(
                        f"EMMA tensor {t!r} is mapped twice: from {owner[t][0]} {owner[t][1]!r} and {source} {key!r}"
                    )
                if tuple(shape) != tuple(shapes[t]):
                    raise KeyMapError(
                        f"{SOURCE_NAMES[source]} key {key!r} has shape {tuple(shape)}, "
                        f"EMMA tensor {t!r} expects {tuple(shapes[t])}"
                    )
                owner[t] = (source, key)
            plan.mapped.append(Mapped(source, key, tuple(targets)))
    expected = None
    for k in shapes:
        if k in owner:
            continue
        if is_fresh(k):
            plan.fresh.append(k)
            continue
        if expected is None:
            expected = {t: (s, u) for s, keys in expected_upstream_keys(cfg, shapes).items()
                        for u in keys for t in _safe_map(s, u, cfg)}
        if k in expected:
            s, u = expected[k]
            raise KeyMapError(f"EMMA tensor {k!r} is not covered: {SOURCE_NAMES[s]} has no tensor {u!r}")
        raise KeyMapError(f"EMMA tensor {k!r} has no upstream source and is not a fresh tensor")
    return plan


def _safe_map(source: str, key: str, cfg: EMMAConfig) -> list[str]:
    try:
        return map_upstream_key(source, key, cfg)
    except KeyMapError:
        return []
