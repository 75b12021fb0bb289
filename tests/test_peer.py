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
def tiny_model():
    model = build_model(get_config("tiny"), seed=0).eval()
    # norms start at one: draw them, so a norm read from the wrong place (Gen copy, q for k, the Gen
    # head's final norm) changes the logits
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    return model


def test_qwen3_folder_matches_the_und_branch(tiny_model, tmp_path):
    transformers = pytest.importorskip("transformers")
    from emma_export.conformance import compare_text

    model = tiny_model
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


def test_und_state_dict_reads_shared_qk_and_und_copies(tiny_model):
    l = tiny_model.cfg.llm
    sd = tiny_model.state_dict()
    q = und_state_dict(tiny_model)
    assert q["model.layers.0.self_attn.q_proj.weight"].data_ptr() == sd["llm.layers.0.self_attn.q_proj.shared.weight"].data_ptr()
    deep = l.shared_layers
    assert q[f"model.layers.{deep}.self_attn.k_norm.weight"].data_ptr() == sd[f"llm.layers.{deep}.self_attn.k_norm.und.weight"].data_ptr()
    assert q["model.layers.0.mlp.down_proj.weight"].data_ptr() == sd["llm.layers.0.mlp.und.down_proj.weight"].data_ptr()
    assert q["model.norm.weight"].data_ptr() == sd["lm_head.norm.weight"].data_ptr()
    assert "lm_head.weight" not in q
