"""The assembled reference EMMA: shapes, determinism, the Gen head, checkpoints, info."""

import json

import numpy as np
import pytest
import torch

from emma_export.config import EMMAConfig, get_config
from emma_export.model import pipelines as ref
from emma_export.model.backbone import GEN, full_mask
from emma_export.model.emma import build_model
from emma_export.weights.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def test_token_grid_and_fused_width_for_non_square_images(tiny_model, tiny_cfg):
    img = torch.rand(1, 3, 128, 96) * 2 - 1
    tokens, chosen = tiny_model.und_image_tokens(img)
    assert tokens.shape == (1, 4 * 3, tiny_cfg.llm.hidden_size)
    assert tiny_cfg.fused_dim == 4 * tiny_cfg.vision.hidden_size + tiny_cfg.ae.latent_channels == 136
    assert tiny_model.und_adapter.norm.normalized_shape == (136,)
    assert tiny_cfg.num_visual_tokens(128, 96) == 12
    assert get_config("emma-4b").num_visual_tokens(512, 512) == 256
    assert get_config("emma-4b").num_visual_tokens(1024, 1024) == 1024
    assert get_config("emma-4b").fused_dim == 4640


def test_sizes_not_multiple_of_32_are_refused(tiny_cfg):
    with pytest.raises(ValueError, match="not a positive multiple of 32"):
        tiny_cfg.grid(64, 50)


def test_build_model_is_deterministic(tiny_cfg):
    a = build_model(tiny_cfg, seed=3).state_dict()
    b = build_model(tiny_cfg, seed=3).state_dict()
    c = build_model(tiny_cfg, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].numel() > 1 and a[k].std() > 0)


def test_zero_init_gen_head_gives_zero_velocity(tiny_cfg, tokenizer):
    model = build_model(tiny_cfg, seed=0, zero_gen_head=True)
    noise = torch.randn(1, tiny_cfg.ae.latent_channels, 2, 2)
    from emma_runtime.template import SpecialIds

    prefix, _ = ref.run_prefix(model, ref.template.split_prefix(ref.template.generate(SpecialIds.from_tokenizer(tokenizer), [65, 66]))[0], {}, True)
    v = ref.velocity(model, prefix, noise, 0.7)
    assert v.shape == noise.shape and torch.count_nonzero(v) == 0


def test_denoising_step_with_prefix_cache_equals_a_full_forward(tiny_model, tiny_cfg, tokenizer):
    """The reference reuses the prompt's KV cache; that must equal running everything at once."""
    from emma_runtime.template import SpecialIds

    sp = SpecialIds.from_tokenizer(tokenizer)
    segs = ref.template.split_prefix(ref.template.generate(sp, tokenizer.encode("a red circle").ids))[0]
    prefix, _ = ref.run_prefix(tiny_model, segs, {}, True)
    x = torch.randn(1, tiny_cfg.ae.latent_channels, 2, 2)
    v_cached = ref.velocity(tiny_model, prefix, x, 0.5)
    ids = torch.tensor([list(segs[0].ids)])
    tgt = tiny_model.target_tokens(x, torch.tensor([0.5]))
    seq = torch.cat([tiny_model.embed(ids), tgt], 1)
    P, L = ids.shape[1], tgt.shape[1]
    branch = torch.tensor([[0] * P + [GEN] * L])
    img = torch.tensor([[-1] * P + [0] * L])
    h, _ = tiny_model.llm(seq, torch.arange(P + L)[None], branch, full_mask(img, True))
    v_full = tiny_model.gen_head(h[:, P:]).transpose(1, 2).reshape(x.shape)
    assert torch.allclose(v_cached, v_full, atol=1e-5)


def test_reference_pipelines_run(tiny_model, tokenizer):
    img = torch.rand(1, 3, 64, 64) * 2 - 1
    u = ref.understand(tiny_model, tokenizer, img, "what?", max_new_tokens=4)
    assert u.visual_tokens == 4 and len(u.token_ids) <= 4 and u.expert in (0, 1)
    noise = np.random.default_rng(0).standard_normal((1, 8, 2, 2)).astype(np.float32)
    g = ref.generate(tiny_model, tokenizer, "a red circle", noise)
    assert g.image.shape == (1, 3, 64, 64) and len(g.trajectory) == 4
    e = ref.edit(tiny_model, tokenizer, img, "make it green", noise)
    assert e.image.shape == (1, 3, 64, 64) and e.visual_tokens == 8


def test_safetensors_round_trip(tmp_path, tiny_model):
    p = save_checkpoint(tiny_model, tmp_path / "w.safetensors")
    m = load_checkpoint(p)
    assert m.cfg == tiny_model.cfg
    sa, sb = tiny_model.state_dict(), m.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_checkpoint_errors_name_the_tensor(tmp_path, tiny_model):
    from safetensors.torch import save_file

    from emma_export.weights.checkpoint import CONFIG_KEY

    sd = {k: v.contiguous() for k, v in tiny_model.state_dict().items()}
    meta = {CONFIG_KEY: tiny_model.cfg.to_json()}
    missing = dict(sd)
    del missing["gen_head.proj.weight"]
    save_file(missing, str(tmp_path / "missing.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="missing tensor 'gen_head.proj.weight'"):
        load_checkpoint(tmp_path / "missing.safetensors")
    shaped = dict(sd)
    shaped["und_adapter.fc2.bias"] = torch.zeros(3)
    save_file(shaped, str(tmp_path / "shape.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"'und_adapter.fc2.bias' has shape \(3,\), expected \(64,\)"):
        load_checkpoint(tmp_path / "shape.safetensors")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CheckpointError, match="corrupt.safetensors"):
        load_checkpoint(tmp_path / "corrupt.safetensors")
    save_file(sd, str(tmp_path / "nometa.safetensors"))
    with pytest.raises(CheckpointError, match="not an EMMA checkpoint"):
        load_checkpoint(tmp_path / "nometa.safetensors")


def test_config_json_round_trip():
    for name in ("tiny", "small", "emma-4b"):
        cfg = get_config(name)
        assert EMMAConfig.from_json(cfg.to_json()) == cfg


def test_info_emma_4b_counts_without_allocating(capsys):
    from click.testing import CliRunner

    from emma_export.cli import main

    r = CliRunner().invoke(main, ["info", "--config", "emma-4b", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert 6.9e9 < info["llm_stored"] < 7.6e9  # about 7.2B stored with 18 + 18 layers
    assert 3.6e9 < info["llm_active_per_token"] < 4.4e9  # about 4.0B active per token
    assert 7.5e9 < info["total"] < 8.6e9  # about 8B in all
    assert 0.35e9 < info["parameters"]["und_trunk"] + info["parameters"]["und_expert_0"] < 0.45e9
