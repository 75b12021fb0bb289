"""One class per exported EMMA component: its IO (names, dtypes, symbolic shapes), the module to
trace, sample inputs at any concrete shape, the shapes verify checks, and the TensorRT profile.

Export, verify, quantize, build and the bundle manifest all read these declarations, so a tensor
is named and shaped in exactly one place.

Layout decisions (the runtime relies on them):
- Images are NCHW float in [-1, 1]; latents are the autoencoder's *scaled* latents (B, C, h, w).
- The KV cache is layer-major and, per layer, batch-major: ``(batch, kv_heads, capacity, head_dim)``,
  each row's positions left-aligned (a row's length is how many it holds). Every layer's keys and
  values are their own graph input (``past_key_i``), a whole per-layer buffer, so no graph splits,
  transposes or copies the past. Standard graphs emit the chunk's keys/values (``new_key_i``, the
  runtime writes them at each row's length); ``gqa`` graphs (ONNX Runtime's GroupQueryAttention, the
  fused flavour for ONNX Runtime targets) write them into the bound buffer themselves.
- Standard backbone graphs take an explicit boolean ``attention_mask`` (batch, seq, past + seq): the
  runtime builds it with EMMA's mask rule, so padding and both chunk kinds (causal text,
  bidirectional image) need no extra graph. A ``gqa`` graph is causal by construction and takes each
  row's length instead (``seqlens_k``): it is built only for a branch whose chunks are all causal.
- The token embedding is a graph (a Gather) so the embedding can stay on the device; the tied LM
  head graph reads the same matrix, stored once in the bundle (``export/tied_embedding.py``) where
  both hold the same bytes (each session still holds its own copy in memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from emma_runtime import names

from .config import EMMAConfig
from .model.backbone import GEN, UND

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, int64, bool
    shape: tuple[Dim, ...]

    def concrete(self, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else dims[d] for d in self.shape)

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def image_dims(cfg: EMMAConfig, batch: int, height: int, width: int) -> dict[str, int]:
    gh, gw = cfg.grid(height, width)
    p = cfg.vision.patch_size
    return {"batch": batch, "height": height, "width": width, "grid_h": gh, "grid_w": gw,
            "patch_h": height // p, "patch_w": width // p, "tokens": gh * gw}


class Component:
    """Base: subclasses declare IO and the module; the helpers below derive the rest."""

    name: str = ""
    #: state-dict keys of the full EMMA model that this component reads
    def uses(self, key: str) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def inputs(self, cfg: EMMAConfig) -> list[TensorSpec]:
        raise NotImplementedError

    def outputs(self, cfg: EMMAConfig) -> list[TensorSpec]:
        raise NotImplementedError

    def module(self, model) -> nn.Module:
        raise NotImplementedError

    def export_dims(self, cfg: EMMAConfig) -> dict[str, int]:
        """Concrete sizes to trace at: every dynamic dim >= 2 and distinct, so no size is baked in."""
        raise NotImplementedError

    def verify_dims(self, cfg: EMMAConfig) -> list[dict[str, int]]:
        """Two or more shapes per dynamic axis for parity checks."""
        raise NotImplementedError

    def profile(self, cfg: EMMAConfig) -> dict[str, tuple[int, int, int]]:
        """(min, opt, max) per symbol for TensorRT optimization profiles."""
        raise NotImplementedError

    def sample_inputs(self, cfg: EMMAConfig, dims: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        out = {}
        for spec in self.inputs(cfg):
            shape = spec.concrete(dims)
            if spec.dtype == "float32":
                out[spec.name] = rng.standard_normal(shape).astype(np.float32)
            elif spec.dtype == "int64":
                out[spec.name] = rng.integers(0, cfg.llm.vocab_size, size=shape).astype(np.int64)
            elif spec.dtype == "bool":
                out[spec.name] = np.ones(shape, dtype=bool)
            elif spec.dtype == "int32":
                out[spec.name] = np.zeros(shape, dtype=np.int32)
        return out

    def from_captured(self, cfg: EMMAConfig, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Feeds captured from the reference pipelines (calibration, verify's real feeds) as this graph
        takes them: captures are in the standard graphs' IO."""
        return feeds

    def dynamic_axes(self, cfg: EMMAConfig) -> dict[str, dict[int, str]]:
        axes = {}
        for spec in self.inputs(cfg) + self.outputs(cfg):
            d = {i: s for i, s in enumerate(spec.shape) if isinstance(s, str)}
            if d:
                axes[spec.name] = d
        return axes


# ---- image components -------------------------------------------------------------------------

