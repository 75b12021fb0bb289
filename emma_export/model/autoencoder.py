"""EMMA's 32x compression autoencoder, in the DC-AE layout of diffusers' ``AutoencoderDC``.

Module and parameter names are those of ``AutoencoderDC``, so its state dict loads here strictly
(``encoder.*`` / ``decoder.*``). The arithmetic is the same, written for the legacy ONNX exporter
with dynamic batch/height/width:

* RMSNorm is spelled out and reduces over the channel axis in place, in float32: no aten::rms_norm,
  and no NCHW <-> NHWC transposes around every norm.
* Channel shortcuts (diffusers' ``unflatten(...).mean`` and ``repeat_interleave``) are
  reshape/mean and unsqueeze/expand/flatten, which keep H and W symbolic.
* The multiscale ReLU linear attention is always evaluated in its linear form, in float32, with v
  padded by a row of ones so that one matmul chain yields numerator and denominator. diffusers
  switches to the quadratic form when H*W <= head_dim; it is the same sum re-associated, and a
  branch on H*W would be frozen into a traced graph.
* q/k/v and the attention output projections run as 1x1 convolutions on NCHW with the Linear
  weights: same values, no layout round trips.

The model carries no diffusers import; ``autoencoder_config_from_diffusers`` reads a diffusers
``config.json`` dict into :class:`AutoencoderConfig`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AutoencoderConfig

BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")
NORM_TYPES = ("rms_norm", "batch_norm")
DOWNSAMPLE_TYPES = ("pixel_unshuffle", "Conv")
UPSAMPLE_TYPES = ("pixel_shuffle", "interpolate")
# diffusers' get_activation names (matched case-insensitively, as it does). relu6 is the original
# DC-AE's ResBlock default; diffusers itself has no entry for it.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
    "mish": nn.Mish,
}

_RMS_EPS = 1e-5  # every RMSNorm and BatchNorm of AutoencoderDC
_ATTN_EPS = 1e-15


def _activation(name: str, field: str = "activation") -> nn.Module:
    cls = ACTIVATIONS.get(str(name).lower())
    if cls is None:
        raise ValueError(f"autoencoder {field}: unsupported activation {name!r} (one of {', '.join(ACTIVATIONS)})")
    return cls()


class ChannelRMSNorm(nn.Module):
    """RMSNorm over the channel axis (dim 1) of an NCHW tensor, with weight and bias.

    The same value as diffusers' ``RMSNorm(C, eps, bias=True)`` applied to ``x.movedim(1, -1)``.
    """

    def __init__(self, channels: int, eps: float = _RMS_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 statistics: a half-precision mean of squares over 1024 channels overflows
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(dim=1, keepdim=True) + self.eps)
        h = h * self.weight.float()[:, None, None] + self.bias.float()[:, None, None]
        return h.to(x.dtype)


def _norm(norm_type: str, channels: int, field: str) -> nn.Module:
    if norm_type == "rms_norm":
        return ChannelRMSNorm(channels)
    if norm_type == "batch_norm":
        # used in eval mode (running statistics), like every other layer here
        return nn.BatchNorm2d(channels, eps=_RMS_EPS)
    raise ValueError(f"autoencoder {field}: unsupported norm type {norm_type!r} (one of {', '.join(NORM_TYPES)})")


def _pointwise(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """``linear`` over the channels of an NCHW tensor (a 1x1 convolution with its weight)."""
    return F.conv2d(x, linear.weight[:, :, None, None], linear.bias)


def _group_mean(x: torch.Tensor, group: int) -> torch.Tensor:
    """Mean of each run of ``group`` consecutive channels: (B, C, H, W) -> (B, C / group, H, W)."""
    if group == 1:
        return x
    return x.unflatten(1, (-1, group)).mean(dim=2)


def _repeat_channels(x: torch.Tensor, repeats: int) -> torch.Tensor:
    """``x.repeat_interleave(repeats, dim=1)`` without a size computed at trace time."""
    if repeats == 1:
        return x
    return x.unsqueeze(2).expand(-1, -1, repeats, -1, -1).flatten(1, 2)


# ---- blocks ---------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    def __init__(self, channels: int, norm_type: str, act_fn: str, field: str):
        super().__init__()
        self.nonlinearity = _activation(act_fn, field)
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.norm = _norm(norm_type, channels, field)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.conv2(self.nonlinearity(self.conv1(x))))


class MultiscaleProjection(nn.Module):
    """One extra scale of q/k/v: a k x k depthwise conv, then a 1x1 conv grouped per head and q/k/v."""

    def __init__(self, inner: int, heads: int, kernel_size: int):
        super().__init__()
        c = 3 * inner
        self.proj_in = nn.Conv2d(c, c, kernel_size, padding=kernel_size // 2, groups=c, bias=False)
        self.proj_out = nn.Conv2d(c, c, 1, 1, 0, groups=3 * heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.proj_in(x))


class MultiscaleLinearAttention(nn.Module):
    """ReLU linear attention over q/k/v and their multiscale aggregates, with a residual."""

    def __init__(self, channels: int, head_dim: int, kernel_sizes: tuple[int, ...], norm_type: str, field: str):
        super().__init__()
        heads = channels // head_dim
        if heads < 1:
            raise ValueError(f"autoencoder {field}: {channels} channels are fewer than attention_head_dim {head_dim}")
        inner = heads * head_dim
        self.head_dim = head_dim
        self.to_q = nn.Linear(channels, inner, bias=False)
        self.to_k = nn.Linear(channels, inner, bias=False)
        self.to_v = nn.Linear(channels, inner, bias=False)
        self.to_qkv_multiscale = nn.ModuleList(MultiscaleProjection(inner, heads, k) for k in kernel_sizes)
        self.to_out = nn.Linear(inner * (1 + len(kernel_sizes)), channels, bias=False)
        self.norm_out = _norm(norm_type, channels, field)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        w_qkv = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])[:, :, None, None]
        qkv = F.conv2d(x, w_qkv)
        qkv = torch.cat([qkv, *(m(qkv) for m in self.to_qkv_multiscale)], dim=1)
        # Groups of 3*head_dim consecutive channels are (q, k, v) of one head, as diffusers slices
        # them. The sums run over every pixel: float32, or half precision overflows.
        qkv = qkv.float().flatten(2).unflatten(1, (-1, 3 * self.head_dim))
        q, k, v = qkv.chunk(3, dim=2)
        q, k = F.relu(q), F.relu(k)
        v = F.pad(v, (0, 0, 0, 1), mode="constant", value=1.0)  # the ones row turns into sum_n k_n . q
        out = torch.matmul(torch.matmul(v, k.transpose(-1, -2)), q)  # (B, G, d + 1, N)
        out = out[:, :, :-1] / (out[:, :, -1:] + _ATTN_EPS)
        out = out.to(x.dtype).reshape(B, -1, H, W)
        return x + self.norm_out(_pointwise(out, self.to_out))


class GLUMBConv(nn.Module):
    """Inverted bottleneck with a SiLU-gated depthwise conv; RMSNorm and residual (expand ratio 4)."""

    def __init__(self, channels: int, expand_ratio: float = 4.0):
        super().__init__()
        hidden = int(expand_ratio * channels)
        self.nonlinearity = nn.SiLU()
        self.conv_inverted = nn.Conv2d(channels, 2 * hidden, 1, 1, 0)
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, 1, 1, groups=2 * hidden)
        self.conv_point = nn.Conv2d(hidden, channels, 1, 1, 0, bias=False)
        self.norm = ChannelRMSNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_depth(self.nonlinearity(self.conv_inverted(x)))
        h, gate = h.chunk(2, dim=1)
        return x + self.norm(self.conv_point(h * self.nonlinearity(gate)))


class EfficientViTBlock(nn.Module):
    def __init__(self, channels: int, head_dim: int, kernel_sizes: tuple[int, ...], norm_type: str, field: str):
        super().__init__()
        self.attn = MultiscaleLinearAttention(channels, head_dim, kernel_sizes, norm_type, field)
        self.conv_out = GLUMBConv(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.attn(x))


def _block(kind: str, channels: int, head_dim: int, norm_type: str, act_fn: str, scales, field: str) -> nn.Module:
    if kind == "ResBlock":
        return ResBlock(channels, norm_type, act_fn, field)
    if kind == "EfficientViTBlock":
        # diffusers gives EfficientViT blocks no activation argument: act_fn is unused here
        return EfficientViTBlock(channels, head_dim, tuple(int(k) for k in scales), norm_type, field)
    raise ValueError(f"autoencoder {field}: unsupported block type {kind!r} (one of {', '.join(BLOCK_TYPES)})")


class DownBlock(nn.Module):
    """x2 down: stride-2 conv ("Conv") or conv + pixel unshuffle; shortcut = unshuffle + group mean."""

    def __init__(self, cin: int, cout: int, pixel_unshuffle: bool, shortcut: bool):
        super().__init__()
        self.pixel_unshuffle = pixel_unshuffle
        self.shortcut = shortcut
        self.group = cin * 4 // cout
        if pixel_unshuffle and cout % 4:
            raise ValueError(f"autoencoder: pixel_unshuffle needs output channels divisible by 4, got {cout}")
        if shortcut and (self.group < 1 or (cin * 4) % cout):
            raise ValueError(f"autoencoder: a {cin} -> {cout} channel downsample has no channel-average shortcut")
        if pixel_unshuffle:
            self.conv = nn.Conv2d(cin, cout // 4, 3, 1, 1)
        else:
            self.conv = nn.Conv2d(cin, cout, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if self.pixel_unshuffle:
            h = F.pixel_unshuffle(h, 2)
        if self.shortcut:
            h = h + _group_mean(F.pixel_unshuffle(x, 2), self.group)
        return h


class UpBlock(nn.Module):
    """x2 up: nearest interpolation + conv, or conv + pixel shuffle; shortcut = channel repeat + shuffle."""

    def __init__(self, cin: int, cout: int, interpolate: bool, shortcut: bool):
        super().__init__()
        self.interpolate = interpolate
        self.shortcut = shortcut
        self.repeats = cout * 4 // cin
        if shortcut and (self.repeats < 1 or (cout * 4) % cin):
            raise ValueError(f"autoencoder: a {cin} -> {cout} channel upsample has no channel-repeat shortcut")
        self.conv = nn.Conv2d(cin, cout if interpolate else 4 * cout, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.interpolate:
            h = self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        else:
            h = F.pixel_shuffle(self.conv(x), 2)
        if self.shortcut:
            h = h + F.pixel_shuffle(_repeat_channels(x, self.repeats), 2)
        return h


# ---- encoder / decoder ----------------------------------------------------------------------------


def _per_stage(cfg: AutoencoderConfig, name: str, n: int) -> tuple:
    v = getattr(cfg, name)
    v = (v,) * n if isinstance(v, str) else tuple(v)
    if len(v) != n:
        raise ValueError(f"autoencoder {name}: {len(v)} entries for {n} stages")
    return v


def _check_common(cfg: AutoencoderConfig, side: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    widths = tuple(getattr(cfg, f"{side}_block_out_channels"))
    n = len(widths)
    if n < 2:
        raise ValueError(f"autoencoder {side}_block_out_channels: need at least 2 stages, got {n}")
    layers = _per_stage(cfg, f"{side}_layers_per_block", n)
    if any(l < 0 for l in layers):
        raise ValueError(f"autoencoder {side}_layers_per_block: negative entry in {layers}")
    if widths[-1] % cfg.latent_channels:
        raise ValueError(
            f"autoencoder {side}_block_out_channels: last width {widths[-1]} is not a multiple of latent_channels "
            f"{cfg.latent_channels}"
        )
    return widths, layers


class AutoencoderEncoder(nn.Module):
    """(B, 3, H, W) image in [-1, 1] -> raw latent (B, latent_channels, H / f, W / f)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        widths, layers = _check_common(cfg, "encoder")
        n = len(widths)
        kinds = _per_stage(cfg, "encoder_block_types", n)
        scales = _per_stage(cfg, "encoder_qkv_multiscales", n)
        if cfg.downsample_block_type not in DOWNSAMPLE_TYPES:
            raise ValueError(
                f"autoencoder downsample_block_type: unsupported {cfg.downsample_block_type!r} "
                f"(one of {', '.join(DOWNSAMPLE_TYPES)})"
            )
        unshuffle = cfg.downsample_block_type == "pixel_unshuffle"
        # with no layers in stage 0, the input conv already downsamples into stage 1's width
        if layers[0] > 0:
            self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, 1, 1)
        else:
            self.conv_in = DownBlock(cfg.in_channels, widths[1], unshuffle, shortcut=False)
        stages = []
        for i in range(n):
            field = f"encoder stage {i}"
            blocks = [
                _block(kinds[i], widths[i], cfg.attention_head_dim, "rms_norm", "silu", scales[i], field)
                for _ in range(layers[i])
            ]
            if i < n - 1 and layers[i] > 0:
                blocks.append(DownBlock(widths[i], widths[i + 1], unshuffle, shortcut=True))
            stages.append(nn.Sequential(*blocks))
        self.down_blocks = nn.ModuleList(stages)
        self.conv_out = nn.Conv2d(widths[-1], cfg.latent_channels, 3, 1, 1)
        self.out_shortcut = bool(cfg.encoder_out_shortcut)
        self.out_group = widths[-1] // cfg.latent_channels

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(image)
        for stage in self.down_blocks:
            h = stage(h)
        out = self.conv_out(h)
        if self.out_shortcut:
            out = out + _group_mean(h, self.out_group)
        return out


