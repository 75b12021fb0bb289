"""The DC-AE autoencoder: token grid, diffusers conformance, and the diffusers config reader."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from emma_export.config import AutoencoderConfig, get_config
from emma_export.model.autoencoder import Autoencoder, autoencoder_config_from_diffusers

# ---- token grid -----------------------------------------------------------------------------------


@pytest.mark.parametrize("hw, grid", [((64, 64), (2, 2)), ((128, 96), (4, 3))])
def test_tiny_token_grid(hw, grid):
    cfg = get_config("tiny").ae
    assert cfg.downsample_factor == 32
    ae = Autoencoder(cfg).eval()
    with torch.no_grad():
        z = ae.encode(torch.rand(2, 3, *hw) * 2 - 1)
        assert z.shape == (2, cfg.latent_channels, *grid)
        assert ae.decode(z).shape == (2, 3, *hw)
    assert {k.split(".", 1)[0] for k in ae.state_dict()} == {"encoder", "decoder"}


# ---- conformance against diffusers AutoencoderDC ----------------------------------------------------

SIZES = [(64, 64), (64, 96)]  # 2x2 and a non-square 2x3 latent grid

# EfficientViT (several qkv scales) and ResBlock stages, batch-norm/relu and gelu decoder stages,
# strided-conv down, interpolating up: the options of the f32c32 SANA / in / mix checkpoints.
DC_EVIT_CONV_INTERPOLATE = {
    "_class_name": "AutoencoderDC",
    "latent_channels": 8,
    "attention_head_dim": 8,
    "encoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    "decoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    "encoder_block_out_channels": [8, 16, 16, 32, 32, 32],
    "decoder_block_out_channels": [8, 16, 16, 32, 32, 32],
    "encoder_layers_per_block": [1, 1, 1, 1, 1, 1],
    "decoder_layers_per_block": [1, 1, 1, 1, 1, 2],
    "encoder_qkv_multiscales": [[], [], [], [5], [3, 5], [5]],
    "decoder_qkv_multiscales": [[], [], [], [5], [5], [3]],
    "downsample_block_type": "Conv",
    "upsample_block_type": "interpolate",
    "decoder_norm_types": ["batch_norm", "batch_norm", "rms_norm", "batch_norm", "rms_norm", "rms_norm"],
    "decoder_act_fns": ["relu", "relu", "silu", "gelu", "silu", "silu"],
    "scaling_factor": 0.37,
}

# pixel (un)shuffle, no layers in stage 0 (the in/out convs resample), one-string fields.
DC_SHUFFLE_NO_STAGE0 = {
    "latent_channels": 8,
    "attention_head_dim": 8,
    "encoder_block_types": "ResBlock",
    "decoder_block_types": ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock", "ResBlock", "EfficientViTBlock"],
    "encoder_block_out_channels": [8, 16, 16, 32, 32, 32],
    "decoder_block_out_channels": [8, 16, 16, 32, 32, 32],
    "encoder_layers_per_block": [0, 1, 1, 1, 1, 1],
    "decoder_layers_per_block": [0, 1, 1, 2, 1, 1],
    "encoder_qkv_multiscales": [[], [], [], [], [], []],
    "decoder_qkv_multiscales": [[], [], [], [5], [], [5]],
    "downsample_block_type": "pixel_unshuffle",
    "upsample_block_type": "pixel_shuffle",
    "decoder_norm_types": "batch_norm",
    "decoder_act_fns": "silu",
    "decoder_conv_act_fn": "silu",
    "scaling_factor": 1.7,
}

LAYOUTS = {"evit_conv_interpolate": DC_EVIT_CONV_INTERPOLATE, "shuffle_no_stage0": DC_SHUFFLE_NO_STAGE0}


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every tensor random, norms included: gains near 1, biases and running statistics off zero."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        n = torch.randn(p.shape, generator=g)
        if p.dim() == 1:
            p.copy_(1.0 + 0.3 * n if name.endswith("weight") else 0.2 * n)
        else:
            p.copy_(n / math.sqrt(math.prod(p.shape[1:])))
    for name, b in model.named_buffers():
        if name.endswith("running_mean"):
            b.copy_(0.2 * torch.randn(b.shape, generator=g))
        elif name.endswith("running_var"):
            b.copy_(0.5 + torch.rand(b.shape, generator=g))


@pytest.fixture(scope="module", params=list(LAYOUTS))
def pair(request):
    diffusers = pytest.importorskip("diffusers")
    dc_config = LAYOUTS[request.param]
    dc = diffusers.AutoencoderDC(**{k: v for k, v in dc_config.items() if not k.startswith("_")}).eval()
    _randomize(dc, seed=0)
    ae = Autoencoder(autoencoder_config_from_diffusers(dc_config)).eval()
    ae.load_state_dict(dc.state_dict(), strict=True)
    return request.param, dc, ae


def _err(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max abs error, tolerance 1e-5 * max(1, max |ref|))."""
    assert ours.shape == ref.shape
    return (ours - ref).abs().max().item(), 1e-5 * max(1.0, ref.abs().max().item())