class _ImageComponent(Component):
    def export_dims(self, cfg):
        c = cfg.cell
        return image_dims(cfg, 2, 3 * c, 2 * c)

    def verify_dims(self, cfg):
        c = cfg.cell
        return [image_dims(cfg, 1, 2 * c, 2 * c), image_dims(cfg, 2, 4 * c, 3 * c)]

    def profile(self, cfg):
        c = cfg.cell
        big = max(cfg.image_size * 2, 4 * c)
        d_min, d_opt, d_max = image_dims(cfg, 1, c, c), image_dims(cfg, 1, cfg.image_size, cfg.image_size), image_dims(cfg, 4, big, big)
        return {k: (d_min[k], d_opt[k], d_max[k]) for k in d_min}

    def sample_inputs(self, cfg, dims, rng):
        out = super().sample_inputs(cfg, dims, rng)
        for spec in self.inputs(cfg):
            if spec.name in ("image", "pixel_values"):
                out[spec.name] = rng.uniform(-1, 1, spec.concrete(dims)).astype(np.float32)
        return out


class AEEncoder(_ImageComponent):
    name = names.AE_ENCODER

    def uses(self, key):
        return key.startswith("ae.encoder.")

    def inputs(self, cfg):
        return [TensorSpec("image", "float32", ("batch", 3, "height", "width"))]

    def outputs(self, cfg):
        return [TensorSpec("latents", "float32", ("batch", cfg.ae.latent_channels, "grid_h", "grid_w"))]

    def module(self, model):
        return _Call(lambda image: model.ae.encode(image), model)


class AEDecoder(_ImageComponent):
    name = names.AE_DECODER

    def uses(self, key):
        return key.startswith("ae.decoder.")

    def inputs(self, cfg):
        return [TensorSpec("latents", "float32", ("batch", cfg.ae.latent_channels, "grid_h", "grid_w"))]

    def outputs(self, cfg):
        return [TensorSpec("image", "float32", ("batch", 3, "height", "width"))]

    def module(self, model):
        return _Call(lambda latents: model.ae.decode(latents), model)


class UndTrunk(_ImageComponent):
    name = names.UND_TRUNK

    def uses(self, key):
        return key.startswith("vision.trunk.")

    def inputs(self, cfg):
        return [TensorSpec("pixel_values", "float32", ("batch", 3, "height", "width"))]

    def outputs(self, cfg):
        return [
            TensorSpec("trunk_hidden", "float32", ("batch", "patch_h", "patch_w", cfg.vision.hidden_size)),
            TensorSpec("router_logits", "float32", ("batch", cfg.vision.num_experts)),
        ]

    def module(self, model):
        return _Call(lambda pixel_values: model.vision.trunk(pixel_values), model)


class UndExpert(_ImageComponent):
    def __init__(self, index: int):
        self.index = index
        self.name = names.expert(index)

    def uses(self, key):
        return key.startswith(f"vision.experts.{self.index}.")

    def inputs(self, cfg):
        return [TensorSpec("trunk_hidden", "float32", ("batch", "patch_h", "patch_w", cfg.vision.hidden_size))]

    def outputs(self, cfg):
        return [TensorSpec("und_features", "float32", ("batch", "grid_h", "grid_w", cfg.vision.feature_dim))]

    def module(self, model):
        expert = model.vision.experts[self.index]
        return _Call(lambda trunk_hidden: expert(trunk_hidden), model)


class UndAdapter(_ImageComponent):
    name = names.UND_ADAPTER

    def uses(self, key):
        return key.startswith("und_adapter.")

    def inputs(self, cfg):
        return [
            TensorSpec("und_features", "float32", ("batch", "grid_h", "grid_w", cfg.vision.feature_dim)),
            TensorSpec("latents", "float32", ("batch", cfg.ae.latent_channels, "grid_h", "grid_w")),
        ]

    def outputs(self, cfg):
        return [TensorSpec("image_embeds", "float32", ("batch", "tokens", cfg.llm.hidden_size))]

    def module(self, model):
        return _Call(lambda und_features, latents: model.und_adapter(und_features, latents), model)


class GenAdapter(UndAdapter):
    name = names.GEN_ADAPTER

    def uses(self, key):
        return key.startswith("gen_adapter.")

    def inputs(self, cfg):
        return super().inputs(cfg) + [TensorSpec("timestep", "float32", ("batch",))]

    def module(self, model):
        return _Call(lambda und_features, latents, timestep: model.gen_adapter(und_features, latents, timestep), model)

    def sample_inputs(self, cfg, dims, rng):
        out = super().sample_inputs(cfg, dims, rng)
        out["timestep"] = rng.uniform(0, 1, (dims["batch"],)).astype(np.float32)
        return out


