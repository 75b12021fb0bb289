"""Understanding encoder (emma_export.model.vision): shapes, routing, pixel shuffle, SigLIP conformance."""

from __future__ import annotations

import pytest
import torch

from emma_export.config import get_config
from emma_export.model.vision import (
    UnderstandingEncoder,
    load_siglip_state_dict,
    pixel_shuffle2,
    vision_config_from_siglip,
)


@pytest.fixture(scope="module")
def tiny_cfg():
    return get_config("tiny").vision


def _encoder(cfg, seed: int = 0) -> UnderstandingEncoder:
    torch.manual_seed(seed)
    return UnderstandingEncoder(cfg).eval()


def _pixels(b: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


# ---- shapes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw, grid", [((64, 64), (2, 2)), ((128, 96), (4, 3))])
def test_shapes(tiny_cfg, hw, grid):
    enc = _encoder(tiny_cfg)
    with torch.no_grad():
        trunk_hidden, logits = enc.trunk(_pixels(2, *hw))
        features, expert_index = enc(_pixels(2, *hw))
    assert trunk_hidden.shape == (2, hw[0] // 16, hw[1] // 16, tiny_cfg.hidden_size)
    assert logits.shape == (2, tiny_cfg.num_experts)
    assert features.shape == (2, *grid, 4 * tiny_cfg.hidden_size)
    assert features.shape[-1] == tiny_cfg.feature_dim
    assert expert_index.shape == (2,) and expert_index.dtype == torch.long


def test_rejects_sizes_not_multiple_of_32(tiny_cfg):
    enc = _encoder(tiny_cfg)
    with pytest.raises(ValueError, match="multiple of 32"):
        enc(_pixels(1, 48, 64))
    with pytest.raises(ValueError, match="out of range"):
        enc(_pixels(1, 64, 64), expert=2)


# ---- pixel shuffle --------------------------------------------------------------------------------


def test_pixel_shuffle2_channel_order():
    # value of channel k at input cell (r, c) = 100 r + 10 c + k
    r = torch.arange(4).view(1, 4, 1, 1)
    c = torch.arange(6).view(1, 1, 6, 1)
    k = torch.arange(2).view(1, 1, 1, 2)
    grid = (100 * r + 10 * c + k).float()
    out = pixel_shuffle2(grid)
    assert out.shape == (1, 2, 3, 8)
    # cell (0, 0) <- (0,0), (0,1), (1,0), (1,1)
    assert out[0, 0, 0].tolist() == [0, 1, 10, 11, 100, 101, 110, 111]
    # cell (1, 2) <- (2,4), (2,5), (3,4), (3,5)
    assert out[0, 1, 2].tolist() == [240, 241, 250, 251, 340, 341, 350, 351]
    for i in range(2):
        for j in range(3):
            cells = [(2 * i, 2 * j), (2 * i, 2 * j + 1), (2 * i + 1, 2 * j), (2 * i + 1, 2 * j + 1)]
            expected = torch.cat([grid[0, a, b] for a, b in cells])
            assert torch.equal(out[0, i, j], expected)


def test_expert_forward_is_shuffled_tokens(tiny_cfg):
    enc = _encoder(tiny_cfg)
    with torch.no_grad():
        th, _ = enc.trunk(_pixels(2, 128, 96))
        tokens = enc.experts[0].forward_tokens(th)
        feats = enc.experts[0](th)
    assert tokens.shape == (2, 8 * 6, tiny_cfg.hidden_size)
    assert torch.equal(feats, pixel_shuffle2(tokens.reshape(2, 8, 6, -1)))


# ---- routing --------------------------------------------------------------------------------------


class _Recorder:
    """Forward hooks on each expert, recording the trunk grid it was given."""

    def __init__(self, enc: UnderstandingEncoder):
        self.calls: dict[int, list[torch.Tensor]] = {e: [] for e in range(len(enc.experts))}
        self.handles = [
            ex.register_forward_hook(lambda m, args, out, e=e: self.calls[e].append(args[0].detach().clone()))
            for e, ex in enumerate(enc.experts)
        ]

    def remove(self):
        for h in self.handles:
            h.remove()


def _split_router(enc: UnderstandingEncoder, px: torch.Tensor) -> None:
    """Set router.fc2 so that image 0 of ``px`` goes to expert 1 and image 1 to expert 0."""
    seen = []
    h = enc.trunk.router.fc2.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        enc.trunk(px)
    h.remove()
    a0, a1 = seen[0][0], seen[0][1]
    d, mid = a0 - a1, (a0 + a1) / 2
    fc2 = enc.trunk.router.fc2
    with torch.no_grad():
        fc2.weight.zero_()
        fc2.bias.zero_()
        fc2.weight[1] = d
        fc2.weight[0] = -d
        fc2.bias[1] = -(d @ mid)
        fc2.bias[0] = d @ mid


def test_routing_runs_only_the_chosen_expert(tiny_cfg):
    enc = _encoder(tiny_cfg)
    px = _pixels(2, 128, 96)
    _split_router(enc, px)

    trunk_out = []
    h = enc.trunk.register_forward_hook(lambda m, args, out: trunk_out.append(out[0].detach().clone()))
    rec = _Recorder(enc)
    with torch.no_grad():
        features, expert_index = enc(px)
    rec.remove()
    assert expert_index.tolist() == [1, 0]
    th = trunk_out[0]
    # each expert ran once, on its own image only
    assert len(rec.calls[0]) == 1 and len(rec.calls[1]) == 1
    assert torch.equal(rec.calls[1][0], th[0:1])
    assert torch.equal(rec.calls[0][0], th[1:2])

    # same result as each image alone
    with torch.no_grad():
        f0, e0 = enc(px[0:1])
        f1, e1 = enc(px[1:2])
    assert e0.tolist() == [1] and e1.tolist() == [0]
    torch.testing.assert_close(features[0:1], f0)
    torch.testing.assert_close(features[1:2], f1)
    # and the experts really differ (otherwise the routing checks prove little)
    with torch.no_grad():
        assert not torch.allclose(enc.experts[0](th[0:1]), enc.experts[1](th[0:1]))

    # forcing expert 0 runs only expert 0, on the whole batch
    rec = _Recorder(enc)
    with torch.no_grad():
        forced, forced_index = enc(px, expert=0)
    rec.remove()
    h.remove()
    assert forced_index.tolist() == [0, 0]
    assert rec.calls[1] == []
    assert len(rec.calls[0]) == 1 and torch.equal(rec.calls[0][0], th)
    torch.testing.assert_close(forced[1:2], f1)

    # the trunk output does not depend on the expert choice (calls: routed, alone x2, forced)
    assert len(trunk_out) == 4
    assert torch.equal(trunk_out[0], trunk_out[3])


def test_trunk_output_independent_of_expert(tiny_cfg):
    enc = _encoder(tiny_cfg)
    px = _pixels(2, 64, 64)
    outs = []
    h = enc.trunk.register_forward_hook(lambda m, args, out: outs.append(out[0].detach().clone()))
    with torch.no_grad():
        for e in (None, 0, 1):
            enc(px, expert=e)
    h.remove()
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


# ---- conformance with transformers' SigLIP --------------------------------------------------------


@pytest.fixture(scope="module")
def siglip(tiny_cfg):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.SiglipVisionConfig(
        hidden_size=tiny_cfg.hidden_size,
        intermediate_size=tiny_cfg.intermediate_size,
        num_attention_heads=tiny_cfg.num_attention_heads,
        num_hidden_layers=tiny_cfg.trunk_layers + tiny_cfg.expert_layers,
        image_size=tiny_cfg.image_size,
        patch_size=tiny_cfg.patch_size,
        vision_use_head=False,
    )
    model = transformers.SiglipVisionModel(hf_cfg).eval()
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "layer_norm" in name or "layernorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * noise)
            elif "position_embedding" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.15 * noise)
    return model


def _max_err(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    err = (a - b).abs().max().item()
    return err, 1e-5 * max(1.0, b.abs().max().item())


def _ours(enc: UnderstandingEncoder, px: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        th, _ = enc.trunk(px)
        return enc.experts[0].forward_tokens(th)


def _reference(model, px: torch.Tensor, interpolate: bool) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=px, interpolate_pos_encoding=interpolate).last_hidden_state


def test_vision_config_from_siglip(siglip, tiny_cfg):
    cfg = vision_config_from_siglip(siglip.config.to_dict(), tiny_cfg.trunk_layers, tiny_cfg.expert_layers)
    assert cfg == tiny_cfg
    assert vision_config_from_siglip(siglip.config.to_dict(), 1, 2, router_hidden=7).router_hidden == 7
    with pytest.raises(ValueError, match="layers"):
        vision_config_from_siglip(siglip.config.to_dict(), 2, 2)


def test_siglip_conformance(siglip, tiny_cfg):
    enc = _encoder(tiny_cfg, seed=5)
    sd = siglip.state_dict()
    assert not any(k.startswith("head.") for k in sd)
    load_siglip_state_dict(enc, sd)
    # both experts got the same copy of the last layers
    for a, b in zip(enc.experts[0].state_dict().values(), enc.experts[1].state_dict().values()):
        assert torch.equal(a, b)

    cases = [(_pixels(2, 64, 64, seed=2), False), (_pixels(2, 128, 96, seed=3), True)]
    refs = [_reference(siglip, px, interp) for px, interp in cases]
    for (px, _), ref in zip(cases, refs):
        out = _ours(enc, px)
        assert out.shape == ref.shape
        err, tol = _max_err(out, ref)
        assert err <= tol, (tuple(px.shape), err, tol)

    # a perturbed mapped weight must break conformance
    perturb = [
        enc.trunk.embeddings.position_embedding.weight,
        enc.trunk.embeddings.patch_embedding.bias,
        enc.trunk.layers[1].self_attn.k_proj.weight,
        enc.experts[0].layers[0].mlp.fc2.weight,
        enc.experts[0].post_layernorm.bias,
    ]
    for p in perturb:
        with torch.no_grad():
            p.view(-1)[3] += 0.05
        for (px, _), ref in zip(cases, refs):
            err, tol = _max_err(_ours(enc, px), ref)
            assert err > tol
        with torch.no_grad():
            p.view(-1)[3] -= 0.05


def test_load_siglip_state_dict_keys(siglip, tiny_cfg):
    enc = _encoder(tiny_cfg)
    sd = dict(siglip.state_dict())
    before = {k: v.clone() for k, v in enc.state_dict().items()}

    # with the vision_model. prefix
    load_siglip_state_dict(enc, {"vision_model." + k: v for k, v in sd.items()})
    assert torch.equal(enc.trunk.layers[0].self_attn.q_proj.weight, sd["encoder.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(enc.experts[1].layers[0].mlp.fc1.bias, sd["encoder.layers.2.mlp.fc1.bias"])
    # the router is not SigLIP's and keeps its weights
    assert torch.equal(enc.trunk.router.fc1.weight, before["trunk.router.fc1.weight"])

    enc = _encoder(tiny_cfg)
    missing = {k: v for k, v in sd.items() if k != "encoder.layers.1.layer_norm2.bias"}
    with pytest.raises(ValueError, match=r"missing key 'encoder\.layers\.1\.layer_norm2\.bias'"):
        load_siglip_state_dict(enc, missing)
    with pytest.raises(ValueError, match=r"unexpected key 'head\.probe'"):
        load_siglip_state_dict(enc, {**sd, "head.probe": torch.zeros(1, 1, tiny_cfg.hidden_size)})
    with pytest.raises(ValueError, match=r"unexpected key 'encoder\.layers\.3\.mlp\.fc1\.bias'"):
        load_siglip_state_dict(enc, {**sd, "encoder.layers.3.mlp.fc1.bias": torch.zeros(tiny_cfg.intermediate_size)})
    bad = dict(sd)
    bad["encoder.layers.2.mlp.fc1.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"encoder\.layers\.2\.mlp\.fc1\.weight.*shape"):
        load_siglip_state_dict(enc, bad)
    # nothing was copied by the failed loads
    for k, v in enc.state_dict().items():
        assert torch.equal(v, _encoder(tiny_cfg).state_dict()[k])