def _compare(dc, ae, hw, seed: int = 1) -> dict[str, tuple[float, float]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, *hw, generator=g) * 2 - 1
    s = dc.config.scaling_factor
    with torch.no_grad():
        ref_latent = dc.encode(x).latent
        z = torch.randn(ref_latent.shape, generator=g) * ref_latent.std()
        ref_image = dc.decode(z).sample
        return {
            "encoder": _err(ae.encoder(x), ref_latent),
            "decoder": _err(ae.decoder(z), ref_image),
            "encode_scaled": _err(ae.encode(x), ref_latent * s),
            "decode_scaled": _err(ae.decode(z * s), ref_image),
        }


@pytest.mark.parametrize("hw", SIZES)
def test_matches_diffusers(pair, hw):
    name, dc, ae = pair
    errs = _compare(dc, ae, hw)
    print(name, hw, {k: f"{e:.3g} (tol {t:.3g})" for k, (e, t) in errs.items()})
    for k, (e, tol) in errs.items():
        assert e <= tol, (name, hw, k, e, tol)
    assert ae.encoder(torch.zeros(1, 3, *hw)).shape[-2:] == (hw[0] // 32, hw[1] // 32)


# one tensor per kind: multiscale projection, BatchNorm statistics and affine, RMSNorm bias, shortcut-free conv_in
PERTURB = {
    "evit_conv_interpolate": [
        "encoder.down_blocks.4.0.attn.to_qkv_multiscale.1.proj_in.weight",
        "encoder.down_blocks.3.0.conv_out.norm.bias",
        "decoder.up_blocks.0.1.norm.running_var",
        "decoder.up_blocks.3.1.attn.norm_out.weight",
        "decoder.norm_out.bias",
    ],
    "shuffle_no_stage0": [
        "encoder.conv_in.conv.weight",
        "decoder.up_blocks.3.2.attn.to_v.weight",
        "decoder.up_blocks.1.1.norm.running_mean",
        "decoder.conv_out.conv.bias",
    ],
}


def test_perturbed_weight_fails(pair):
    name, dc, _ = pair
    ae = Autoencoder(autoencoder_config_from_diffusers(LAYOUTS[name])).eval()
    ref_sd = dc.state_dict()
    for key in PERTURB[name]:
        assert key in ref_sd, key
        sd = {k: v.clone() for k, v in ref_sd.items()}
        sd[key].view(-1)[:4] += 0.1
        ae.load_state_dict(sd, strict=True)
        errs = _compare(dc, ae, SIZES[1])
        side = key.split(".", 1)[0]
        e, tol = errs[side]
        assert e > tol, (key, e, tol)


# ---- diffusers config.json reader -----------------------------------------------------------------


def test_config_reader_normalises_fields():
    cfg = autoencoder_config_from_diffusers(DC_SHUFFLE_NO_STAGE0)
    assert isinstance(cfg, AutoencoderConfig)
    assert cfg.encoder_block_types == ("ResBlock",) * 6
    assert cfg.decoder_norm_types == ("batch_norm",) * 6 and cfg.decoder_act_fns == ("silu",) * 6
    assert cfg.encoder_layers_per_block == (0, 1, 1, 1, 1, 1)
    assert cfg.decoder_qkv_multiscales == ((), (), (), (5,), (), (5,))
    # fields the file leaves out take AutoencoderDC's defaults
    assert (cfg.encoder_out_shortcut, cfg.decoder_in_shortcut, cfg.in_channels) == (True, True, 3)
    assert autoencoder_config_from_diffusers({}).scaling_factor == 1.0
    # our configs are AutoencoderDC constructor arguments: they read back unchanged
    for name in ("tiny", "small", "emma-4b"):
        ae = get_config(name).ae
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(ae).items()}
        assert autoencoder_config_from_diffusers({"_class_name": "AutoencoderDC", **d}) == ae


@pytest.mark.parametrize(
    "field, value",
    [
        ("decoder_norm_types", "layer_norm"),
        ("decoder_act_fns", ["silu"] * 5 + ["tanh"]),
        ("upsample_block_type", "bilinear"),
        ("downsample_block_type", "avgpool"),
        ("encoder_block_types", ["ResBlock"] * 5),
        ("encoder_qkv_multiscales", [[], [], [], [4], [], []]),
        ("decoder_layers_per_block", [1, 1]),
        ("decoder_conv_act_fn", "softplus"),
        ("unknown_option", True),
    ],
)
def test_config_reader_rejects_unsupported(field, value):
    with pytest.raises(ValueError, match=field):
        autoencoder_config_from_diffusers({**DC_EVIT_CONV_INTERPOLATE, field: value})
