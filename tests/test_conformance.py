"""Conformance with transformers' Qwen3 and SigLIP and diffusers' DC-AE; `emma-export init` from their
checkpoints; the key map; and the emma-4b config against the public upstream configs.

Upstream models are tiny random ones made by ``scripts/make_tiny_upstream.py``; nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from emma_export.config import get_config
from emma_export.weights.keymap import (
    FRESH_PREFIXES,
    KeyMapError,
    build_plan,
    emma_shapes,
    map_qwen3_key,
    map_siglip_key,
    map_upstream_key,
)
from emma_export.weights.upstream import (
    ConfigMismatchError,
    UpstreamError,
    UpstreamFolder,
    UpstreamSet,
    check_tied_lm_head,
    derive_config,
    resolve_config,
)

ROOT = Path(__file__).resolve().parents[1]

COMPONENTS = [
    "text_logits",
    "text_decode",
    "vision_native",
    "vision_nonsquare",
    "ae_encode",
    "ae_decode",
    "ae_encode_nonsquare",
    "ae_decode_nonsquare",
]


def _script():
    spec = importlib.util.spec_from_file_location("make_tiny_upstream", ROOT / "scripts" / "make_tiny_upstream.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The models here are tiny: one intra-op thread is several times faster than two on a busy
    # 2-core machine (thread hand-offs dominate). Restored for the other test modules.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("diffusers")
    return _script().make_tiny_upstream(tmp_path_factory.mktemp("upstream"), "tiny", seed=0)


@pytest.fixture(scope="module")
def upstream_models(upstream):
    from emma_export.conformance import load_upstream_models

    return load_upstream_models(upstream["llm"], upstream["vision"], upstream["ae"])


@pytest.fixture(scope="module")
def checkpoint(upstream, tmp_path_factory):
    from emma_export.init_checkpoint import init_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "emma-tiny"
    # small shards: the tiny checkpoint (~2.8 MB) spans several files and the index
    rep = init_checkpoint(upstream["llm"], upstream["vision"], upstream["ae"], "tiny", out, seed=3, shard_bytes=400_000)
    return out, rep


def _vkey(folder, key: str) -> str:
    """SigLIP keys carry ``vision_model.`` in hub checkpoints; transformers 5 saves SiglipVisionModel without it."""
    return key if key in folder else f"vision_model.{key}"


def _print(rep):
    for r in rep.rows:
        print(f"{r.component:22s} max_abs={r.max_abs:.3g} rel_l2={r.rel_l2:.3g} tol={r.tolerance:.3g} {r.passed}")


# ---- conformance ----------------------------------------------------------------------------------


def test_conformance_in_memory(upstream):
    from emma_export.conformance import run_conformance

    rep = run_conformance(upstream["llm"], upstream["vision"], upstream["ae"])
    _print(rep)
    assert [r.component for r in rep.rows] == COMPONENTS
    assert rep.passed, rep.failures
    for r in rep.rows:
        assert r.max_abs <= r.tolerance and r.rel_l2 < 1e-5
    # the non-square cases really are non-square and use interpolated positions
    assert rep.row("vision_nonsquare").shape == (2, 8 * 6, 32)
    assert rep.row("ae_decode_nonsquare").shape == (1, 3, 64, 96)


def _first(sd, prefix, last=False):
    keys = [k for k, v in sd.items() if k.startswith(prefix) and k.endswith("weight") and v.dim() > 1]
    return keys[-1] if last else keys[0]


def test_perturbed_weight_fails(upstream, upstream_models):
    from emma_export.conformance import check_model
    from emma_export.init_checkpoint import init_model

    model = init_model(upstream["llm"], upstream["vision"], upstream["ae"], "tiny")
    assert check_model(model, upstream_models).passed
    sd = model.state_dict()
    text = {"text_logits", "text_decode"}
    vision = {"vision_native", "vision_nonsquare"}
    cases = [
        ("llm.embed_tokens.weight", text),
        ("llm.layers.0.self_attn.k_proj.shared.weight", text),
        ("llm.layers.1.self_attn.v_proj.und.weight", text),
        ("llm.layers.3.mlp.und.down_proj.weight", text),
        ("llm.layers.2.self_attn.q_norm.und.weight", text),
        ("lm_head.norm.weight", text),
        ("vision.trunk.embeddings.position_embedding.weight", vision),
        ("vision.trunk.layers.1.mlp.fc1.weight", vision),
        ("vision.experts.0.layers.0.self_attn.out_proj.weight", vision),
        ("vision.experts.0.post_layernorm.bias", vision),
        # the decode rows decode the upstream latent, so an encoder weight reaches the encode rows only
        (_first(sd, "ae.encoder."), {"ae_encode", "ae_encode_nonsquare"}),
        (_first(sd, "ae.decoder.", last=True), {"ae_decode", "ae_decode_nonsquare"}),
        # weights the comparisons must not see: the Gen branch, the STEM expert, the fresh tensors
        ("llm.layers.3.mlp.gen.down_proj.weight", set()),
        ("llm.layers.1.self_attn.v_proj.gen.weight", set()),
        ("vision.experts.1.layers.0.mlp.fc2.weight", set()),
        ("und_adapter.fc1.weight", set()),
    ]
    for name, must_fail in cases:
        p = sd[name]
        with torch.no_grad():
            p.view(-1)[:4] += 0.1
        rep = check_model(model, upstream_models)
        with torch.no_grad():
            p.view(-1)[:4] -= 0.1
        assert set(rep.failures) == must_fail, (name, rep.failures)
    assert check_model(model, upstream_models).passed


def test_dcae_layout_of_emma_4b_conforms():
    """The tiny config's autoencoder has ResBlocks only; emma-4b's DC-AE f32c32 also has EfficientViT
    (multiscale linear attention) stages, a Conv downsample and an interpolating upsample. Same block
    types and options at tiny widths (plus batch-norm stages, as in the f32c32-in/mix models), loaded
    through the key map, against AutoencoderDC."""
    import dataclasses

    diffusers = pytest.importorskip("diffusers")
    from emma_export.conformance import compare_ae
    from emma_export.model.autoencoder import Autoencoder
    from emma_export.weights.keymap import map_dcae_key

    ref4b = get_config("emma-4b").ae
    cfg = dataclasses.replace(
        ref4b,
        latent_channels=8,
        attention_head_dim=8,
        encoder_block_out_channels=(8, 16, 16, 32, 32, 32),
        decoder_block_out_channels=(8, 16, 16, 32, 32, 32),
        encoder_layers_per_block=(1, 1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1, 2),
        decoder_norm_types=("batch_norm",) * 2 + ("rms_norm",) * 4,
        decoder_act_fns=("relu",) * 2 + ("silu",) * 4,
    )
    assert (cfg.encoder_block_types, cfg.upsample_block_type, cfg.downsample_block_type) == (
        ref4b.encoder_block_types, "interpolate", "Conv")
    dc = diffusers.AutoencoderDC(**{k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}).eval()
    _script()._scale_weights(dc, seed=5)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, b in dc.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    ae = Autoencoder(cfg).eval()
    sd = {}
    for k, v in dc.state_dict().items():
        (target,) = map_dcae_key(k)
        sd[target[len("ae."):]] = v
    ae.load_state_dict(sd, strict=True)
    rows = compare_ae(ae, dc, 32)
    for r in rows:
        print(f"{r.component:22s} max_abs={r.max_abs:.3g} rel_l2={r.rel_l2:.3g} tol={r.tolerance:.3g} {r.passed}")
    assert all(r.passed for r in rows), rows
    attn = next(k for k in sd if k.startswith("encoder.") and ".attn." in k and k.endswith("weight"))
    with torch.no_grad():
        ae.encoder.get_parameter(attn[len("encoder."):]).view(-1)[:4] += 0.1
    assert {r.component for r in compare_ae(ae, dc, 32) if not r.passed} == {"ae_encode", "ae_encode_nonsquare"}


# ---- init -----------------------------------------------------------------------------------------


def test_init_writes_a_loadable_sharded_checkpoint(upstream, checkpoint):
    from emma_export.weights.checkpoint import load_checkpoint, read_config
    from emma_export.weights.init import init_tensor

    out, rep = checkpoint
    assert rep.config == "tiny" and len(rep.shards) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(rep.shards)
    assert all((out / s).exists() for s in rep.shards)
    assert (out / "tokenizer.json").read_bytes() == (upstream["llm"] / "tokenizer.json").read_bytes()
    assert read_config(out) == get_config("tiny")
    assert rep.plan["emma_fresh"] > 0 and rep.plan["upstream_dropped"] == 0
    assert not rep.tokenizer_warnings

    model = load_checkpoint(out)
    sd = model.state_dict()
    assert set(index["weight_map"]) == set(sd)
    # the Gen head starts at zero
    assert torch.count_nonzero(model.gen_head.proj.weight) == 0 and torch.count_nonzero(model.gen_head.proj.bias) == 0
    # both branches of every layer start from the same LLM layer
    pairs = [(k, k.replace(".und.", ".gen.")) for k in sd if k.startswith("llm.") and ".und." in k]
    assert len(pairs) == 4 * 7 + 2 * 4  # v, o, 2 norms, 3 MLP per layer; q, k, q_norm, k_norm in the 2 deep layers
    for a, b in pairs:
        assert torch.equal(sd[a], sd[b]), a
    # shared Q/K in the shallow layers, from the same Qwen3 layer
    ups = UpstreamSet.open(upstream["llm"], upstream["vision"], upstream["ae"])
    for i in range(2):
        for m in ("q_proj", "k_proj", "q_norm", "k_norm"):
            assert torch.equal(sd[f"llm.layers.{i}.self_attn.{m}.shared.weight"], ups.llm.get(f"model.layers.{i}.self_attn.{m}.weight"))
    assert torch.equal(sd["llm.layers.3.mlp.gen.up_proj.weight"], ups.llm.get("model.layers.3.mlp.up_proj.weight"))
    assert torch.equal(sd["lm_head.norm.weight"], ups.llm.get("model.norm.weight"))
    # both experts start from the ViT's last layers
    e0, e1 = model.vision.experts[0].state_dict(), model.vision.experts[1].state_dict()
    for k in e0:
        assert torch.equal(e0[k], e1[k]), k
    assert torch.equal(e1["layers.0.mlp.fc1.weight"], ups.vision.get(_vkey(ups.vision, "encoder.layers.2.mlp.fc1.weight")))
    # the autoencoder is copied key for key
    for k in ups.ae.keys():
        assert torch.equal(sd[f"ae.{k}"], ups.ae.get(k)), k
    # fresh tensors: adapters, timestep MLP, router, Gen head
    fresh = [k for k in sd if k.startswith(FRESH_PREFIXES)]
    assert any(k.startswith("gen_adapter.timestep.") for k in fresh) and any(k.startswith("vision.trunk.router.") for k in fresh)
    for k in fresh:
        assert torch.equal(sd[k], init_tensor(k, tuple(sd[k].shape), torch.float32, 3, zero_gen_head=True)), k


def test_init_checkpoint_equals_in_memory_init_and_conforms(upstream, checkpoint, upstream_models):
    from emma_export.conformance import check_model, run_conformance
    from emma_export.init_checkpoint import init_model
    from emma_export.weights.checkpoint import load_checkpoint

    out, _ = checkpoint
    a = load_checkpoint(out).state_dict()
    b = init_model(upstream["llm"], upstream["vision"], upstream["ae"], "tiny", seed=3).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rep = run_conformance(upstream["llm"], upstream["vision"], upstream["ae"], checkpoint=out)
    _print(rep)
    assert rep.passed and rep.checkpoint == str(out)
    assert check_model(load_checkpoint(out), upstream_models).passed


def test_export_side_accepts_the_checkpoint(checkpoint):
    from emma_export.components import all_components
    from emma_export.export.source import WeightSource

    out, _ = checkpoint
    src = WeightSource.from_args(None, str(out))
    assert src.cfg.name == "tiny"
    full = src.full_model().state_dict()
    for comp in all_components(src.cfg):  # each component streams its own tensors out of the shards
        m = src.model_for(comp)
        for k, v in m.state_dict().items():
            if comp.uses(k):
                assert torch.equal(v, full[k]), (comp.name, k)


def test_init_bf16(upstream, tmp_path):
    from safetensors import safe_open

    from emma_export.init_checkpoint import init_checkpoint
    from emma_export.weights.checkpoint import load_checkpoint

    rep = init_checkpoint(upstream["llm"], upstream["vision"], upstream["ae"], None, tmp_path / "c", dtype="bf16")
    assert rep.config == "tiny" and rep.shards == ["model.safetensors"]
    with safe_open(str(tmp_path / "c" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    load_checkpoint(tmp_path / "c")
    with pytest.raises(FileExistsError):
        init_checkpoint(upstream["llm"], upstream["vision"], upstream["ae"], None, tmp_path / "c")


def test_init_requires_the_tokenizer(upstream, tmp_path):
    from emma_export.init_checkpoint import init_checkpoint

    llm = tmp_path / "qwen3"
    shutil.copytree(upstream["llm"], llm)
    (llm / "tokenizer.json").unlink()
    with pytest.raises(UpstreamError, match="tokenizer.json"):
        init_checkpoint(llm, upstream["vision"], upstream["ae"], "tiny", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_config_mismatch_names_the_first_field(upstream, tmp_path):
    from emma_export.init_checkpoint import init_checkpoint

    with pytest.raises(ConfigMismatchError, match=r"ae\.latent_channels: config 'small' has 16") as e:
        init_checkpoint(upstream["llm"], upstream["vision"], upstream["ae"], "small", tmp_path / "out")
    assert e.value.field == "ae.latent_channels" and (e.value.expected, e.value.found) == (16, 8)
    assert not (tmp_path / "out").exists()

    ups = UpstreamSet.open(upstream["llm"], upstream["vision"], upstream["ae"])
    assert resolve_config(ups).name == "tiny"
    tiny = get_config("tiny")
    q, v, a = ups.llm.config, ups.vision.config, ups.ae.config
    cases = [
        (dict(q, rms_norm_eps=1e-5), v, a, "llm.rms_norm_eps"),
        (dict(q, num_key_value_heads=4), v, a, "llm.num_key_value_heads"),
        (dict(q, num_hidden_layers=5), v, a, "llm.num_hidden_layers"),
        (dict(q, tie_word_embeddings=False), v, a, "llm.tie_word_embeddings"),
        (q, dict(v, patch_size=14), a, "vision.patch_size"),
        (q, dict(v, num_hidden_layers=4), a, "vision.num_hidden_layers"),
        (q, v, dict(a, scaling_factor=0.5), "ae.scaling_factor"),
        # several fields differ: the first in EMMAConfig order (ae, vision, llm) is named
        (dict(q, vocab_size=2048), dict(v, hidden_size=48), a, "vision.hidden_size"),
    ]
    for qc, vc, ac, field in cases:
        with pytest.raises(ConfigMismatchError) as e:
            derive_config(qc, vc, ac, tiny)
        assert e.value.field.split(" ")[0] == field, (field, str(e.value))
        assert str(e.value).startswith(field)
    with pytest.raises(UpstreamError, match="RoPE type 'yarn'"):
        derive_config(dict(q, rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}), v, a, tiny)
    # no named config fits: a config derived from the upstream configs with the paper's defaults
    other = UpstreamSet(ups.llm, ups.vision, _with_config(ups.ae, scaling_factor=0.5))
    derived = resolve_config(other)
    assert derived.name == "custom" and derived.ae.scaling_factor == 0.5
    assert derived.sampler == get_config("emma-4b").sampler and derived.llm == tiny.llm
    with pytest.raises(ConfigMismatchError, match="ae.scaling_factor"):  # a named config must still match
        resolve_config(other, "tiny")


def _with_config(folder: UpstreamFolder, **changes) -> UpstreamFolder:
    f = UpstreamFolder(folder.path, folder.what)
    f.config = dict(f.config, **changes)
    return f


# ---- key map --------------------------------------------------------------------------------------


def test_qwen3_keymap_18_plus_18():
    llm = get_config("emma-4b").llm
    assert (llm.shared_layers, llm.decoupled_layers, llm.num_hidden_layers) == (18, 18, 36)
    assert map_qwen3_key("model.embed_tokens.weight", llm) == ["llm.embed_tokens.weight"]
    assert map_qwen3_key("model.norm.weight", llm) == ["lm_head.norm.weight"]
    assert map_qwen3_key("lm_head.weight", llm) == []  # tied: checked against the embedding
    assert map_qwen3_key("model.layers.17.self_attn.q_proj.weight", llm) == ["llm.layers.17.self_attn.q_proj.shared.weight"]
    assert map_qwen3_key("model.layers.17.self_attn.k_norm.weight", llm) == ["llm.layers.17.self_attn.k_norm.shared.weight"]
    assert map_qwen3_key("model.layers.18.self_attn.q_proj.weight", llm) == [
        "llm.layers.18.self_attn.q_proj.und.weight",
        "llm.layers.18.self_attn.q_proj.gen.weight",
    ]
    assert map_qwen3_key("model.layers.0.self_attn.v_proj.weight", llm) == [
        "llm.layers.0.self_attn.v_proj.und.weight",
        "llm.layers.0.self_attn.v_proj.gen.weight",
    ]
    assert map_qwen3_key("model.layers.35.mlp.down_proj.weight", llm)[1] == "llm.layers.35.mlp.gen.down_proj.weight"
    assert map_qwen3_key("model.layers.35.post_attention_layernorm.weight", llm)[0] == (
        "llm.layers.35.post_attention_layernorm.und.weight"
    )
    assert map_qwen3_key("model.rotary_emb.inv_freq", llm) == []
    with pytest.raises(KeyMapError, match=r"'model\.layers\.36\.mlp\.up_proj\.weight'.*layer 36"):
        map_qwen3_key("model.layers.36.mlp.up_proj.weight", llm)
    with pytest.raises(KeyMapError, match=r"'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        map_qwen3_key("model.layers.0.self_attn.q_proj.bias", llm)
    vis = get_config("emma-4b").vision
    assert map_siglip_key("vision_model.encoder.layers.23.mlp.fc1.weight", vis) == ["vision.trunk.layers.23.mlp.fc1.weight"]
    assert map_siglip_key("vision_model.encoder.layers.24.mlp.fc1.weight", vis) == [
        "vision.experts.0.layers.0.mlp.fc1.weight",
        "vision.experts.1.layers.0.mlp.fc1.weight",
    ]
    assert map_siglip_key("vision_model.head.probe", vis) == [] and map_siglip_key("text_model.embeddings.token_embedding.weight", vis) == []
    cfg = get_config("tiny")
    assert map_upstream_key("ae", "decoder.conv_out.weight", cfg) == ["ae.decoder.conv_out.weight"]
    with pytest.raises(KeyMapError, match="'quant_conv.weight'"):
        map_upstream_key("ae", "quant_conv.weight", cfg)


def test_plan_has_no_leftovers_either_way(upstream):
    cfg = get_config("tiny")
    ups = UpstreamSet.open(upstream["llm"], upstream["vision"], upstream["ae"])
    shapes = ups.shapes()
    plan = build_plan(cfg, shapes)
    emma = emma_shapes(cfg)
    covered = set(plan.sources()) | set(plan.fresh)
    assert covered == set(emma) and not set(plan.sources()) & set(plan.fresh)
    assert set(plan.fresh) == {k for k in emma if k.startswith(FRESH_PREFIXES)}

    def variant(src, drop=None, add=None):
        s = {k: dict(v) for k, v in shapes.items()}
        if drop:
            del s[src][drop]
        if add:
            s[src].update(add)
        return s

    with pytest.raises(KeyMapError, match=r"'llm\.layers\.2\.mlp\.und\.up_proj\.weight' is not covered.*'model\.layers\.2\.mlp\.up_proj\.weight'"):
        build_plan(cfg, variant("llm", drop="model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(KeyMapError, match=r"'vision\.experts\.0\.post_layernorm\.bias' is not covered"):
        build_plan(cfg, variant("vision", drop=_vkey(ups.vision, "post_layernorm.bias")))
    ae_key = next(iter(shapes["ae"]))
    with pytest.raises(KeyMapError, match=f"'ae\\.{ae_key}' is not covered"):
        build_plan(cfg, variant("ae", drop=ae_key))
    with pytest.raises(KeyMapError, match=r"'model\.layers\.1\.self_attn\.o_proj\.bias' has no place"):
        build_plan(cfg, variant("llm", add={"model.layers.1.self_attn.o_proj.bias": (64,)}))
    with pytest.raises(KeyMapError, match=r"'encoder\.extra\.weight' maps to 'ae\.encoder\.extra\.weight', which EMMA"):
        build_plan(cfg, variant("ae", add={"encoder.extra.weight": (3, 3)}))
    with pytest.raises(KeyMapError, match=r"'vision_model\.encoder\.layers\.3\.mlp\.fc1\.weight' has no place"):
        build_plan(cfg, variant("vision", add={"vision_model.encoder.layers.3.mlp.fc1.weight": (64, 32)}))
    with pytest.raises(KeyMapError, match=r"'model\.norm\.weight' has shape \(65,\)"):
        build_plan(cfg, variant("llm", add={"model.norm.weight": (65,)}))
    # a full SiglipModel folder: its text tower, pooling head and logit scale are documented drops
    full = variant("vision", add={"text_model.embeddings.token_embedding.weight": (10, 32), "logit_scale": (1,),
                                  "vision_model.head.probe": (1, 1, 32), "vision_model.embeddings.position_ids": (1, 16)})
    plan = build_plan(cfg, full)
    assert {d.key for d in plan.dropped} == {"text_model.embeddings.token_embedding.weight", "logit_scale",
                                             "vision_model.head.probe", "vision_model.embeddings.position_ids"}
    assert all(d.reason for d in plan.dropped)


def test_tied_lm_head_check(upstream, tmp_path):
    from emma_export.init_checkpoint import ShardedSafetensorsWriter

    emb = UpstreamFolder(upstream["llm"]).get("model.embed_tokens.weight")
    for name, head in (("tied", emb.clone()), ("untied", emb.clone().index_fill_(0, torch.tensor([700]), 0.0))):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text("{}")
        w = ShardedSafetensorsWriter(d, [("model.embed_tokens.weight", emb.dtype, tuple(emb.shape)),
                                         ("lm_head.weight", head.dtype, tuple(head.shape))], shard_bytes=300_000)
        w.write("model.embed_tokens.weight", emb)
        w.write("lm_head.weight", head)
        w.close()
        folder = UpstreamFolder(d)
        assert len(folder.files) == 2  # one tensor per shard, through the index
        if name == "tied":
            assert "equal" in check_tied_lm_head(folder, block_rows=100)
        else:
            with pytest.raises(UpstreamError, match="row 700"):
                check_tied_lm_head(folder, block_rows=100)
    assert "absent" in check_tied_lm_head(UpstreamFolder(upstream["llm"]))


def test_emma_4b_key_plan_against_upstream_layouts():
    """Qwen3-4B, SigLIP2-so400m and DC-AE f32c32 (built on the meta device from their public configs)
    cover EMMA-4B exactly: every upstream tensor has its place and shape, every EMMA tensor a source."""
    transformers = pytest.importorskip("transformers")
    diffusers = pytest.importorskip("diffusers")
    cfg = get_config("emma-4b")

    q = dict(QWEN3_4B)
    theta = q.pop("rope_theta")
    qc = transformers.Qwen3Config(**{k: v for k, v in q.items() if k not in ("architectures", "model_type", "rope_scaling", "torch_dtype")})
    if getattr(qc, "rope_parameters", None) is not None:
        qc.rope_parameters = {**qc.rope_parameters, "rope_theta": theta}
    sc = transformers.SiglipVisionConfig(**{k: v for k, v in SIGLIP2_SO400M_PATCH16_512["vision_config"].items() if k != "model_type"})
    ac = {k: v for k, v in DCAE_F32C32_SANA_1_0.items() if not k.startswith("_")}
    with torch.device("meta"):
        qwen = transformers.Qwen3ForCausalLM(qc)
        siglip = transformers.SiglipVisionModel(sc)
        dcae = diffusers.AutoencoderDC(**ac)
    shapes = {
        "llm": {k: tuple(v.shape) for k, v in qwen.state_dict().items() if k != "lm_head.weight"},
        "vision": {k: tuple(v.shape) for k, v in siglip.state_dict().items()},
        "ae": {k: tuple(v.shape) for k, v in dcae.state_dict().items()},
    }
    plan = build_plan(cfg, shapes)
    s = plan.summary()
    assert s["upstream_mapped"] == sum(len(v) for v in shapes.values()) - s["upstream_dropped"]
    # 36 layers x 11 tensors + embedding + final norm
    assert sum(m.source == "llm" for m in plan.mapped) == 36 * 11 + 2
    # shallow layers: 4 shared Q/K tensors, 7 per branch; deep layers: 11 per branch
    assert sum(len(m.targets) for m in plan.mapped if m.source == "llm") == 2 + 18 * (4 + 2 * 7) + 18 * 2 * 11
    # the last 3 of 27 SigLIP layers (16 tensors each) and post_layernorm go to both experts
    assert sum(len(m.targets) for m in plan.mapped if m.source == "vision") == 3 + 24 * 16 + 2 * (3 * 16 + 2)


# ---- emma-4b against the public upstream configs --------------------------------------------------

# https://huggingface.co/Qwen/Qwen3-4B/blob/main/config.json (fields EMMA reads; the file also carries
# bos/eos ids, initializer_range, max_window_layers, torch_dtype "bfloat16", use_cache...).
QWEN3_4B = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "max_position_embeddings": 40960,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_sliding_window": False,
    "vocab_size": 151936,
}

# https://huggingface.co/google/siglip2-so400m-patch16-512/blob/main/config.json: a SiglipModel (FixRes
# SigLIP2 is SigLIP-layout, model_type "siglip"); its vision_config. layer_norm_eps is not in the file:
# SiglipVisionConfig's default 1e-6 applies. So400m widths as in google/siglip-so400m-patch14-384.
SIGLIP2_SO400M_PATCH16_512 = {
    "architectures": ["SiglipModel"],
    "model_type": "siglip",
    "vision_config": {
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 1152,
        "image_size": 512,
        "intermediate_size": 4304,
        "model_type": "siglip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 16,
    },
}

# https://huggingface.co/mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers/blob/main/config.json (the SANA VAE;
# also the vae/config.json of the Efficient-Large-Model/Sana_*_diffusers pipelines). Fields it leaves out
# (encoder_out_shortcut, decoder_in_shortcut, decoder_conv_act_fn) take AutoencoderDC's defaults.
DCAE_F32C32_SANA_1_0 = {
    "_class_name": "AutoencoderDC",
    "attention_head_dim": 32,
    "decoder_act_fns": "silu",
    "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "decoder_block_types": ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock", "EfficientViTBlock"],
    "decoder_layers_per_block": [3, 3, 3, 3, 3, 3],
    "decoder_norm_types": "rms_norm",
    "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "downsample_block_type": "Conv",
    "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "encoder_block_types": ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock", "EfficientViTBlock"],
    "encoder_layers_per_block": [2, 2, 2, 3, 3, 3],
    "encoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "in_channels": 3,
    "latent_channels": 32,
    "scaling_factor": 0.41407,
    "upsample_block_type": "interpolate",
}


def test_emma_4b_equals_public_configs():
    cfg = get_config("emma-4b")
    # derived from the public configs field by field: no mismatch, and nothing else differs
    assert derive_config(QWEN3_4B, SIGLIP2_SO400M_PATCH16_512, DCAE_F32C32_SANA_1_0, cfg) == cfg

    l, q = cfg.llm, QWEN3_4B
    assert (l.hidden_size, l.num_hidden_layers, l.num_attention_heads, l.num_key_value_heads, l.head_dim) == (
        q["hidden_size"], q["num_hidden_layers"], q["num_attention_heads"], q["num_key_value_heads"], q["head_dim"])
    assert (l.intermediate_size, l.vocab_size, l.rope_theta, l.rms_norm_eps) == (
        q["intermediate_size"], q["vocab_size"], q["rope_theta"], q["rms_norm_eps"])
    assert (l.tie_word_embeddings, l.max_position_embeddings, l.hidden_act) == (True, 40960, "silu")

    v, s = cfg.vision, SIGLIP2_SO400M_PATCH16_512["vision_config"]
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (
        s["hidden_size"], s["num_hidden_layers"], s["num_attention_heads"], s["intermediate_size"])
    assert (v.patch_size, v.image_size, v.hidden_act, v.layer_norm_eps) == (16, 512, "gelu_pytorch_tanh", 1e-6)

    a, d = cfg.ae, DCAE_F32C32_SANA_1_0
    assert a.latent_channels == d["latent_channels"] == 32 and a.scaling_factor == d["scaling_factor"]
    assert list(a.encoder_block_out_channels) == d["encoder_block_out_channels"]
    assert list(a.decoder_block_out_channels) == d["decoder_block_out_channels"]
    assert list(a.encoder_block_types) == d["encoder_block_types"] and list(a.decoder_block_types) == d["decoder_block_types"]
    assert list(a.encoder_layers_per_block) == d["encoder_layers_per_block"]
    assert list(a.decoder_layers_per_block) == d["decoder_layers_per_block"]
    assert [list(m) for m in a.encoder_qkv_multiscales] == d["encoder_qkv_multiscales"]
    assert a.decoder_norm_types == ("rms_norm",) * 6 and a.decoder_act_fns == ("silu",) * 6
    assert (a.attention_head_dim, a.upsample_block_type, a.downsample_block_type) == (32, "interpolate", "Conv")
    assert cfg.cell == 32 == v.patch_size * v.shuffle


# ---- CLI ------------------------------------------------------------------------------------------


def test_cli_init_and_conformance(upstream, tmp_path):
    from click.testing import CliRunner

    from emma_export.cli import main
    from emma_export.weights.checkpoint import load_checkpoint, save_checkpoint

    r = CliRunner()
    up = ["--llm", str(upstream["llm"]), "--vision", str(upstream["vision"]), "--ae", str(upstream["ae"])]
    res = r.invoke(main, ["init", *up, "--config", "tiny", "--out", str(tmp_path / "ck"), "--shard-size", "1MB"])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and "peak RSS" in res.output and "fresh" in res.output

    res = r.invoke(main, ["conformance", *up, "--checkpoint", str(tmp_path / "ck"), "--json", str(tmp_path / "c.json")])
    assert res.exit_code == 0, res.output
    assert "conformance: passed" in res.output and "text_decode" in res.output
    rep = json.loads((tmp_path / "c.json").read_text())
    assert rep["passed"] and [row["component"] for row in rep["rows"]] == COMPONENTS

    # a checkpoint with one perturbed tensor fails (exit 1)
    model = load_checkpoint(tmp_path / "ck")
    with torch.no_grad():
        model.vision.trunk.layers[0].mlp.fc2.weight.view(-1)[:4] += 0.1
    save_checkpoint(model, tmp_path / "bad.safetensors")
    res = r.invoke(main, ["conformance", *up, "--checkpoint", str(tmp_path / "bad.safetensors")])
    assert res.exit_code == 1
    assert "FAIL vision_native" in res.output

    res = r.invoke(main, ["init", *up, "--config", "small", "--out", str(tmp_path / "ck2")])
    assert res.exit_code == 2 and "ae.latent_channels" in res.output


def test_init_checkpoint_exports_and_runs(checkpoint, tmp_path):
    """`emma-export export` takes the init checkpoint (and its tokenizer.json) and the runtime runs the bundle."""
    pytest.importorskip("onnxruntime")
    import numpy as np
    from click.testing import CliRunner

    from emma_export.cli import main
    from emma_runtime.pipelines import Pipeline

    out, _ = checkpoint
    res = CliRunner().invoke(main, ["export", "--checkpoint", str(out), "--out", str(tmp_path / "bundle"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "bundle" / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    p = Pipeline.load(tmp_path / "bundle")
    image = np.random.default_rng(0).uniform(-1, 1, (1, 3, 64, 96)).astype(np.float32)
    u = p.understand(image, "what is this?", max_new_tokens=3)
    assert len(u.token_ids) == 3
    g = p.generate("a cat", height=64, width=64, steps=2)
    assert g.image.shape == (1, 3, 64, 64) and np.isfinite(g.image).all()
