"""EMMA's understanding encoder: a SigLIP ViT split into a shared trunk and per-image experts.

Data flow for pixel values of shape (B, 3, H, W) in [-1, 1], H and W multiples of 32::

    VisionTrunk:  patch conv (16x16, stride 16) + position embeddings (bicubic-resized to H/16 x W/16)
                  -> ``trunk_layers`` encoder layers
                  -> trunk_hidden grid (B, H/16, W/16, C)
                  -> router: mean over tokens -> LayerNorm -> Linear -> GELU(tanh) -> Linear -> logits (B, E)
    VisionExpert: ``expert_layers`` encoder layers -> post_layernorm   (= SigLIP ``last_hidden_state``)
                  -> 2x2 pixel shuffle -> features (B, H/32, W/32, 4C)

Top-1 routing per image: expert 0 = versatile, expert 1 = STEM. Generation and editing force expert 0.

Grid convention: tokens are the row-major flattening of the (h, w) patch grid, i.e. token ``r * w + c`` is
the patch at row ``r``, column ``c``; this is the order SigLIP uses, so ``grid.reshape(B, h * w, C)`` gives
SigLIP's token sequence.

Everything here is written for the legacy ONNX exporter (``torch.onnx.export(..., dynamo=False)``): sizes
are read from tensor shapes (the tracer records them), position embeddings are always resized (an identity
at the native grid) and attention is explicit matmul + softmax, so one graph serves every batch, H and W.
This module does not import transformers; :func:`load_siglip_state_dict` maps SiglipVisionModel weights.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from emma_export.config import VisionConfig

__all__ = [
    "VisionAttention",
    "VisionMLP",
    "VisionEncoderLayer",
    "VisionEmbeddings",
    "VisionRouter",
    "VisionTrunk",
    "VisionExpert",
    "UnderstandingEncoder",
    "pixel_shuffle2",
    "load_siglip_state_dict",
    "vision_config_from_siglip",
]

_GELU_APPROX = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu": "none"}


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def _gelu_approximation(act: str) -> str:
    try:
        return _GELU_APPROX[act]
    except KeyError:
        raise ValueError(f"unsupported vision hidden_act {act!r}; expected one of {sorted(_GELU_APPROX)}") from None


# ---- pixel shuffle --------------------------------------------------------------------------------


def _space_to_depth(grid: Tensor, r: int) -> Tensor:
    b, h, w, c = grid.shape[0], grid.shape[1], grid.shape[2], grid.shape[3]
    if not _tracing() and (h % r or w % r):
        raise ValueError(f"grid {h}x{w} is not divisible by the shuffle factor {r}")
    # (B, h/r, r, w/r, r, C) -> (B, h/r, w/r, r[row], r[col], C) -> (B, h/r, w/r, r*r*C)
    x = grid.reshape(b, h // r, r, w // r, r, c)
    x = x.permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // r, w // r, r * r * c)


def pixel_shuffle2(grid: Tensor) -> Tensor:
    """2x2 space-to-depth of a channels-last grid: (B, h, w, C) -> (B, h/2, w/2, 4C).

    Channel order: output cell (i, j) holds the concatenation, in this order, of input cells
    (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1); i.e. channel ``(2 * di + dj) * C + k`` of output
    cell (i, j) is channel ``k`` of input cell (2i + di, 2j + dj).
    """
    return _space_to_depth(grid, 2)


# ---- encoder layer (SigLIP layout) ----------------------------------------------------------------


class VisionAttention(nn.Module):
    """Bidirectional multi-head self-attention without mask; explicit matmul + softmax."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(
                f"hidden_size {cfg.hidden_size} is not divisible by num_attention_heads {cfg.num_attention_heads}"
            )
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def _heads(self, x: Tensor) -> Tensor:
        # (B, T, C) -> (B, heads, T, head_dim)
        return x.reshape(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        q = self._heads(self.q_proj(x))
        k = self._heads(self.k_proj(x))
        v = self._heads(self.v_proj(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        out = torch.matmul(probs, v).transpose(1, 2)
        out = out.reshape(out.shape[0], out.shape[1], self.num_heads * self.head_dim)
        return self.out_proj(out)


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.approximate = _gelu_approximation(cfg.hidden_act)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class VisionEncoderLayer(nn.Module):
    """Pre-norm transformer layer; submodule names equal SigLIP's ``SiglipEncoderLayer``."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


# ---- trunk ----------------------------------------------------------------------------------------


def bicubic_matrix(out_size: Any, in_size: int, device=None) -> Tensor:
    """(out_size, in_size) matrix M with M @ x equal to PyTorch's 1-D bicubic resize of x
    (align_corners=False, A = -0.75, edge taps clamped), built from elementwise ops only."""
    a = -0.75
    dst = torch.arange(out_size, dtype=torch.float32, device=device)
    # The output size as a tensor derived from dst, so a traced graph keeps it symbolic.
    scale = in_size / (dst.max() + 1.0)
    src = (dst + 0.5) * scale - 0.5
    base = torch.floor(src)
    t = src - base
    cols = torch.arange(in_size, dtype=torch.float32, device=device)
    m = torch.zeros_like(src)[:, None] * cols[None]
    for k in range(-1, 3):
        d = torch.abs(t - k)  # distance of tap k from the sample point
        w = torch.where(
            d <= 1,
            ((a + 2) * d - (a + 3)) * d * d + 1,
            ((a * d - 5 * a) * d + 8 * a) * d - 4 * a,
        )
        idx = torch.clamp(base + k, 0, in_size - 1)
        m = m + w[:, None] * (idx[:, None] == cols[None]).to(w.dtype)
    return m


class VisionEmbeddings(nn.Module):
    """Patch embedding plus position embeddings resized (bicubic, align_corners=False) to the input grid."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        self.patch_size = cfg.patch_size
        self.native_grid = cfg.image_size // cfg.patch_size
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.position_embedding = nn.Embedding(self.native_grid**2, cfg.hidden_size)

    def positions(self, h: Any, w: Any) -> Tensor:
        """Position table for an h x w patch grid, channels-first (1, C, h, w): the native table
        resized bicubically (align_corners=False, as SigLIP's ``interpolate_pos_encoding``).

        The resize is written as two interpolation matrices (``Ry @ table @ Rx^T``) instead of a
        cubic Resize op, which TensorRT's ONNX parser does not accept; ``h``/``w`` come from a
        tensor shape so one traced graph serves every grid.
        """
        n = self.native_grid
        table = self.position_embedding.weight  # (n*n, C), row-major over the native grid
        table = table.reshape(n, n, table.shape[-1]).permute(2, 0, 1)  # (C, n, n)
        ry = bicubic_matrix(h, n, table.device)  # (h, n)
        rx = bicubic_matrix(w, n, table.device)  # (w, n)
        out = torch.matmul(torch.matmul(ry[None], table.float()), rx.t()[None])  # (C, h, w), fp32
        return out[None].to(table.dtype)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> channels-last grid (B, H/patch, W/patch, C)."""
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, C, h, w)
        x = x + self.positions(x.shape[2], x.shape[3]).to(x.dtype)
        return x.permute(0, 2, 3, 1)


class VisionRouter(nn.Module):
    """Mean over patch tokens -> LayerNorm -> Linear -> GELU(tanh) -> Linear -> one logit per expert."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.router_hidden)
        self.fc2 = nn.Linear(cfg.router_hidden, cfg.num_experts)

    def forward(self, tokens: Tensor) -> Tensor:
        pooled = tokens.mean(dim=1)
        return self.fc2(F.gelu(self.fc1(self.norm(pooled)), approximate="tanh"))


class VisionTrunk(nn.Module):
    """Shared ViT layers and the router.

    forward(pixel_values (B, 3, H, W)) -> (trunk_hidden (B, H/16, W/16, C) grid, router_logits (B, E)).
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.cell = cfg.patch_size * cfg.shuffle
        self.embeddings = VisionEmbeddings(cfg)
        self.layers = nn.ModuleList(VisionEncoderLayer(cfg) for _ in range(cfg.trunk_layers))
        self.router = VisionRouter(cfg)

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        if not _tracing():
            if pixel_values.dim() != 4 or pixel_values.shape[1] != self.cfg.num_channels:
                raise ValueError(
                    f"expected pixel_values (B, {self.cfg.num_channels}, H, W), got {tuple(pixel_values.shape)}"
                )
            height, width = pixel_values.shape[-2:]
            if height % self.cell or width % self.cell or height <= 0 or width <= 0:
                raise ValueError(f"image size {height}x{width} is not a positive multiple of {self.cell}")
        grid = self.embeddings(pixel_values)  # (B, h, w, C)
        b, h, w, c = grid.shape[0], grid.shape[1], grid.shape[2], grid.shape[3]
        x = grid.reshape(b, h * w, c)
        for layer in self.layers:
            x = layer(x)
        logits = self.router(x)
        return x.reshape(b, h, w, c), logits


# ---- experts --------------------------------------------------------------------------------------


class VisionExpert(nn.Module):
    """The last ``expert_layers`` ViT layers plus SigLIP's post_layernorm, then the pixel shuffle."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.shuffle < 1:
            raise ValueError(f"shuffle must be positive, got {cfg.shuffle}")
        self.shuffle = cfg.shuffle
        self.layers = nn.ModuleList(VisionEncoderLayer(cfg) for _ in range(cfg.expert_layers))
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward_tokens(self, trunk_hidden: Tensor) -> Tensor:
        """Trunk grid (B, h, w, C) -> (B, h*w, C): SigLIP's ``last_hidden_state`` (before the shuffle)."""
        b, h, w, c = trunk_hidden.shape[0], trunk_hidden.shape[1], trunk_hidden.shape[2], trunk_hidden.shape[3]
        x = trunk_hidden.reshape(b, h * w, c)
        for layer in self.layers:
            x = layer(x)
        return self.post_layernorm(x)

    def forward(self, trunk_hidden: Tensor) -> Tensor:
        """Trunk grid (B, h, w, C) -> features (B, h/2, w/2, 4C); channel order as in :func:`pixel_shuffle2`."""
        b, h, w, c = trunk_hidden.shape[0], trunk_hidden.shape[1], trunk_hidden.shape[2], trunk_hidden.shape[3]
        tokens = self.forward_tokens(trunk_hidden)
        return _space_to_depth(tokens.reshape(b, h, w, c), self.shuffle)


class UnderstandingEncoder(nn.Module):
    """Trunk + router + ``num_experts`` experts; only the chosen expert runs for each image."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.num_experts < 1:
            raise ValueError("at least one expert")
        self.cfg = cfg
        self.trunk = VisionTrunk(cfg)
        self.experts = nn.ModuleList(VisionExpert(cfg) for _ in range(cfg.num_experts))

    def route(self, router_logits: Tensor, expert: int | None = None) -> Tensor:
        """Top-1 expert per image (LongTensor (B,)), or ``expert`` for every image when given."""
        if expert is None:
            return router_logits.argmax(dim=-1)
        expert = int(expert)
        if not 0 <= expert < len(self.experts):
            raise ValueError(f"expert {expert} out of range [0, {len(self.experts)})")
        return torch.full((router_logits.shape[0],), expert, dtype=torch.long, device=router_logits.device)

    def run_experts(self, trunk_hidden: Tensor, expert_index: Tensor) -> Tensor:
        """Group images by expert and run each expert only on its own images."""
        chosen = torch.unique(expert_index).tolist()
        if len(chosen) == 1:
            return self.experts[chosen[0]](trunk_hidden)
        out: Tensor | None = None
        for e in chosen:
            rows = (expert_index == e).nonzero(as_tuple=True)[0]
            y = self.experts[e](trunk_hidden.index_select(0, rows))
            if out is None:
                out = y.new_empty((trunk_hidden.shape[0],) + tuple(y.shape[1:]))
            out.index_copy_(0, rows, y)
        assert out is not None
        return out

    def forward(self, pixel_values: Tensor, expert: int | None = None) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) in [-1, 1] -> (features (B, H/32, W/32, 4C), expert_index LongTensor (B,))."""
        trunk_hidden, router_logits = self.trunk(pixel_values)
        expert_index = self.route(router_logits, expert)
        return self.run_experts(trunk_hidden, expert_index), expert_index


# ---- SigLIP interop -------------------------------------------------------------------------------

_SIGLIP_PREFIX = "vision_model."
_SIGLIP_LAYER_PARAMS = tuple(
    f"{m}.{p}"
    for m in (
        "layer_norm1",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "layer_norm2",
        "mlp.fc1",
        "mlp.fc2",
    )
    for p in ("weight", "bias")
)
# Non-persistent buffer of SiglipVisionEmbeddings; older checkpoints still carry it. Ignored.
_SIGLIP_IGNORED = {"embeddings.position_ids"}


def _siglip_targets(encoder: UnderstandingEncoder) -> dict[str, list[Tensor]]:
    """SigLIP key (without prefix) -> the parameters of ``encoder`` it initialises, in model order."""
    cfg = encoder.cfg
    t: dict[str, list[Tensor]] = {}
    emb = encoder.trunk.embeddings
    t["embeddings.patch_embedding.weight"] = [emb.patch_embedding.weight]
    t["embeddings.patch_embedding.bias"] = [emb.patch_embedding.bias]
    t["embeddings.position_embedding.weight"] = [emb.position_embedding.weight]
    for i in range(cfg.trunk_layers + cfg.expert_layers):
        if i < cfg.trunk_layers:
            owners: list[nn.Module] = [encoder.trunk.layers[i]]
        else:
            owners = [ex.layers[i - cfg.trunk_layers] for ex in encoder.experts]
        for name in _SIGLIP_LAYER_PARAMS:
            t[f"encoder.layers.{i}.{name}"] = [o.get_parameter(name) for o in owners]
    for p in ("weight", "bias"):
        t[f"post_layernorm.{p}"] = [ex.post_layernorm.get_parameter(p) for ex in encoder.experts]
    return t


def load_siglip_state_dict(encoder: UnderstandingEncoder, sd: Mapping[str, Tensor]) -> None:
    """Load SiglipVisionModel weights into ``encoder``.

    Keys may carry the ``vision_model.`` prefix or not. The trunk gets the embeddings and layers
    ``[:trunk_layers]``; every expert gets layers ``[trunk_layers:]`` and ``post_layernorm``. The router
    keeps its own weights (SigLIP has none). Raises ValueError naming the first unexpected key (``head.*``
    included), missing key or mis-shaped key; nothing is copied unless every key checks out.
    """
    targets = _siglip_targets(encoder)
    found: dict[str, Tensor] = {}
    for key, value in sd.items():
        k = key[len(_SIGLIP_PREFIX):] if key.startswith(_SIGLIP_PREFIX) else key
        if k in _SIGLIP_IGNORED:
            continue
        if k not in targets:
            raise ValueError(f"unexpected key {key!r} in SigLIP state dict")
        if k in found:
            raise ValueError(f"duplicate key {key!r} in SigLIP state dict (with and without prefix)")
        found[k] = value
    for k in targets:
        if k not in found:
            raise ValueError(f"missing key {k!r} (or {_SIGLIP_PREFIX + k!r}) in SigLIP state dict")
    for k, params in targets.items():
        if tuple(found[k].shape) != tuple(params[0].shape):
            raise ValueError(
                f"key {k!r} has shape {tuple(found[k].shape)}, expected {tuple(params[0].shape)}"
            )
    with torch.no_grad():
        for k, params in targets.items():
            for p in params:
                p.copy_(found[k])


_SIGLIP_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}


def _square(name: str, v: Any) -> int:
    if isinstance(v, (list, tuple)):
        if len(v) != 2 or v[0] != v[1]:
            raise ValueError(f"SigLIP {name} {v!r} is not square")
        v = v[0]
    return int(v)


def vision_config_from_siglip(
    cfg: Mapping[str, Any],
    trunk_layers: int,
    expert_layers: int,
    num_experts: int = 2,
    router_hidden: int | None = None,
) -> VisionConfig:
    """VisionConfig from a SiglipVisionConfig dict (or a SiglipConfig dict with ``vision_config``).

    Missing fields take SiglipVisionConfig's defaults. ``num_hidden_layers``, when present, must equal
    ``trunk_layers + expert_layers``. ``router_hidden`` defaults to ``hidden_size``.
    """
    if "vision_config" in cfg and isinstance(cfg["vision_config"], Mapping):
        cfg = cfg["vision_config"]
    v = {k: cfg.get(k, d) for k, d in _SIGLIP_VISION_DEFAULTS.items()}
    if v.get("hidden_act") is None:
        v["hidden_act"] = _SIGLIP_VISION_DEFAULTS["hidden_act"]
    _gelu_approximation(v["hidden_act"])
    if trunk_layers < 0 or expert_layers < 1 or num_experts < 1:
        raise ValueError("need trunk_layers >= 0, expert_layers >= 1, num_experts >= 1")
    n = cfg.get("num_hidden_layers", 12)
    if n != trunk_layers + expert_layers:
        raise ValueError(
            f"SigLIP has {n} layers but trunk_layers + expert_layers = {trunk_layers} + {expert_layers}"
        )
    hidden = int(v["hidden_size"])
    image_size = _square("image_size", v["image_size"])
    patch_size = _square("patch_size", v["patch_size"])
    if image_size % patch_size:
        raise ValueError(f"SigLIP image_size {image_size} is not a multiple of patch_size {patch_size}")
    return VisionConfig(
        hidden_size=hidden,
        intermediate_size=int(v["intermediate_size"]),
        num_attention_heads=int(v["num_attention_heads"]),
        num_channels=int(v["num_channels"]),
        image_size=image_size,
        patch_size=patch_size,
        hidden_act=str(v["hidden_act"]),
        layer_norm_eps=float(v["layer_norm_eps"]),
        trunk_layers=int(trunk_layers),
        expert_layers=int(expert_layers),
        num_experts=int(num_experts),
        router_hidden=int(router_hidden if router_hidden is not None else hidden),
    )
