"""The peer side of `emma-bench`: the Und branch as a Qwen3 folder, the bandwidth floor."""

from __future__ import annotations

import json

import pytest
import torch

from emma_export.config import get_config
from emma_export.model.emma import build_model
from emma_export.peer.qwen3_folder import und_state_dict, write_qwen3_folder
from emma_export.tokenizer import byte_level_tokenizer


@pytest.fixture(scope="module")
def und_model():
    model = build_model(get_config("tiny"), seed=0).eval()
    # norms start at one: draw them, so a norm read from the wrong place (Gen copy, q for k, the Gen
    # head's final norm) changes the logits
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    return model


def test_qwen3_folder_matches_the_und_branch(und_model, tmp_path):
    transformers = pytest.importorskip("transformers")
    from emma_export.conformance import compare_text

    model = und_model
    l = model.cfg.llm
    sd = model.state_dict()
    # the branches differ in this model, so a folder written from the Gen copies would fail below
    assert not torch.equal(sd[f"llm.layers.{l.num_hidden_layers - 1}.mlp.und.up_proj.weight"],
                           sd[f"llm.layers.{l.num_hidden_layers - 1}.mlp.gen.up_proj.weight"])
    assert not torch.equal(sd["lm_head.norm.weight"], torch.ones_like(sd["lm_head.norm.weight"]))

    folder = write_qwen3_folder(model, tmp_path / "qwen3", byte_level_tokenizer(l.vocab_size).to_str())
    conf = json.loads((tmp_path / "qwen3" / "config.json").read_text())
    assert conf["model_type"] == "qwen3" and conf["architectures"] == ["Qwen3ForCausalLM"]
    assert (conf["num_hidden_layers"], conf["head_dim"], conf["tie_word_embeddings"]) == (l.num_hidden_layers, l.head_dim, True)
    assert folder.tensors == 2 + 11 * l.num_hidden_layers  # embedding, final norm, 11 per layer; no lm_head (tied)

    qwen = transformers.Qwen3ForCausalLM.from_pretrained(str(tmp_path / "qwen3"), dtype=torch.float32,
                                                         attn_implementation="eager").eval()
    # every tensor loaded (nothing left at its random init), the LM head tied to the embedding
    assert torch.equal(qwen.lm_head.weight, sd["llm.embed_tokens.weight"])
    assert torch.equal(qwen.model.norm.weight, sd["lm_head.norm.weight"])
    rows = compare_text(model, qwen, batch=2, prompt=12, decode=4)
    for r in rows:  # prompt logits and four decode steps against the growing cache
        assert r.max_abs < 1e-4, (r.component, r.max_abs)


def test_und_state_dict_reads_shared_qk_and_und_copies(und_model):
    l = und_model.cfg.llm
    sd = und_model.state_dict()
    q = und_state_dict(und_model)
    assert q["model.layers.0.self_attn.q_proj.weight"].data_ptr() == sd["llm.layers.0.self_attn.q_proj.shared.weight"].data_ptr()
    deep = l.shared_layers
    assert q[f"model.layers.{deep}.self_attn.k_norm.weight"].data_ptr() == sd[f"llm.layers.{deep}.self_attn.k_norm.und.weight"].data_ptr()
    assert q["model.layers.0.mlp.down_proj.weight"].data_ptr() == sd["llm.layers.0.mlp.und.down_proj.weight"].data_ptr()
    assert q["model.norm.weight"].data_ptr() == sd["lm_head.norm.weight"].data_ptr()
    assert "lm_head.weight" not in q


def test_decode_bytes_count_what_the_folder_holds(und_model, tmp_path):
    from emma_export.peer.floor import DecodeBytes

    cfg = und_model.cfg
    folder = write_qwen3_folder(und_model, tmp_path / "q", byte_level_tokenizer(cfg.llm.vocab_size).to_str())
    b = DecodeBytes.of(cfg, "fp32")
    assert b.weights == folder.weight_bytes  # every tensor once: the tied embedding is the LM head
    l = cfg.llm
    assert b.kv_per_token == 2 * l.num_hidden_layers * l.num_key_value_heads * l.head_dim * 4
    assert b.at(100) == b.weights + 100 * b.kv_per_token
    assert b.floor_s(100, 1e9) == pytest.approx(b.at(100) / 1e9)
    assert DecodeBytes.of(cfg, "int4w").weights < DecodeBytes.of(cfg, "int8").weights < b.weights
    with pytest.raises(ValueError, match="no weight size"):
        DecodeBytes.of(cfg, "int2")


def test_bandwidth_is_measured():
    from emma_export.peer.floor import measure_bandwidth

    bw = measure_bandwidth(threads=2, mib=64, repeat=3)
    assert 1e8 < bw.single < 1e12 and 1e8 < bw.multi < 1e12 and bw.best == max(bw.single, bw.multi)


