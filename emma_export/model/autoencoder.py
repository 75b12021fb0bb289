"""EMMA's 32x compression autoencoder, in the DC-AE layout (diffusers ``AutoencoderDC``).

Module and parameter names follow diffusers, so an upstream state dict loads strictly. The math is
written out for export: RMSNorm by hand, the channel shortcuts as reshape/mean/expand (nothing
that freezes H or W into a traced graph), and the multiscale ReLU linear attention always in its
linear form: diffusers switches to a quadratic form for tiny feature maps, which is the same value
re-associated, but a shape-dependent switch would be baked into one graph at trace time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AutoencoderConfig


def _act(name: str) -> nn.Module:
    acts = {"relu": nn.ReLU, "silu": nn.SiLU, "swish": nn.SiLU, "relu6": nn.ReLU6, "gelu": nn.GELU, "mish": nn.Mish}
    if name not in acts:
        raise ValueError(f"unsupported autoencoder activation {name!r}")
    return acts[name]()


class ChannelRMSNorm(nn.Module):
    """RMSNorm over the last axis with weight and bias (diffusers' RMSNorm with bias=True)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * self.weight.float() + self.bias.float()).to(dtype)


def _norm(norm_type: str, channels: int) -> nn.Module:
    if norm_type == "rms_norm":
        return ChannelRMSNorm(channels, 1e-5)
    if norm_type == "batch_norm":
        return nn.BatchNorm2d(channels, eps=1e-5)
    raise ValueError(f"unsupported autoencoder norm type {norm_type!r}")


# Channel moves are explicit permutes: the legacy exporter writes movedim(-1, 1) as an invalid
# Transpose perm with a negative axis.
def _apply_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(norm, ChannelRMSNorm):
        return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return norm(x)


class ResBlock(nn.Module):
    def __init__(self, channels: int, norm_type: str, act_fn: str):
        super().__init__()
        self.nonlinearity = _act(act_fn)
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.norm = _norm(norm_type, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(self.nonlinearity(self.conv1(x)))
        return _apply_norm(self.norm, h) + x


class MultiscaleProjection(nn.Module):
    def __init__(self, channels: int, heads: int, kernel_size: int):
        super().__init__()
        c3 = 3 * channels
        self.proj_in = nn.Conv2d(c3, c3, kernel_size, padding=kernel_size // 2, groups=c3, bias=False)
        self.proj_out = nn.Conv2d(c3, c3, 1, 1, 0, groups=3 * heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.proj_in(x))


class MultiscaleLinearAttention(nn.Module):
    """ReLU linear attention over q/k/v and their multiscale (depthwise-conv) aggregations."""

    def __init__(self, channels: int, head_dim: int, kernel_sizes: tuple[int, ...], norm_type: str, eps: float = 1e-15):
        super().__init__()
        heads = channels // head_dim
        inner = heads * head_dim
        self.head_dim = head_dim
        self.eps = eps
        self.to_q = nn.Linear(channels, inner, bias=False)
        self.to_k = nn.Linear(channels, inner, bias=False)
        self.to_v = nn.Linear(channels, inner, bias=False)
        self.to_qkv_multiscale = nn.ModuleList([MultiscaleProjection(inner, heads, k) for k in kernel_sizes])
        self.to_out = nn.Linear(inner * (1 + len(kernel_sizes)), channels, bias=False)
        self.norm_out = _norm(norm_type, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        h = x.permute(0, 2, 3, 1)
        qkv = torch.cat([self.to_q(h), self.to_k(h), self.to_v(h)], dim=-1).permute(0, 3, 1, 2)
        qkv = torch.cat([qkv] + [m(qkv) for m in self.to_qkv_multiscale], dim=1)
        # Linear attention sums over every pixel: fp32, or half precision overflows.
        qkv = qkv.float().reshape(B, -1, 3 * self.head_dim, H * W)
        q, k, v = qkv.chunk(3, dim=2)
        q, k = F.relu(q), F.relu(k)
        num = torch.matmul(torch.matmul(v, k.transpose(-1, -2)), q)  # (B, G, d, N)
        den = torch.matmul(k.sum(dim=-1, keepdim=True).transpose(-1, -2), q)  # (B, G, 1, N)
        out = (num / (den + self.eps)).to(x.dtype).reshape(B, -1, H, W)
        out = self.to_out(out.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return _apply_norm(self.norm_out, out) + x


class GLUMBConv(nn.Module):
    def __init__(self, channels: int, expand_ratio: float = 4.0):
        super().__init__()
        hidden = int(expand_ratio * channels)
        self.nonlinearity = nn.SiLU()
        self.conv_inverted = nn.Conv2d(channels, hidden * 2, 1, 1, 0)
        self.conv_depth = nn.Conv2d(hidden * 2, hidden * 2, 3, 1, 1, groups=hidden * 2)
        self.conv_point = nn.Conv2d(hidden, channels, 1, 1, 0, bias=False)
        self.norm = ChannelRMSNorm(channels, 1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_depth(self.nonlinearity(self.conv_inverted(x)))
        h, gate = h.chunk(2, dim=1)
        h = self.conv_point(h * self.nonlinearity(gate))
        return self.norm(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) + x


class EfficientViTBlock(nn.Module):
    def __init__(self, channels: int, head_dim: int, kernel_sizes: tuple[int, ...], norm_type: str):
        super().__init__()
        self.attn = MultiscaleLinearAttention(channels, head_dim, kernel_sizes, norm_type)
        self.conv_out = GLUMBConv(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.attn(x))


def _block(kind: str, channels: int, head_dim: int, norm_type: str, act_fn: str, scales: tuple[int, ...]) -> nn.Module:
    if kind == "ResBlock":
        return ResBlock(channels, norm_type, act_fn)
    if kind == "EfficientViTBlock":
        return EfficientViTBlock(channels, head_dim, scales, norm_type)
    raise ValueError(f"unsupported autoencoder block type {kind!r}")


def _group_mean(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Average each run of ``groups`` consecutive channels: (B, C, H, W) -> (B, C/groups, H, W)."""
    B, C, H, W = x.shape
    return x.reshape(B, C // groups, groups, H, W).mean(dim=2)


def _repeat_channels(x: torch.Tensor, repeats: int) -> torch.Tensor:
    """repeat_interleave over channels, as expand + reshape (export friendly)."""
    B, C, H, W = x.shape
    return x[:, :, None].expand(B, C, repeats, H, W).reshape(B, C * repeats, H, W)


class DownBlock(nn.Module):
    """x2 downsampling: strided conv, or conv + pixel unshuffle; optional space-to-channel shortcut."""

    def __init__(self, cin: int, cout: int, pixel_unshuffle: bool, shortcut: bool):
        super().__init__()
        self.pixel_unshuffle = pixel_unshuffle
        self.shortcut = shortcut
        self.group_size = cin * 4 // cout
        self.conv = nn.Conv2d(cin, cout // 4 if pixel_unshuffle else cout, 3, 1 if pixel_unshuffle else 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if self.pixel_unshuffle:
            h = F.pixel_unshuffle(h, 2)
        if self.shortcut:
            h = h + _group_mean(F.pixel_unshuffle(x, 2), self.group_size)
        return h


class UpBlock(nn.Module):
    """x2 upsampling: nearest interpolation + conv, or conv + pixel shuffle; optional shortcut."""

    def __init__(self, cin: int, cout: int, interpolate: bool, shortcut: bool):
        super().__init__()
        self.interpolate = interpolate
        self.shortcut = shortcut
        self.repeats = cout * 4 // cin
        self.conv = nn.Conv2d(cin, cout if interpolate else cout * 4, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.interpolate:
            h = self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        else:
            h = F.pixel_shuffle(self.conv(x), 2)
        if self.shortcut:
            h = h + F.pixel_shuffle(_repeat_channels(x, self.repeats), 2)
        return h


class AutoencoderEncoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        widths, layers = cfg.encoder_block_out_channels, cfg.encoder_layers_per_block
        n = len(widths)
        unshuffle = cfg.downsample_block_type == "pixel_unshuffle"
        first = widths[0] if layers[0] > 0 else widths[1]
        if layers[0] > 0:
            self.conv_in = nn.Conv2d(cfg.in_channels, first, 3, 1, 1)
        else:
            self.conv_in = DownBlock(cfg.in_channels, first, unshuffle, shortcut=False)
        stages = []
        for i, (w, nl) in enumerate(zip(widths, layers)):
            blocks = [
                _block(cfg.encoder_block_types[i], w, cfg.attention_head_dim, "rms_norm", "silu", tuple(cfg.encoder_qkv_multiscales[i]))
                for _ in range(nl)
            ]
            if i < n - 1 and nl > 0:
                blocks.append(DownBlock(w, widths[i + 1], unshuffle, shortcut=True))
            stages.append(nn.Sequential(*blocks))
        self.down_blocks = nn.ModuleList(stages)
        self.conv_out = nn.Conv2d(widths[-1], cfg.latent_channels, 3, 1, 1)
        self.out_shortcut = cfg.encoder_out_shortcut
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
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        widths, layers = cfg.decoder_block_out_channels, cfg.decoder_layers_per_block
        n = len(widths)
        interp = cfg.upsample_block_type == "interpolate"
        norms = _per_stage(cfg.decoder_norm_types, n)
        acts = _per_stage(cfg.decoder_act_fns, n)
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[-1], 3, 1, 1)
        self.in_shortcut = cfg.decoder_in_shortcut
        self.in_repeats = widths[-1] // cfg.latent_channels
        stages: list[nn.Module] = [nn.Identity()] * n
        for i in reversed(range(n)):
            blocks: list[nn.Module] = []
            if i < n - 1 and layers[i] > 0:
                blocks.append(UpBlock(widths[i + 1], widths[i], interp, shortcut=True))
            blocks += [
                _block(cfg.decoder_block_types[i], widths[i], cfg.attention_head_dim, norms[i], acts[i], tuple(cfg.decoder_qkv_multiscales[i]))
                for _ in range(layers[i])
            ]
            stages[i] = nn.Sequential(*blocks)
        self.up_blocks = nn.ModuleList(stages)
        last = widths[0] if layers[0] > 0 else widths[1]
        self.norm_out = ChannelRMSNorm(last, 1e-5)
        self.conv_act = _act(cfg.decoder_conv_act_fn)
        if layers[0] > 0:
            self.conv_out = nn.Conv2d(last, cfg.in_channels, 3, 1, 1)
        else:
            self.conv_out = UpBlock(last, cfg.in_channels, interp, shortcut=False)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(latents)
        if self.in_shortcut:
            h = h + _repeat_channels(latents, self.in_repeats)
        for stage in reversed(self.up_blocks):
            h = stage(h)
        h = self.norm_out(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv_out(self.conv_act(h))


def _per_stage(v, n: int) -> tuple:
    return (v,) * n if isinstance(v, str) else tuple(v)


class Autoencoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = AutoencoderEncoder(cfg)
        self.decoder = AutoencoderDecoder(cfg)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/32, W/32)."""
        return self.encoder(image) * self.cfg.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents / self.cfg.scaling_factor)


_TUPLE_FIELDS = (
    "encoder_block_types", "decoder_block_types", "encoder_block_out_channels", "decoder_block_out_channels",
    "encoder_layers_per_block", "decoder_layers_per_block", "decoder_norm_types", "decoder_act_fns",
)


# diffusers' own constructor defaults: a config.json that omits a field means these values.
_DIFFUSERS_DEFAULTS = {
    "in_channels": 3, "latent_channels": 32, "attention_head_dim": 32,
    "encoder_block_types": "ResBlock", "decoder_block_types": "ResBlock",
    "encoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
    "decoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
    "encoder_layers_per_block": (2, 2, 2, 3, 3, 3), "decoder_layers_per_block": (3, 3, 3, 3, 3, 3),
    "encoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)), "decoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
    "upsample_block_type": "pixel_shuffle", "downsample_block_type": "pixel_unshuffle",
    "decoder_norm_types": "rms_norm", "decoder_act_fns": "silu", "encoder_out_shortcut": True,
    "decoder_in_shortcut": True, "decoder_conv_act_fn": "relu", "scaling_factor": 1.0,
}


def autoencoder_config_from_diffusers(dc: dict) -> AutoencoderConfig:
    """A diffusers ``AutoencoderDC`` config.json dict -> our config (per-stage tuples everywhere)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(AutoencoderConfig)}
    kw = {}
    n = len(dc.get("encoder_block_out_channels", _DIFFUSERS_DEFAULTS["encoder_block_out_channels"]))
    for k in names:
        v = dc.get(k, _DIFFUSERS_DEFAULTS[k])
        if k in _TUPLE_FIELDS:
            v = (v,) * n if isinstance(v, str) else tuple(v)
        elif k.endswith("qkv_multiscales"):
            v = tuple(tuple(x) for x in v)
        kw[k] = v
    # diffusers only tests for "pixel_unshuffle" / "interpolate": anything else is the other kind.
    kw["downsample_block_type"] = "pixel_unshuffle" if kw["downsample_block_type"] == "pixel_unshuffle" else "Conv"
    kw["upsample_block_type"] = "interpolate" if kw["upsample_block_type"] == "interpolate" else "pixel_shuffle"
    for t in kw["encoder_block_types"] + kw["decoder_block_types"]:
        if t not in ("ResBlock", "EfficientViTBlock"):
            raise ValueError(f"autoencoder config: unsupported block type {t!r}")
    return AutoencoderConfig(**kw)