# ---- sequence components ----------------------------------------------------------------------

class _SeqComponent(Component):
    def export_dims(self, cfg):
        return {"batch": 2, "seq": 5, "past": 3, "total": 8}

    def verify_dims(self, cfg):
        return [
            {"batch": 1, "seq": 1, "past": 0, "total": 1},
            {"batch": 1, "seq": 37, "past": 19, "total": 56},
            {"batch": 2, "seq": 1, "past": 19, "total": 20},
            {"batch": 2, "seq": 7, "past": 0, "total": 7},
        ]

    def profile(self, cfg):
        ctx = cfg.max_context
        return {"batch": (1, 1, 4), "seq": (1, 64, ctx), "past": (0, 256, ctx), "total": (1, 320, 2 * ctx)}


class EmbedTokens(_SeqComponent):
    name = names.EMBED_TOKENS

    def uses(self, key):
        return key.startswith("llm.embed_tokens.")

    def inputs(self, cfg):
        return [TensorSpec("input_ids", "int64", ("batch", "seq"))]

    def outputs(self, cfg):
        return [TensorSpec("inputs_embeds", "float32", ("batch", "seq", cfg.llm.hidden_size))]

    def module(self, model):
        return _Call(lambda input_ids: model.llm.embed_tokens(input_ids), model)


class LMHead(_SeqComponent):
    name = names.LM_HEAD

    def uses(self, key):
        return key.startswith(("lm_head.", "llm.embed_tokens."))

    def inputs(self, cfg):
        return [TensorSpec("hidden_states", "float32", ("batch", "seq", cfg.llm.hidden_size))]

    def outputs(self, cfg):
        return [TensorSpec("logits", "float32", ("batch", "seq", cfg.llm.vocab_size))]

    def module(self, model):
        return _Call(lambda hidden_states: model.lm_head(hidden_states), model)


class GenHead(LMHead):
    name = names.GEN_HEAD

    def uses(self, key):
        return key.startswith("gen_head.")

    def outputs(self, cfg):
        return [TensorSpec("velocity", "float32", ("batch", "seq", cfg.ae.latent_channels))]

    def module(self, model):
        return _Call(lambda hidden_states: model.gen_head(hidden_states), model)


class Backbone(_SeqComponent):
    """All LLM layers for one branch's tokens, attending to the KV cache of everything before."""

    attention = names.ATTENTION_STANDARD

    def __init__(self, branch: int):
        self.branch = branch
        self.name = names.backbone("und" if branch == UND else "gen")

    def uses(self, key):
        other = ".gen." if self.branch == UND else ".und."
        return key.startswith("llm.layers.") and other not in key

    def _kv(self, cfg, pair, length: str) -> list[TensorSpec]:
        l = cfg.llm
        shape = ("batch", l.num_key_value_heads, length, l.head_dim)
        return [TensorSpec(n, "float32", shape) for i in range(l.num_hidden_layers) for n in pair(i)]

    def inputs(self, cfg):
        l = cfg.llm
        return [
            TensorSpec("inputs_embeds", "float32", ("batch", "seq", l.hidden_size)),
            TensorSpec("position_ids", "int64", ("batch", "seq")),
            TensorSpec("attention_mask", "bool", ("batch", "seq", "total")),
            *self._kv(cfg, names.past_kv, "past"),
        ]

    def outputs(self, cfg):
        return [TensorSpec("hidden_states", "float32", ("batch", "seq", cfg.llm.hidden_size)), *self._kv(cfg, names.new_kv, "seq")]

    def module(self, model):
        return _BackboneModule(model.llm, self.branch)

    def sample_inputs(self, cfg, dims, rng):
        out = super().sample_inputs(cfg, dims, rng)
        B, S, P = dims["batch"], dims["seq"], dims["past"]
        # Cached keys/values at the scale real ones have (post-norm, post-RoPE: O(1) entries).
        for i in range(cfg.llm.num_hidden_layers):
            k, v = names.past_kv(i)
            out[k] = rng.standard_normal(out[k].shape).astype(np.float32)
            out[v] = (0.05 * rng.standard_normal(out[v].shape)).astype(np.float32)
        out["inputs_embeds"] = (0.05 * rng.standard_normal(out["inputs_embeds"].shape)).astype(np.float32)
        out["position_ids"] = np.broadcast_to(np.arange(P, P + S, dtype=np.int64), (B, S)).copy()
        causal = self.branch == UND
        inner = np.tril(np.ones((S, S), dtype=bool)) if causal else np.ones((S, S), dtype=bool)
        mask = np.concatenate([np.ones((S, P), dtype=bool), inner], axis=1)
        mask = np.broadcast_to(mask, (B, S, P + S)).copy()
        if B > 1 and P > 2:
            mask[1, :, P - 2 : P] = False  # a shorter row: its cache holds fewer positions (left-aligned)
            out["position_ids"][1] -= 2
        out["attention_mask"] = mask
        return out