def test_peer_contexts_and_ratios():
    from types import SimpleNamespace

    from emma_export.peer.bench_peer import peer_contexts, peer_ratios

    assert peer_contexts((64, 256, 1024, 2048), 4096) == (64, 256, 512, 1024, 2048, 4095)
    assert peer_contexts((64,), 8192) == (64, 256, 512, 1024, 2048, 4096)
    rep = SimpleNamespace(decode_growth={"fp32:b": {64: 0.004, 2048: 0.010}, "peer": {64: 0.005, 2048: 0.008}},
                          floor={64: 0.002, 2048: 0.005})
    r = peer_ratios(rep, "fp32:b")
    assert r["decode_vs_peer_64"] == pytest.approx(1.25) and r["decode_vs_peer_2048"] == pytest.approx(0.8)
    assert r["decode_vs_floor_2048"] == pytest.approx(2.0) and r["peer_vs_floor_64"] == pytest.approx(2.5)
    assert r["peer_decode_growth_2048_vs_64"] == pytest.approx(1.6)


def test_peer_skips_a_precision_the_builder_lacks():
    from emma_export.peer import ort_genai

    pytest.importorskip("onnxruntime_genai")
    assert ort_genai.skip_reason("fp32") is None and ort_genai.builder_precision("int4w") == "int4"
    assert "no int8 form" in ort_genai.skip_reason("int8")
    with pytest.raises(ort_genai.PeerError, match="no fp16 form"):
        ort_genai.build("unused", "unused", "fp16")


def test_ort_genai_peer_computes_the_und_branch(und_model, tmp_path):
    """The built peer's logits are EMMA's: the benchmark compares like with like."""
    og = pytest.importorskip("onnxruntime_genai")
    import numpy as np

    from emma_export.model.backbone import UND, full_mask
    from emma_export.peer.ort_genai import build

    cfg = und_model.cfg
    folder = write_qwen3_folder(und_model, tmp_path / "q", byte_level_tokenizer(cfg.llm.vocab_size).to_str())
    built = build(folder.path, tmp_path / "og", "fp32")
    model = og.Model(str(built.path))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=24, min_length=24, do_sample=False)
    gen = og.Generator(model, params)
    ids = np.random.default_rng(3).integers(0, 256, 16).astype(np.int32)
    gen.append_tokens(ids)
    got = np.asarray(gen.get_logits())[0, -1]
    with torch.no_grad():
        t = torch.from_numpy(ids.astype(np.int64))[None]
        allow = full_mask(torch.full_like(t, -1), bidirectional=False)
        h, _ = und_model.llm(und_model.embed(t), torch.arange(16)[None], UND, allow)
        ref = und_model.lm_head(h)[0, -1].numpy()
    assert np.abs(got - ref).max() < 1e-4


def test_paired_decode_alternates_and_times_each_step():
    from emma_export.peer.bench_peer import paired_decode

    calls = []
    a, b = paired_decode(lambda: calls.append("a"), lambda: calls.append("b") or sum(range(20000)), per_round=2, rounds=3)
    assert calls == ["a", "b", "b"] + ["a", "a", "b", "b"] * 3  # warm-ups, then rounds
    assert a.repeats == b.repeats == 6 and b.median_s > a.median_s and a.min_s <= a.median_s <= a.max_s


def test_bench_with_the_peer(tiny_bundle, tmp_path):
    """`emma-bench --peer ort-genai` end to end on the tiny bundle: both curves, the floor, the ratios, the plot."""
    pytest.importorskip("onnxruntime_genai")
    pytest.importorskip("matplotlib")
    from emma_export.bench import plot, run_bench

    rep = run_bench([str(tiny_bundle)], [], repeat=1, contexts=(64,), sizes=(), progress=lambda m: None,
                    peer="ort-genai", peer_dir=str(tmp_path / "peer"))
    assert "skipped" not in rep.peer and rep.peer["precision"] == "fp32"
    ctxs = [64, 256, 512, 1023]  # tiny's max_context is 1024: a step at 1024 would need 1025 positions
    label = next(k for k in rep.decode_growth if k.startswith("fp32:"))
    assert sorted(rep.decode_growth["peer"]) == sorted(rep.decode_growth[label]) == sorted(rep.floor) == ctxs
    for c in ctxs:
        assert rep.ratios[f"decode_vs_peer_{c}"] > 0 and rep.ratios[f"decode_vs_floor_{c}"] > 1
    assert rep.machine["read_bandwidth"]["floor_uses_gbs"] > 0
    assert (tmp_path / "peer" / "qwen3" / "config.json").is_file()
    assert plot(rep, tmp_path / "p.png").stat().st_size > 0


def test_a_users_folder_is_never_written_as_the_peer_dir(tiny_bundle, tmp_path):
    from emma_export.peer.ort_genai import PEER_MARKER, PeerError, prepare

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(PeerError, match="not a peer folder"):
        prepare(tiny_bundle, mine)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    f = tmp_path / "a-file"
    f.write_text("x")
    with pytest.raises(PeerError, match="not a peer folder"):
        prepare(tiny_bundle, f)
    assert not (tmp_path / "new" / PEER_MARKER).exists()
