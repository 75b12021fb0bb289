"""`emma-export init` for upstream Qwen3 / SigLIP / DC-AE folders of sizes no named EMMA config has.

The upstream models here are built from upstream configs written for this test, not derived from an EMMA
config (other widths, head counts, GQA ratios, depths and a 16-pixel cell), plus one at the published
emma-4b shapes with few layers, so a wrong default in EMMA's configs cannot pass on both sides. Each is
initialised into an EMMA checkpoint whose config.json is derived from the upstream configs, checked
against the upstream models (conformance), exported and verified end to end.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from emma_export.config import SamplerConfig, get_config
from emma_export.weights.upstream import EmmaChoices, UpstreamError, config_from_upstream

ROOT = Path(__file__).resolve().parents[1]


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _script():
    return _module(ROOT / "scripts" / "make_tiny_upstream.py", "make_tiny_upstream")


# Qwen3: 6 query heads on 2 KV heads (GQA 3), head_dim 12 (not hidden / heads), 3 layers, its own RoPE
# theta and norm eps. SigLIP: 24 wide, 3 heads, 4 layers, 96 px native (3 x 3 patches of 32 px after the
# shuffle). DC-AE: 4 latent channels, ResBlock and EfficientViT stages, a Conv downsample.
QWEN3_A = dict(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
               num_key_value_heads=2, head_dim=12, hidden_act="silu", max_position_embeddings=1024, rms_norm_eps=1e-5,
               rope_theta=500_000.0, tie_word_embeddings=True, attention_bias=False)
SIGLIP_A = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=4, num_attention_heads=3, num_channels=3,
                image_size=96, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-5, vision_use_head=False)
DCAE_A = dict(in_channels=3, latent_channels=4, attention_head_dim=8,
              encoder_block_types=["ResBlock"] * 4 + ["EfficientViTBlock"] * 2,
              decoder_block_types=["ResBlock"] * 4 + ["EfficientViTBlock"] * 2,
              encoder_block_out_channels=[8, 8, 16, 16, 32, 32], decoder_block_out_channels=[8, 8, 16, 16, 32, 32],
              encoder_layers_per_block=[1, 1, 1, 1, 1, 1], decoder_layers_per_block=[1, 1, 1, 1, 1, 2],
              encoder_qkv_multiscales=[[], [], [], [], [5], [5]], decoder_qkv_multiscales=[[], [], [], [], [5], [5]],
              upsample_block_type="interpolate", downsample_block_type="Conv", decoder_norm_types="rms_norm",
              decoder_act_fns="silu", scaling_factor=0.37)

# One KV head for 4 query heads (multi-query), 5 layers; SigLIP patch 4 with a 16x DC-AE (5 stages): a
# 4 x 4 pixel shuffle; the LLM wider than heads x head_dim.
QWEN3_B = dict(vocab_size=280, hidden_size=40, intermediate_size=72, num_hidden_layers=5, num_attention_heads=4,
               num_key_value_heads=1, head_dim=16, hidden_act="silu", max_position_embeddings=512, rms_norm_eps=1e-6,
               rope_theta=10_000.0, tie_word_embeddings=True, attention_bias=False)
SIGLIP_B = dict(hidden_size=20, intermediate_size=36, num_hidden_layers=2, num_attention_heads=2, num_channels=3,
                image_size=48, patch_size=4, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False)
DCAE_B = dict(in_channels=3, latent_channels=8, attention_head_dim=8, encoder_block_types="ResBlock", decoder_block_types="ResBlock",
              encoder_block_out_channels=[8, 16, 16, 32, 32], decoder_block_out_channels=[8, 16, 16, 32, 32],
              encoder_layers_per_block=[1, 1, 1, 1, 1], decoder_layers_per_block=[1, 1, 1, 1, 1],
              encoder_qkv_multiscales=[[]] * 5, decoder_qkv_multiscales=[[]] * 5, upsample_block_type="pixel_shuffle",
              downsample_block_type="pixel_unshuffle", decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.8)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- the derived config ---------------------------------------------------------------------------


def test_config_derived_from_upstream_sizes():
    cfg = config_from_upstream(QWEN3_A, SIGLIP_A, DCAE_A)
    l, v, a = cfg.llm, cfg.vision, cfg.ae
    assert cfg.name == "custom"
    assert (l.hidden_size, l.intermediate_size, l.num_attention_heads, l.num_key_value_heads, l.head_dim) == (48, 96, 6, 2, 12)
    assert (l.shared_layers, l.decoupled_layers, l.rope_theta, l.rms_norm_eps, l.vocab_size) == (1, 2, 500_000.0, 1e-5, 300)
    assert (v.hidden_size, v.num_attention_heads, v.trunk_layers, v.expert_layers, v.num_experts) == (24, 3, 3, 1, 2)
    assert (v.patch_size, v.shuffle, v.feature_dim, v.layer_norm_eps, v.router_hidden) == (16, 2, 96, 1e-5, 24)
    assert (a.latent_channels, a.scaling_factor, cfg.cell, cfg.fused_dim) == (4, 0.37, 32, 100)
    # EMMA's own choices at the paper's defaults
    assert cfg.sampler == SamplerConfig() and cfg.reference_branch == "gen" and cfg.timestep_freq_dim == 256
    assert (cfg.adapter_hidden, cfg.image_size, cfg.max_context) == (48, 96, 1024)

    b = config_from_upstream(QWEN3_B, SIGLIP_B, DCAE_B, EmmaChoices(name="mq", shared_layers=3, expert_layers=1))
    assert (b.name, b.cell, b.vision.shuffle, b.vision.feature_dim, b.llm.shared_layers, b.llm.decoupled_layers) == ("mq", 16, 4, 320, 3, 2)
    assert b.fused_dim == 320 + 8
    assert (b.vision.trunk_layers, b.vision.expert_layers, b.image_size) == (1, 1, 48)


def test_paper_defaults_give_emma_4b_from_the_public_configs():
    conf = _module(ROOT / "tests" / "test_conformance.py", "conformance_tests")
    cfg = config_from_upstream(conf.QWEN3_4B, conf.SIGLIP2_SO400M_PATCH16_512, conf.DCAE_F32C32_SANA_1_0)
    # 18 + 18 LLM layers, the last 3 ViT layers as 2 experts, adapter to 2560, 256 timestep channels, 50 steps...
    assert dataclasses.replace(cfg, name="emma-4b") == get_config("emma-4b")


@pytest.mark.parametrize("change, message", [
    ((dict(SIGLIP_A, patch_size=24), None, None), "does not divide"),
    ((None, dict(QWEN3_A, num_key_value_heads=4), None), "multiple of KV heads"),
    ((None, dict(QWEN3_A, tie_word_embeddings=False), None), "tie_word_embeddings"),
    ((None, None, EmmaChoices(shared_layers=3)), "shared layers 3"),
    ((None, None, EmmaChoices(expert_layers=5)), "expert layers 5"),
    ((None, None, EmmaChoices(name="tiny")), "taken by a named EMMA config"),
    ((None, None, None, dict(DCAE_A, latent_channels=6)), "not a multiple of latent_channels 6"),
    ((None, None, None, dict(DCAE_A, encoder_block_out_channels=[8, 8, 16, 24, 32, 32])), "16 -> 24 channel downsample"),
])
def test_inconsistent_upstream_sizes_are_refused(change, message):
    siglip, qwen, choices, dcae = (*change, None)[:4]
    with pytest.raises(UpstreamError, match=message):
        config_from_upstream(qwen or QWEN3_A, siglip or SIGLIP_A, dcae or DCAE_A, choices)


# ---- init -> conformance -> export -> verify --e2e ------------------------------------------------------


@pytest.fixture(scope="module")
def upstream_a(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("diffusers")
    return _script().make_upstream(tmp_path_factory.mktemp("up-a"), QWEN3_A, SIGLIP_A, DCAE_A, seed=4)


def _up(dirs) -> list[str]:
    return ["--llm", str(dirs["llm"]), "--vision", str(dirs["vision"]), "--ae", str(dirs["ae"])]


def _perturb(src: Path, dst: Path, key_part: str) -> str:
    """A copy of an upstream folder with one weight tensor (the first whose name contains key_part) changed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    for f in sorted(dst.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            keys = list(h.keys())
            hit = next((k for k in keys if key_part in k and h.get_slice(k).get_shape().__len__() > 1), None)
            if hit is None:
                continue
            tensors = {k: h.get_tensor(k) for k in keys}
            meta = h.metadata()
        tensors[hit] = tensors[hit].clone()
        tensors[hit].view(-1)[:8] += 0.05
        save_file(tensors, str(f), metadata=meta)
        return hit
    raise AssertionError(f"no tensor named like {key_part} in {src}")


def _randomize(ckpt: Path, prefix: str) -> None:
    """Replace the checkpoint's tensors whose names start with ``prefix`` by seeded random values."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            tensors = {k: h.get_tensor(k) for k in h.keys()}
            meta = h.metadata()
        hits = [k for k in tensors if k.startswith(prefix)]
        for k in hits:
            tensors[k] = (torch.randn(tensors[k].shape, generator=g) / tensors[k].shape[-1] ** 0.5).to(tensors[k].dtype)
        if hits:
            save_file(tensors, str(f), metadata=meta)


def test_init_conformance_export_verify_for_a_size_no_named_config_has(upstream_a, tmp_path):
    from click.testing import CliRunner

    from emma_export.cli import main
    from emma_export.verify_e2e import verify_pipelines
    from emma_export.weights.checkpoint import read_config
    from emma_runtime.bundle import Bundle

    r = CliRunner()
    ck = tmp_path / "ck"
    res = r.invoke(main, ["init", *_up(upstream_a), "--out", str(ck), "--name", "custom-a"])
    assert res.exit_code == 0, res.output
    assert "config custom-a (LLM 48 wide, 1 shared + 2 decoupled layers" in res.output
    cfg = read_config(ck)
    assert cfg == dataclasses.replace(config_from_upstream(QWEN3_A, SIGLIP_A, DCAE_A), name="custom-a")
    assert json.loads((ck / "config.json").read_text())["llm"]["num_key_value_heads"] == 2

    res = r.invoke(main, ["conformance", *_up(upstream_a), "--checkpoint", str(ck), "--json", str(tmp_path / "c.json")])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert len(rows) == 8 and all(row["passed"] for row in rows)

    # The paper's zero Gen head predicts v = 0, under which the velocity and image comparisons prove
    # nothing; a copy with a random Gen head (as after training) is what gets exported and verified.
    trained = tmp_path / "ck-trained"
    shutil.copytree(ck, trained)
    _randomize(trained, "gen_head.proj.")

    bundle = tmp_path / "bundle"
    res = r.invoke(main, ["export", "--checkpoint", str(trained), "--out", str(bundle), "--quiet"])
    assert res.exit_code == 0, res.output
    assert json.loads((bundle / "manifest.json").read_text())["config_name"] == "custom-a"
    res = r.invoke(main, ["verify", "--bundle", str(bundle), "--e2e"])
    assert res.exit_code == 0, res.output
    assert "verify: passed" in res.output and "pipeline generate" in res.output
    # non-square images through the derived model: 3 x 2 tokens per image, per-step parity on every task
    from emma_export.export.source import WeightSource

    model = WeightSource.from_args(None, str(trained)).full_model()
    assert model.cfg.name == "custom-a" and torch.count_nonzero(model.gen_head.proj.weight) > 0
    out = verify_pipelines(Bundle.load(bundle), model, 96, 64, max_new_tokens=4)
    for task, row in out.items():
        assert row["passed"], (task, row)
    assert out["generate"]["visual_tokens"] == 6 and out["generate"]["velocity_steps"] == 50
    assert out["generate"]["reference_velocity_rms"] > 0.1 and out["edit"]["reference_velocity_rms"] > 0.1

    # one perturbed upstream weight makes conformance of the same checkpoint fail, naming what it reaches
    for folder, part, expect in (("llm", "layers.2.mlp.down_proj", "text_logits"), ("ae", "decoder.", "ae_decode")):
        bad = dict(upstream_a)
        bad[folder] = tmp_path / f"bad-{folder}"
        _perturb(upstream_a[folder], bad[folder], part)
        res = r.invoke(main, ["conformance", *_up(bad), "--checkpoint", str(ck)])
        assert res.exit_code == 1, res.output
        assert f"FAIL {expect}" in res.output


def test_multi_query_16px_cell_upstream_conforms(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("diffusers")
    from emma_export.conformance import run_conformance

    dirs = _script().make_upstream(tmp_path, QWEN3_B, SIGLIP_B, DCAE_B, seed=5)
    rep = run_conformance(dirs["llm"], dirs["vision"], dirs["ae"])
    for row in rep.rows:
        print(f"{row.component:22s} max_abs={row.max_abs:.3g} rel_l2={row.rel_l2:.3g} {row.passed}")
    assert rep.passed, rep.failures
    assert rep.config == "custom"
    assert rep.row("vision_nonsquare").shape == (2, 16 * 12, 20)  # 64 x 48 px in 4 px patches
    assert rep.row("ae_decode_nonsquare").shape == (1, 3, 32, 48)
    # explicit choices reach the in-memory init too
    rep = run_conformance(dirs["llm"], dirs["vision"], dirs["ae"], choices=EmmaChoices(shared_layers=4, expert_layers=2))
    assert rep.passed, rep.failures


def test_emma_4b_shapes_with_few_layers_conform(tmp_path):
    """Qwen3-4B, SigLIP2-so400m-patch16-512 and DC-AE f32c32 at their published widths, heads, head dims,
    GQA ratio and norms, with 2 LLM layers, 2 ViT layers and one layer per DC-AE stage. The vocabulary is
    cut to 4096 rows: the published 151936-row embedding alone is 1.6 GB in fp32 and adds nothing the
    4096-row one does not check."""
    pytest.importorskip("transformers")
    pytest.importorskip("diffusers")
    from emma_export.conformance import run_conformance

    conf = _module(ROOT / "tests" / "test_conformance.py", "conformance_tests")
    qwen = {k: v for k, v in conf.QWEN3_4B.items() if k not in ("architectures", "model_type", "torch_dtype", "rope_scaling")}
    qwen.update(num_hidden_layers=2, vocab_size=4096)
    siglip = {k: v for k, v in conf.SIGLIP2_SO400M_PATCH16_512["vision_config"].items() if k != "model_type"}
    siglip.update(num_hidden_layers=2, vision_use_head=False)
    dcae = {k: v for k, v in conf.DCAE_F32C32_SANA_1_0.items() if not k.startswith("_")}
    dcae.update(encoder_layers_per_block=[1] * 6, decoder_layers_per_block=[1] * 6)
    dirs = _script().make_upstream(tmp_path, qwen, siglip, dcae, seed=6, shard_llm=False)
    rep = run_conformance(dirs["llm"], dirs["vision"], dirs["ae"])
    for row in rep.rows:
        print(f"{row.component:22s} max_abs={row.max_abs:.3g} rel_l2={row.rel_l2:.3g} {row.passed}")
    assert rep.passed, rep.failures
    assert rep.row("vision_native").shape[-1] == 1152 and rep.row("ae_decode_nonsquare").shape == (1, 3, 64, 96)