class GQABackbone(Backbone):
    """The Und backbone as ONNX Runtime's GroupQueryAttention runs it (the fused flavour for ONNX
    Runtime targets): each layer's cache buffer is bound as both ``past_key_i`` and ``present_key_i``
    and the operator writes the chunk's keys/values at each row's length and reads only up to it, so
    a decode step touches the weights, the new token and each row's real past, nothing else.

    Causal only (the operator's mask is causal plus each row's length), so it is built only for the
    Und branch of models whose Und chunks are all causal (``reference_branch`` "gen").
    Rows: one chunk per row at its own length, except that a batch of rows with S > 1 tokens must
    start from an empty cache (right-padded prefill, rows of different lengths)."""

    attention = names.ATTENTION_GQA

    def __init__(self):
        super().__init__(UND)

    def inputs(self, cfg):
        l = cfg.llm
        return [
            TensorSpec("inputs_embeds", "float32", ("batch", "seq", l.hidden_size)),
            TensorSpec(names.SEQLENS_K, "int32", ("batch",)),
            TensorSpec(names.TOTAL_SEQUENCE_LENGTH, "int32", ()),
            *self._kv(cfg, names.past_kv, "capacity"),
        ]

    def outputs(self, cfg):
        return [TensorSpec("hidden_states", "float32", ("batch", "seq", cfg.llm.hidden_size)), *self._kv(cfg, names.present_kv, "capacity")]

    def module(self, model):
        from .export.gqa import GQABackboneModule

        return GQABackboneModule(model.llm, model.cfg.max_context)

    def export_dims(self, cfg):
        return {"batch": 2, "seq": 5, "capacity": 11}

    def verify_dims(self, cfg):
        # (batch, seq, each row's cached length): decode, a chunk after a prefix, a padded batched prefill
        return [
            {"batch": 1, "seq": 1, "capacity": 2, "lengths": (0,), "real": (1,)},
            {"batch": 1, "seq": 37, "capacity": 60, "lengths": (19,), "real": (37,)},
            {"batch": 2, "seq": 1, "capacity": 24, "lengths": (19, 12), "real": (1, 1)},
            {"batch": 2, "seq": 7, "capacity": 9, "lengths": (0, 0), "real": (7, 4)},
        ]

    def profile(self, cfg):
        ctx = cfg.max_context
        return {"batch": (1, 1, 4), "seq": (1, min(64, ctx), ctx), "capacity": (1, min(320, ctx), ctx)}

    def sample_inputs(self, cfg, dims, rng):
        l = cfg.llm
        B, S, cap = dims["batch"], dims["seq"], dims["capacity"]
        lengths = np.asarray(dims.get("lengths", [max(cap - S - 1, 0)] * B), np.int64)
        real = np.asarray(dims.get("real", [S] * B), np.int64)
        out = {"inputs_embeds": (0.05 * rng.standard_normal((B, S, l.hidden_size))).astype(np.float32),
               names.SEQLENS_K: (lengths + real - 1).astype(np.int32),
               names.TOTAL_SEQUENCE_LENGTH: np.array(int((lengths + S).max()), np.int32)}
        for i in range(l.num_hidden_layers):
            k, v = names.past_kv(i)
            out[k] = rng.standard_normal((B, l.num_key_value_heads, cap, l.head_dim)).astype(np.float32)
            out[v] = (0.05 * rng.standard_normal((B, l.num_key_value_heads, cap, l.head_dim))).astype(np.float32)
        return out

    def from_captured(self, cfg, feeds):
        return [g for g in (self.from_standard(cfg, f) for f in feeds) if g is not None]

    @staticmethod
    def from_standard(cfg, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """A standard graph's feed (calibration captures those) as this graph's, when it is one GQA can
        run: each row's past left-aligned, a causal chunk. None otherwise."""
        mask = feed["attention_mask"]
        B, S, T = mask.shape
        P = T - S
        lengths = mask[:, -1, :P].sum(axis=1).astype(np.int64)
        real = np.diagonal(mask[:, :, P:], axis1=1, axis2=2).sum(axis=1).astype(np.int64)
        if (B > 1 and S > 1 and lengths.any()) or not all(mask[b, -1, : lengths[b]].all() for b in range(B)):
            return None
        cap = P + S
        if not all((feed["position_ids"][b] == lengths[b] + np.arange(S)).all() for b in range(B)):
            return None  # the operator's RoPE positions are the slots
        out = {"inputs_embeds": feed["inputs_embeds"],
               names.SEQLENS_K: (lengths + real - 1).astype(np.int32),
               names.TOTAL_SEQUENCE_LENGTH: np.array(int(lengths.max()) + S, np.int32)}
        for i in range(cfg.llm.num_hidden_layers):
            for n in names.past_kv(i):
                a = feed[n]
                buf = np.zeros(a.shape[:2] + (cap,) + a.shape[3:], a.dtype)
                buf[:, :, :P] = a
                out[n] = buf
        return out

    @staticmethod
    def as_standard(cfg, feed: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """The same step as a standard graph's feed (what the reference module takes): each row's real
        past, the mask GroupQueryAttention applies. -> (feed, lengths, real tokens per row)."""
        S = feed["inputs_embeds"].shape[1]
        total = feed[names.SEQLENS_K].astype(np.int64) + 1
        lengths = np.maximum(total - S, 0)
        real = total - lengths
        P = int(lengths.max())
        B = len(total)
        out = {"inputs_embeds": feed["inputs_embeds"], "position_ids": (lengths[:, None] + np.arange(S)[None]).astype(np.int64)}
        for i in range(cfg.llm.num_hidden_layers):
            for n in names.past_kv(i):
                out[n] = np.ascontiguousarray(feed[n][:, :, :P])
        past = np.arange(P)[None, :] < lengths[:, None]
        inner = np.tril(np.ones((S, S), bool))[None] & (np.arange(S)[None, None, :] < real[:, None, None])
        out["attention_mask"] = np.concatenate([np.broadcast_to(past[:, None], (B, S, P)), inner], axis=2)
        return out, lengths, real


class _Call(nn.Module):
    """Wraps a closure over the model so the tracer sees a module with positional inputs."""

    def __init__(self, fn, model):
        super().__init__()
        self.fn = fn
        self.model = model

    def forward(self, *args):
        return self.fn(*args)


class _BackboneModule(nn.Module):
    def __init__(self, llm, branch: int):
        super().__init__()
        self.llm = llm
        self.branch = branch

    def forward(self, inputs_embeds, position_ids, attention_mask, *past):
        from .model.backbone import KVCache

        pk, pv = list(past[0::2]), list(past[1::2])  # per layer (B, Hk, P, hd): the reference's own layout
        hidden, new = self.llm(inputs_embeds, position_ids, self.branch, attention_mask, KVCache(pk, pv))
        return (hidden, *[t for k, v in zip(new.keys, new.values) for t in (k, v)])


def gqa_possible(cfg: EMMAConfig) -> bool:
    """Every chunk the Und backbone runs is causal (text, understanding images; an edit's reference
    goes through the Gen branch), so GroupQueryAttention's causal mask is EMMA's."""
    return cfg.reference_branch == "gen"


def all_components(cfg: EMMAConfig, attention: str = names.ATTENTION_STANDARD) -> list[Component]:
    """``attention``: the Und backbone's flavour (``gqa`` where ``gqa_possible``; the Gen backbone's
    image chunks are bidirectional, so it is always standard)."""
    if attention == names.ATTENTION_GQA and not gqa_possible(cfg):
        raise ValueError(f"config {cfg.name}: the gqa backbone needs causal Und chunks (reference_branch 'gen')")
    und = GQABackbone() if attention == names.ATTENTION_GQA else Backbone(UND)
    return [
        AEEncoder(), AEDecoder(), UndTrunk(), *[UndExpert(i) for i in range(cfg.vision.num_experts)],
        UndAdapter(), GenAdapter(), EmbedTokens(), und, Backbone(GEN), LMHead(), GenHead(),
    ]


def components_for(cfg: EMMAConfig, tasks=(), attention: str = names.ATTENTION_STANDARD) -> list[Component]:
    """The components the runtime's pipelines for ``tasks`` run (every one when ``tasks`` is empty)."""
    keep = set(names.required(cfg.vision.num_experts, tuple(tasks) or None, cfg.reference_branch))
    return [c for c in all_components(cfg, attention) if c.name in keep]


def get_component(cfg: EMMAConfig, name: str, attention: str = names.ATTENTION_STANDARD) -> Component:
    for c in all_components(cfg, attention):
        if c.name == name:
            return c
    raise KeyError(f"unknown component {name!r}")
