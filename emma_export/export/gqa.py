"""The Und backbone with ONNX Runtime's ``com.microsoft.GroupQueryAttention`` as its attention.

The decoder layers are the reference's own modules (norms, projections, q/k norms, RoPE, MLP); only
the attention of the cached past plus the new chunk becomes one operator, which writes the chunk's
keys/values into the per-layer cache buffer at each row's length (the buffer is bound as both
``past_key_i`` and ``present_key_i``) and reads each row's past up to its length, with no mask
tensor, no concatenation and no copy of the past. The operator also applies RoPE (``do_rotary``,
rotate-half) at each token's slot, which is its position: the runtime keeps every row left-aligned,
so a row's length is the position of its next token in every flavour.

``group_query_attention`` (a torch custom op) computes what the operator computes: it is what the
tracer runs and what the unit test checks against the reference; ``_symbolic`` is what the graph holds.
"""

from __future__ import annotations

import functools
import types

import torch
from torch.onnx import symbolic_helper

from ..components import _BackboneModule
from ..model.backbone import UND, attention
from ..model.layers import apply_rope, rope_cos_sin


@torch.library.custom_op("emma::group_query_attention", mutates_args=())
def group_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                          seqlens_k: torch.Tensor, total_sequence_length: torch.Tensor, cos_cache: torch.Tensor,
                          sin_cache: torch.Tensor, num_heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, S, _ = q.shape
    cap, hd = past_k.shape[2], past_k.shape[3]
    total = torch.minimum(seqlens_k.long() + 1, total_sequence_length.long())  # each row's length after this chunk
    start = (total - S).clamp(min=0)  # where the chunk lands (0 for a right-padded first prompt)
    pos = start[:, None] + torch.arange(S, device=q.device)[None]  # (B, S): the cache slot of each token = its RoPE position
    # rotate-half RoPE at those positions, as the operator's do_rotary applies it
    cos = torch.cat([cos_cache[pos], cos_cache[pos]], dim=-1)[:, None]  # (B, 1, S, hd)
    sin = torch.cat([sin_cache[pos], sin_cache[pos]], dim=-1)[:, None]
    kh = apply_rope(k.view(B, S, kv_heads, hd).transpose(1, 2), cos, sin)
    vh = v.view(B, S, kv_heads, hd).transpose(1, 2)
    idx = pos.clamp(max=cap - 1)[:, None, :, None].expand(B, kv_heads, S, hd)
    present_k = past_k.clone().scatter(2, idx, kh)
    present_v = past_v.clone().scatter(2, idx, vh)
    j = torch.arange(cap, device=q.device)
    allow = (j[None, None, :] <= pos[:, :, None]) & (j[None, None, :] < total[:, None, None])
    qh = apply_rope(q.view(B, S, num_heads, hd).transpose(1, 2), cos, sin)
    out = attention(qh, [present_k], [present_v], allow, num_heads // kv_heads)
    return out.transpose(1, 2).reshape(B, S, num_heads * hd).to(q.dtype), present_k, present_v


@group_query_attention.register_fake
def _(q, k, v, past_k, past_v, seqlens_k, total_sequence_length, cos_cache, sin_cache, num_heads, kv_heads):
    return torch.empty_like(q), torch.empty_like(past_k), torch.empty_like(past_v)


@symbolic_helper.parse_args("v", "v", "v", "v", "v", "v", "v", "v", "v", "i", "i")
def _symbolic(g, q, k, v, past_k, past_v, seqlens_k, total_sequence_length, cos_cache, sin_cache, num_heads, kv_heads):
    out, pk, pv = g.op("com.microsoft::GroupQueryAttention", q, k, v, past_k, past_v, seqlens_k, total_sequence_length,
                       cos_cache, sin_cache, num_heads_i=num_heads, kv_num_heads_i=kv_heads, do_rotary_i=1,
                       rotary_interleaved_i=0, outputs=3)
    out.setType(q.type())
    pk.setType(past_k.type())
    pv.setType(past_v.type())
    return out, pk, pv


torch.onnx.register_custom_op_symbolic("emma::group_query_attention", _symbolic, 1)


def _attention_forward(self, x, branch, cos, sin, allow, past_k, past_v, *, ops):
    """An ``Attention.forward`` whose joint attention is the operator (bound per layer while the
    graph is traced, so every node keeps the reference's name: ``/llm/layers.i/self_attn/...``, which
    the quantization policy's patterns match). ``cos``/``sin``/``allow`` are unused: the operator
    rotates at the slots and is causal."""
    c = self.cfg
    B, S, _ = x.shape
    hd, nq, nk = c.head_dim, c.num_attention_heads, c.num_key_value_heads
    q = self.q_norm(self.q_proj(x, branch).view(B, S, nq, hd), branch)
    k = self.k_norm(self.k_proj(x, branch).view(B, S, nk, hd), branch)
    v = self.v_proj(x, branch)
    out, pk, pv = group_query_attention(q.reshape(B, S, nq * hd), k.reshape(B, S, nk * hd), v, past_k, past_v, *ops, nq, nk)
    return self.o_proj(out, branch), pk, pv


class GQABackboneModule(_BackboneModule):
    """The standard backbone module (same IO order, same node names) with each layer's attention
    bound to the operator while it runs."""

    def __init__(self, llm, max_context: int):
        super().__init__(llm, UND)
        self.max_context = max_context

    def forward(self, inputs_embeds, seqlens_k, total_sequence_length, *past):
        c = self.llm.cfg
        B, S, _ = inputs_embeds.shape
        # RoPE tables for every position the cache can hold (constants in the graph): the operator
        # rotates q and k itself, at each token's slot, after the q/k norms as the reference does.
        cos, sin = rope_cos_sin(torch.arange(self.max_context)[None], c.head_dim, c.rope_theta)
        half = c.head_dim // 2
        ops = (seqlens_k, total_sequence_length, cos[0, 0, :, :half].contiguous(), sin[0, 0, :, :half].contiguous())
        attns = [layer.self_attn for layer in self.llm.layers]
        for a in attns:
            a.forward = types.MethodType(functools.partial(_attention_forward, ops=ops), a)
        try:
            unused = torch.zeros(B, S, dtype=torch.long)  # positions and mask: the operator's are the slots, causal
            return super().forward(inputs_embeds, unused, None, *past)
        finally:
            for a in attns:
                del a.forward


def share_rotary_tables(model) -> int:
    """Points every GroupQueryAttention node at one cos and one sin table again. Model Optimizer
    duplicates every shared constant while it quantizes, which gives each layer its own copy: on
    emma-4b that is 2 x 36 tables of 8192 x 64 floats (150 MB) where 2 are needed. Returns how many
    initializers it dropped."""
    import numpy as np
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    first: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        for j in (7, 8):  # cos_cache, sin_cache
            if j >= len(node.input) or node.input[j] not in inits:
                continue
            a = numpy_helper.to_array(inits[node.input[j]])
            key = (j, a.shape, a.dtype.str, np.ascontiguousarray(a).tobytes())
            keep = first.setdefault(key, node.input[j])
            if keep != node.input[j]:
                rename[node.input[j]] = keep
                node.input[j] = keep
    used = {i for n in model.graph.node for i in n.input}
    dropped = [i for i in model.graph.initializer if i.name in rename and i.name not in used]
    for i in dropped:
        model.graph.initializer.remove(i)
    return len(dropped)