class AutoencoderDecoder(nn.Module):
    """Raw latent (B, latent_channels, h, w) -> image (B, 3, h * f, w * f)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        widths, layers = _check_common(cfg, "decoder")
        n = len(widths)
        kinds = _per_stage(cfg, "decoder_block_types", n)
        scales = _per_stage(cfg, "decoder_qkv_multiscales", n)
        norms = _per_stage(cfg, "decoder_norm_types", n)
        acts = _per_stage(cfg, "decoder_act_fns", n)
        if cfg.upsample_block_type not in UPSAMPLE_TYPES:
            raise ValueError(
                f"autoencoder upsample_block_type: unsupported {cfg.upsample_block_type!r} "
                f"(one of {', '.join(UPSAMPLE_TYPES)})"
            )
        interp = cfg.upsample_block_type == "interpolate"
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[-1], 3, 1, 1)
        self.in_shortcut = bool(cfg.decoder_in_shortcut)
        self.in_repeats = widths[-1] // cfg.latent_channels
        # up_blocks[i] is stage i (upsample into it, then its blocks); they run from the last stage down
        stages = []
        for i in range(n):
            field = f"decoder stage {i}"
            blocks: list[nn.Module] = []
            if i < n - 1 and layers[i] > 0:
                blocks.append(UpBlock(widths[i + 1], widths[i], interp, shortcut=True))
            blocks += [
                _block(kinds[i], widths[i], cfg.attention_head_dim, norms[i], acts[i], scales[i], field)
                for _ in range(layers[i])
            ]
            stages.append(nn.Sequential(*blocks))
        self.up_blocks = nn.ModuleList(stages)
        last = widths[0] if layers[0] > 0 else widths[1]
        self.norm_out = ChannelRMSNorm(last)
        self.conv_act = _activation(cfg.decoder_conv_act_fn, "decoder_conv_act_fn")
        if layers[0] > 0:
            self.conv_out = nn.Conv2d(last, cfg.in_channels, 3, 1, 1)
        else:
            self.conv_out = UpBlock(last, cfg.in_channels, interp, shortcut=False)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(latent)
        if self.in_shortcut:
            h = h + _repeat_channels(latent, self.in_repeats)
        for stage in reversed(self.up_blocks):
            h = stage(h)
        return self.conv_out(self.conv_act(self.norm_out(h)))


class Autoencoder(nn.Module):
    """Encoder and decoder; ``encode``/``decode`` work on latents scaled by ``cfg.scaling_factor``."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = AutoencoderEncoder(cfg)
        self.decoder = AutoencoderDecoder(cfg)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latent (B, C, H / f, W / f)."""
        return self.encoder(image) * self.cfg.scaling_factor

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latent (B, C, h, w) -> image (B, 3, h * f, w * f)."""
        return self.decoder(latent / self.cfg.scaling_factor)


