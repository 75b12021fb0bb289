"""The properties that pin EMMA's shared-and-decoupled backbone down."""

import torch

from emma_export.config import get_config
from emma_export.model.backbone import GEN, UND, Backbone, KVCache, chunk_mask, full_mask
from emma_export.weights.init import materialize


def _backbone(seed=0):
    cfg = get_config("tiny").llm
    with torch.device("meta"):
        bb = Backbone(cfg)
    # Prefix the names as in the full model so the same init rule applies.
    wrapper = torch.nn.Module()
    wrapper.llm = bb
    materialize(wrapper, seed)
    return bb.eval(), cfg


def test_mask_rule_understanding_is_strictly_causal():
    img = torch.tensor([[-1, 1, 1, 1, -1, -1]])
    allow = full_mask(img, bidirectional=False)[0]
    assert torch.equal(allow, torch.tril(torch.ones(6, 6, dtype=torch.bool)))


def test_mask_rule_generation_bidirectional_within_one_image_only():
    # [text x2][reference image x3][text x1][target image x2]
    img = torch.tensor([[-1, -1, 2, 2, 2, -1, 4, 4]])
    allow = full_mask(img, bidirectional=True)[0]
    assert allow[2, 4] and allow[4, 2]  # within the reference, both ways
    assert allow[6, 7] and allow[7, 6]  # within the target, both ways
    assert not allow[2, 6] and not allow[4, 7]  # the reference cannot see the target
    assert allow[6, 2]  # the target sees the reference
    assert not allow[0, 1] and allow[1, 0]  # text stays causal
    assert not allow[5, 6]  # text before the target does not see it


def test_shared_qk_get_gradients_from_both_branches_and_v_ffn_only_their_own():
    bb, cfg = _backbone()
    S = 6
    x = torch.randn(1, S, cfg.hidden_size, requires_grad=False)
    pos = torch.arange(S)[None]
    allow = full_mask(torch.full((1, S), -1), False)

    def grads(branch_ids):
        bb.zero_grad(set_to_none=True)
        h, _ = bb(x, pos, branch_ids, allow)
        h.pow(2).sum().backward()
        return {n: (p.grad is not None and p.grad.abs().sum().item() > 0) for n, p in bb.named_parameters()}

    only_und = grads(torch.zeros(1, S, dtype=torch.long))
    only_gen = grads(torch.ones(1, S, dtype=torch.long))
    shallow = "layers.0."
    deep = f"layers.{cfg.shared_layers}."
    # Shared Q/K in the shallow layers: gradients from either branch.
    assert only_und[shallow + "self_attn.q_proj.shared.weight"] and only_gen[shallow + "self_attn.q_proj.shared.weight"]
    assert only_und[shallow + "self_attn.k_proj.shared.weight"] and only_gen[shallow + "self_attn.k_proj.shared.weight"]
    # V and FFN: only their own branch.
    for part in ("self_attn.v_proj", "mlp"):
        und_name = next(n for n in only_und if n.startswith(shallow + part + ".und"))
        gen_name = und_name.replace(".und.", ".gen.")
        assert only_und[und_name] and not only_und[gen_name]
        assert only_gen[gen_name] and not only_gen[und_name]
    # Deep layers: nothing shared, every parameter is per branch.
    for name in only_und:
        if name.startswith(deep):
            assert ".und." in name or ".gen." in name, name
            assert not (only_und[name] and only_gen[name]), name


def test_mixed_sequence_routes_each_token_through_its_branch():
    bb, cfg = _backbone()
    S = 5
    x = torch.randn(1, S, cfg.hidden_size)
    pos = torch.arange(S)[None]
    allow = torch.ones(1, S, S, dtype=torch.bool)
    mixed = torch.tensor([[0, 0, 1, 1, 0]])
    h_mixed, _ = bb(x, pos, mixed, allow)
    # Layer 0's first token sees only Und weights: compare with an all-Und run of the first token.
    h_und, _ = bb(x[:, :1], pos[:, :1], UND, allow[:, :1, :1])
    assert not torch.allclose(h_mixed, bb(x, pos, UND, allow)[0])
    assert h_mixed.shape == (1, S, cfg.hidden_size)
    assert h_und.shape == (1, 1, cfg.hidden_size)


def test_prefill_then_cached_decode_equals_one_full_forward():
    bb, cfg = _backbone()
    S = 9
    x = torch.randn(1, S, cfg.hidden_size) * 0.5
    pos = torch.arange(S)[None]
    img = torch.full((1, S), -1)
    full, _ = bb(x, pos, UND, full_mask(img, False))
    P = 4
    h0, cache = bb(x[:, :P], pos[:, :P], UND, full_mask(img[:, :P], False))
    outs = [h0]
    for i in range(P, S):
        allow = chunk_mask(torch.ones(1, cache.length, dtype=torch.bool), 1, causal=True)
        h, new = bb(x[:, i : i + 1], pos[:, i : i + 1], UND, allow, cache)
        cache = cache.append(new.keys, new.values)
        outs.append(h)
    assert torch.allclose(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-4)


def test_gen_chunk_against_cache_equals_full_forward_with_mask_rule():
    bb, cfg = _backbone()
    P, L = 6, 4
    x = torch.randn(1, P + L, cfg.hidden_size) * 0.5
    pos = torch.arange(P + L)[None]
    branch = torch.tensor([[0] * P + [1] * L])
    img = torch.tensor([[-1] * P + [7] * L])
    full, _ = bb(x, pos, branch, full_mask(img, True))
    _, cache = bb(x[:, :P], pos[:, :P], UND, full_mask(img[:, :P], True))
    allow = chunk_mask(torch.ones(1, P, dtype=torch.bool), L, causal=False)
    h, _ = bb(x[:, P:], pos[:, P:], GEN, allow, cache)
    assert torch.allclose(h, full[:, P:], atol=1e-5, rtol=1e-4)


def test_padding_keys_are_ignored():
    bb, cfg = _backbone()
    P, S = 5, 3
    x = torch.randn(1, S, cfg.hidden_size)
    pos = torch.arange(P, P + S)[None]
    cache = KVCache([torch.randn(1, cfg.num_key_value_heads, P, cfg.head_dim)] * cfg.num_hidden_layers,
                    [torch.randn(1, cfg.num_key_value_heads, P, cfg.head_dim)] * cfg.num_hidden_layers)
    valid = torch.tensor([[False, False, True, True, True]])
    h1, _ = bb(x, pos, UND, chunk_mask(valid, S, True), cache)
    cache2 = KVCache([k.clone() for k in cache.keys], [v.clone() for v in cache.values])
    for k in cache2.keys:
        k[:, :, :2] = 1e3  # garbage in the padded slots must not matter
    h2, _ = bb(x, pos, UND, chunk_mask(valid, S, True), cache2)
    assert torch.allclose(h1, h2, atol=1e-6)
