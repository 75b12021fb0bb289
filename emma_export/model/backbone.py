"""EMMA's shared-and-decoupled LLM backbone (Qwen3 layout per branch).

Every token belongs to a branch: UND (text and understanding images) or GEN (generation and editing
visual tokens). The first ``shared_layers`` layers share the Q/K projections (and their q/k norms)
between the branches and keep V, O, the norms and the FFN per branch; the remaining layers are fully
per branch. One joint attention runs over the whole sequence.

A branch is given either as an ``int`` (every token of the chunk in that branch: the exported
``backbone_und``/``backbone_gen`` graphs, which then hold only that branch's weights) or as a
``(B, S)`` tensor of branch ids (mixed sequences in the reference forward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import LLMConfig
from .layers import RMSNorm, apply_rope, rope_cos_sin

UND = 0
GEN = 1
BRANCHES = ("und", "gen")


class PerBranch(nn.Module):
    """Two copies of a module, ``und`` and ``gen``, applied per token by branch id."""

    def __init__(self, make):
        super().__init__()
        self.und = make()
        self.gen = make()

    def forward(self, x: torch.Tensor, branch) -> torch.Tensor:
        if isinstance(branch, int):
            return (self.und if branch == UND else self.gen)(x)
        # Reference path for mixed sequences: both copies run, each token keeps its own branch's output,
        # so gradients reach only the branch a token belongs to.
        a, b = self.und(x), self.gen(x)
        sel = (branch == GEN).view(*branch.shape, *([1] * (a.dim() - branch.dim())))
        return torch.where(sel, b, a)


class Shared(nn.Module):
    """One module used by both branches (shared Q/K in the shallow layers)."""

    def __init__(self, make):
        super().__init__()
        self.shared = make()

    def forward(self, x: torch.Tensor, branch) -> torch.Tensor:
        return self.shared(x)


class MLP(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig, shared_qk: bool):
        super().__init__()
        self.cfg = cfg
        hd, nq, nk = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        wrap = Shared if shared_qk else PerBranch
        self.q_proj = wrap(lambda: nn.Linear(cfg.hidden_size, nq * hd, bias=False))
        self.k_proj = wrap(lambda: nn.Linear(cfg.hidden_size, nk * hd, bias=False))
        self.q_norm = wrap(lambda: RMSNorm(hd, cfg.rms_norm_eps))
        self.k_norm = wrap(lambda: RMSNorm(hd, cfg.rms_norm_eps))
        self.v_proj = PerBranch(lambda: nn.Linear(cfg.hidden_size, nk * hd, bias=False))
        self.o_proj = PerBranch(lambda: nn.Linear(nq * hd, cfg.hidden_size, bias=False))

    def project_kv(self, x, branch, cos, sin):
        B, S, _ = x.shape
        hd, nk = self.cfg.head_dim, self.cfg.num_key_value_heads
        k = self.k_norm(self.k_proj(x, branch).view(B, S, nk, hd), branch).transpose(1, 2)
        v = self.v_proj(x, branch).view(B, S, nk, hd).transpose(1, 2)
        return apply_rope(k, cos, sin), v

    def forward(self, x, branch, cos, sin, allow, past_k=None, past_v=None):
        """x (B,S,D); allow (B,S,P+S) bool; past (B,Hk,P,hd). Returns (out, k_new, v_new)."""
        B, S, _ = x.shape
        hd, nq, nk = self.cfg.head_dim, self.cfg.num_attention_heads, self.cfg.num_key_value_heads
        q = self.q_norm(self.q_proj(x, branch).view(B, S, nq, hd), branch).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k_new, v_new = self.project_kv(x, branch, cos, sin)
        ks = [k_new] if past_k is None else [past_k, k_new]
        vs = [v_new] if past_v is None else [past_v, v_new]
        out = attention(q, ks, vs, allow, nq // nk)
        out = out.transpose(1, 2).reshape(B, S, nq * hd)
        return self.o_proj(out, branch), k_new, v_new


def attention(q, ks: list[torch.Tensor], vs: list[torch.Tensor], allow, groups: int) -> torch.Tensor:
    """Joint GQA attention over keys/values given in parts (cached prefix, new chunk).

    q (B,Hq,S,hd); each k/v part (B,Hk,T_i,hd); allow (B,S,sum T_i). The query heads that share a KV
    head are folded into the query length, so K/V are never repeated per head, and the parts are
    never concatenated: only the (small) score matrix is. Both keep a decode step's memory traffic
    at one read of the cache. Softmax in fp32.
    """
    B, Hq, S, hd = q.shape
    Hk = Hq // groups
    qg = q.reshape(B, Hk, groups * S, hd).float()
    scores = torch.cat([torch.matmul(qg, k.float().transpose(-1, -2)) for k in ks], dim=-1) * (hd**-0.5)
    T = scores.shape[-1]
    # A large finite negative rather than -inf: rows stay finite after a cast to fp16.
    scores = scores.view(B, Hk, groups, S, T).masked_fill(~allow[:, None, None], -1e9).view(B, Hk, groups * S, T)
    probs = torch.softmax(scores, dim=-1)
    out = None
    start = 0
    for v in vs:
        n = v.shape[2]
        part = torch.matmul(probs[..., start : start + n].to(v.dtype), v)
        out = part if out is None else out + part
        start = start + n
    return out.reshape(B, Hk, groups, S, hd).reshape(B, Hq, S, hd)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, shared_qk: bool):
        super().__init__()
        self.shared_qk = shared_qk
        self.input_layernorm = PerBranch(lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))
        self.self_attn = Attention(cfg, shared_qk)
        self.post_attention_layernorm = PerBranch(lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))
        self.mlp = PerBranch(lambda: MLP(cfg))

    def forward(self, x, branch, cos, sin, allow, past_k=None, past_v=None):
        h, k_new, v_new = self.self_attn(self.input_layernorm(x, branch), branch, cos, sin, allow, past_k, past_v)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x, branch), branch)
        return x, k_new, v_new


@dataclass
class KVCache:
    """Per-layer keys and values after RoPE, each (B, Hk, T, hd)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return 0 if not self.keys else self.keys[0].shape[2]

    @classmethod
    def empty(cls, cfg: LLMConfig, batch: int, dtype=torch.float32, device=None) -> "KVCache":
        z = torch.zeros(batch, cfg.num_key_value_heads, 0, cfg.head_dim, dtype=dtype, device=device)
        n = cfg.num_hidden_layers
        return cls([z] * n, [z] * n)

    def append(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> "KVCache":
        return KVCache(
            [torch.cat([a, b], dim=2) for a, b in zip(self.keys, keys)],
            [torch.cat([a, b], dim=2) for a, b in zip(self.values, values)],
        )

    def repeat(self, n: int) -> "KVCache":
        return KVCache([k.repeat(n, 1, 1, 1) for k in self.keys], [v.repeat(n, 1, 1, 1) for v in self.values])


class Backbone(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            [DecoderLayer(cfg, shared_qk=i < cfg.shared_layers) for i in range(cfg.num_hidden_layers)]
        )

    def forward(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        branch,
        allow: torch.Tensor,
        past: KVCache | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """Runs S new tokens against ``past``. Returns the last hidden states (before any final norm:
        each head owns its norm) and the S new keys/values per layer."""
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            pk = past.keys[i] if past is not None and past.length else None
            pv = past.values[i] if past is not None and past.length else None
            hidden, k, v = layer(hidden, branch, cos, sin, allow, pk, pv)
            new_k.append(k)
            new_v.append(v)
        return hidden, KVCache(new_k, new_v)


# ---- the EMMA mask rule ---------------------------------------------------------------------------


def full_mask(image_ids: torch.Tensor, bidirectional: bool, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """``allow[i, j] = j <= i or (gen_task and img[i] == img[j] != none)``, per batch row.

    image_ids: (B, S) long, -1 for tokens outside any image. key_valid: (B, S) bool (padding off).
    """
    B, S = image_ids.shape
    idx = torch.arange(S, device=image_ids.device)
    allow = (idx[None, :] <= idx[:, None])[None].expand(B, S, S)
    if bidirectional:
        same = (image_ids[:, :, None] == image_ids[:, None, :]) & (image_ids[:, :, None] >= 0)
        allow = allow | same
    if key_valid is not None:
        allow = allow & key_valid[:, None, :]
    return allow


def chunk_mask(past_valid: torch.Tensor, chunk: int, causal: bool, chunk_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mask of a chunk of ``chunk`` new tokens attending to ``P`` cached keys plus itself.

    Und chunks are causal inside the chunk; a Gen chunk is one image, so it is bidirectional inside.
    past_valid: (B, P) bool; returns (B, chunk, P + chunk).
    """
    B, P = past_valid.shape
    dev = past_valid.device
    if causal:
        idx = torch.arange(chunk, device=dev)
        inner = (idx[None, :] <= idx[:, None])[None].expand(B, chunk, chunk)
    else:
        inner = torch.ones(B, chunk, chunk, dtype=torch.bool, device=dev)
    if chunk_valid is not None:
        inner = inner & chunk_valid[:, None, :]
    return torch.cat([past_valid[:, None, :].expand(B, chunk, P), inner], dim=2)