# ---- diffusers config.json ------------------------------------------------------------------------

# AutoencoderDC's constructor defaults: a config.json that leaves a field out means these values.
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "latent_channels": 32,
    "attention_head_dim": 32,
    "encoder_block_types": "ResBlock",
    "decoder_block_types": "ResBlock",
    "encoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
    "decoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
    "encoder_layers_per_block": (2, 2, 2, 3, 3, 3),
    "decoder_layers_per_block": (3, 3, 3, 3, 3, 3),
    "encoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
    "decoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
    "upsample_block_type": "pixel_shuffle",
    "downsample_block_type": "pixel_unshuffle",
    "decoder_norm_types": "rms_norm",
    "decoder_act_fns": "silu",
    "encoder_out_shortcut": True,
    "decoder_in_shortcut": True,
    "decoder_conv_act_fn": "relu",
    "scaling_factor": 1.0,
}

# fields diffusers accepts as one string for every stage
_STR_OR_STAGES = ("encoder_block_types", "decoder_block_types", "decoder_norm_types", "decoder_act_fns")
_INT_STAGES = ("encoder_block_out_channels", "decoder_block_out_channels", "encoder_layers_per_block", "decoder_layers_per_block")
_CHOICES: dict[str, tuple[str, ...]] = {
    "encoder_block_types": BLOCK_TYPES,
    "decoder_block_types": BLOCK_TYPES,
    "decoder_norm_types": NORM_TYPES,
    "decoder_act_fns": tuple(ACTIVATIONS),
    "decoder_conv_act_fn": tuple(ACTIVATIONS),
    "downsample_block_type": DOWNSAMPLE_TYPES,
    "upsample_block_type": UPSAMPLE_TYPES,
}


