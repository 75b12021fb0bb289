"""The PyTorch reference of a model too large to hold (emma-4b: 8.9 B parameters, 36 GB at fp32),
with its decoder layers' weights read when the layer runs and dropped when it returns.

Everything outside the LLM's decoder layers (the autoencoder, the vision encoder and experts, the
adapters, the embedding and heads: 1.2 B parameters at emma-4b, 4.6 GB) is resident; each of the
weight-holding module inside the 36 layers (a projection, a norm) is materialised from the weight
source by a forward pre-hook and put back on the meta device by a forward hook. The values are the ones ``model_for``
and the streamed export read (the same seeded init or checkpoint tensors), so calibration capture
and verify run the real reference, one layer's weights at a time, at the price of reading every
layer's weights on every call.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .model.emma import EMMA
from .weights.init import materialize

# the modules whose weights stream: the LLM's decoder layers
STREAMED = re.compile(r"llm\.layers\.\d+")


def streamed_model(source) -> EMMA:
    """``source``: a ``WeightSource``. The model's calls are exact; only its memory differs."""
    with torch.device("meta"):
        model = EMMA(source.cfg)
    layers = [n for n, _ in model.named_modules() if STREAMED.fullmatch(n)]
    prefixes = tuple(n + "." for n in layers)
    materialize(model, source.seed, keep=lambda name: not name.startswith(prefixes),
                source=(lambda name: source.tensor(name)) if source.checkpoint is not None else None)
    # hooks on the modules that hold weights themselves (the projections, the norms): a call that
    # runs one branch reads that branch's weights only, one matrix at a time
    for name, mod in model.named_modules():
        if name.startswith(prefixes) and any(True for _ in _own(mod)):
            mod.register_forward_pre_hook(_loader(source, name))
            mod.register_forward_hook(_dropper())
    return model.eval()


def _own(mod: nn.Module):
    """(leaf, tensor, the dict holding it) of the weights ``mod`` holds itself."""
    for leaf, p in list(mod._parameters.items()):
        if p is not None:
            yield leaf, p, mod._parameters
    for leaf, b in list(mod._buffers.items()):
        if b is not None and leaf not in mod._non_persistent_buffers_set:
            yield leaf, b, mod._buffers


def _loader(source, prefix: str):
    def load(mod, _args):
        for leaf, t, slots in list(_own(mod)):
            if not t.is_meta:
                continue
            value = source.tensor(f"{prefix}.{leaf}")
            slots[leaf] = nn.Parameter(value, requires_grad=False) if isinstance(t, nn.Parameter) else value
    return load


def _dropper():
    def drop(mod, _args, _out):
        for leaf, t, slots in list(_own(mod)):
            meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
            slots[leaf] = nn.Parameter(meta, requires_grad=False) if isinstance(t, nn.Parameter) else meta
    return drop
