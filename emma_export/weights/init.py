"""Deterministic per-tensor random initialisation.

Every tensor's values depend only on (seed, its state-dict name, its shape), so the whole model
(`build_model`) and one component materialised on its own (the emma-4b export, which cannot hold
the whole model in memory) get identical weights.
"""

from __future__ import annotations

import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
from torch import nn


def _generator(seed: int, name: str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFF_FFFF_FFFF)
    return g


# Tensors of at least CHUNKED values (emma-4b's projections and embeddings; nothing at tiny, small or
# shapes) are drawn in CHUNK-value pieces, each from its own generator, on a thread per core: one
# generator is serial, and emma-4b's reference draws 8.9 B values per export and about 4 B per
# streamed call (7 ns a value on one core of this machine, 3.2 ns on two).
CHUNKED = 1 << 22
CHUNK = 1 << 22


def _randn(shape: tuple[int, ...], seed: int, name: str) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    if n < CHUNKED:
        return torch.randn(shape, generator=_generator(seed, name))
    out = torch.empty(n)

    def fill(i: int) -> None:
        out[i * CHUNK:(i + 1) * CHUNK].normal_(generator=_generator(seed, f"{name}#{i}"))

    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        list(pool.map(fill, range((n + CHUNK - 1) // CHUNK)))
    return out.view(shape)


def init_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int, zero_gen_head: bool = False) -> torch.Tensor:
    leaf = name.rsplit(".", 1)[-1]
    if name.startswith("gen_head.proj") and zero_gen_head:
        return torch.zeros(shape, dtype=dtype)
    if leaf == "num_batches_tracked":
        return torch.zeros(shape, dtype=dtype)
    if leaf in ("running_mean",) or (leaf == "bias"):
        if name.startswith("gen_head.proj"):
            return _randn(shape, seed, name).mul_(0.02).to(dtype)
        return torch.zeros(shape, dtype=dtype)
    if leaf == "running_var" or len(shape) == 1:
        # Norm scales (and any other 1-D weight) start at one.
        return torch.ones(shape, dtype=dtype)
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    if name.startswith(("llm.", "und_adapter.", "gen_adapter.")) or leaf == "weight" and len(shape) == 2 and "embed" in name:
        std = 0.02  # the upstream LLM init
    else:
        std = fan_in ** -0.5
    if name.startswith("gen_head.proj"):
        std = shape[1] ** -0.5
    return _randn(shape, seed, name).mul_(std).to(dtype)


def materialize(
    model: nn.Module,
    seed: int,
    keep: Callable[[str], bool] = lambda name: True,
    dtype: torch.dtype = torch.float32,
    zero_gen_head: bool = False,
    source: Callable[[str], torch.Tensor] | None = None,
) -> nn.Module:
    """Replace the meta tensors of ``model`` whose names pass ``keep`` with real ones, read from
    ``source(name)`` when given, else drawn by :func:`init_tensor`. Others stay on meta."""
    for name, t in list(model.state_dict(keep_vars=True).items()):
        if not keep(name):
            continue
        mod_name, _, leaf = name.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        if source is not None:
            value = source(name)
            if tuple(value.shape) != tuple(t.shape):
                raise ValueError(f"tensor '{name}' has shape {tuple(value.shape)}, expected {tuple(t.shape)}")
            value = value.to(dtype if t.is_floating_point() else t.dtype)
        else:
            value = init_tensor(name, tuple(t.shape), dtype if t.is_floating_point() else t.dtype, seed, zero_gen_head)
        if isinstance(t, nn.Parameter):
            setattr(mod, leaf, nn.Parameter(value, requires_grad=t.requires_grad))
        else:
            mod._buffers[leaf] = value
    return model