def _int(v: Any, field: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) and not (isinstance(v, float) and v.is_integer()):
        raise ValueError(f"DC-AE config {field}: expected an integer, got {v!r}")
    return int(v)


def _choice(v: Any, field: str) -> str:
    allowed = _CHOICES[field]
    if not isinstance(v, str):
        raise ValueError(f"DC-AE config {field}: expected a string, got {v!r}")
    # activations are looked up lower-cased by diffusers; the other names are compared exactly
    key = v.lower() if field in ("decoder_act_fns", "decoder_conv_act_fn") else v
    if key not in allowed:
        raise ValueError(f"DC-AE config {field}: unsupported value {v!r} (one of {', '.join(allowed)})")
    return key


def autoencoder_config_from_diffusers(dc_config: Mapping[str, Any]) -> AutoencoderConfig:
    """A diffusers ``AutoencoderDC`` config.json dict -> :class:`AutoencoderConfig`.

    Missing fields take AutoencoderDC's defaults; one-string fields become per-stage tuples and
    lists become tuples. Keys starting with ``_`` (``_class_name``, ...) are metadata and ignored.
    Raises ValueError naming the field for unknown fields and unsupported values.
    """
    names = [f.name for f in dataclasses.fields(AutoencoderConfig)]
    unknown = sorted(k for k in dc_config if not k.startswith("_") and k not in names)
    if unknown:
        raise ValueError(f"DC-AE config: unsupported field(s) {', '.join(unknown)}")
    raw = {k: dc_config.get(k, DIFFUSERS_DEFAULTS[k]) for k in names}

    out: dict[str, Any] = {}
    for k in _INT_STAGES:
        if isinstance(raw[k], (str, bytes)) or not isinstance(raw[k], (list, tuple)):
            raise ValueError(f"DC-AE config {k}: expected a list of integers, got {raw[k]!r}")
        out[k] = tuple(_int(x, k) for x in raw[k])
    n = {side: len(out[f"{side}_block_out_channels"]) for side in ("encoder", "decoder")}
    for side in ("encoder", "decoder"):
        if len(out[f"{side}_layers_per_block"]) != n[side]:
            raise ValueError(f"DC-AE config {side}_layers_per_block: {len(out[f'{side}_layers_per_block'])} entries "
                             f"for {n[side]} stages")
    for k in _STR_OR_STAGES:
        stages = n[k.split("_", 1)[0]]
        v = raw[k]
        if isinstance(v, str):
            v = (v,) * stages
        elif not isinstance(v, (list, tuple)) or len(v) != stages:
            raise ValueError(f"DC-AE config {k}: expected a string or {stages} per-stage values, got {v!r}")
        out[k] = tuple(_choice(x, k) for x in v)
    for side in ("encoder", "decoder"):
        k = f"{side}_qkv_multiscales"
        v = raw[k]
        if not isinstance(v, (list, tuple)) or len(v) != n[side] or not all(isinstance(s, (list, tuple)) for s in v):
            raise ValueError(f"DC-AE config {k}: expected {n[side]} per-stage lists of kernel sizes, got {v!r}")
        out[k] = tuple(tuple(_int(x, k) for x in s) for s in v)
        if any(x < 1 or x % 2 == 0 for s in out[k] for x in s):
            raise ValueError(f"DC-AE config {k}: kernel sizes must be odd and positive, got {v!r}")
    for k in ("downsample_block_type", "upsample_block_type", "decoder_conv_act_fn"):
        out[k] = _choice(raw[k], k)
    for k in ("in_channels", "latent_channels", "attention_head_dim"):
        out[k] = _int(raw[k], k)
        if out[k] < 1:
            raise ValueError(f"DC-AE config {k}: must be positive, got {raw[k]!r}")
    for k in ("encoder_out_shortcut", "decoder_in_shortcut"):
        if not isinstance(raw[k], bool):
            raise ValueError(f"DC-AE config {k}: expected true/false, got {raw[k]!r}")
        out[k] = raw[k]
    if isinstance(raw["scaling_factor"], bool) or not isinstance(raw["scaling_factor"], (int, float)) or raw["scaling_factor"] == 0:
        raise ValueError(f"DC-AE config scaling_factor: expected a non-zero number, got {raw['scaling_factor']!r}")
    out["scaling_factor"] = float(raw["scaling_factor"])
    return AutoencoderConfig(**out)


__all__ = [
    "Autoencoder",
    "AutoencoderEncoder",
    "AutoencoderDecoder",
    "autoencoder_config_from_diffusers",
    "DIFFUSERS_DEFAULTS",
]
