"""Parity of a graph run slice by slice (``layer_slices``), layer by layer on the reference's own inputs.

A backbone's error compounds through its layers. On random weights (emma-4b's here: no trained
structure, every layer's update about as large as its input) fp8 loses a few percent per layer, and
the hidden states measured 0.16 rel L2 after 4 layers and 0.31 after 3 of the Gen branch
(scripts/scale_probe.py), so the figure through all 36 layers says more about the weights than about
the export. Each layer's slice is therefore run twice on one session: on what the slices before it
made (the propagated run, the file's real output, reported) and on the reference layer's own input
(teacher forced), whose output is compared with the reference layer's. That second figure is the
verdict: a wrong scale or a swapped weight in any one layer shows there at full size instead of
being averaged into the whole.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch

from .layer_slices import Feed, Slice, SliceError
from .verify import rel_l2

_SLICE = re.compile(r"layers\.(\d+)")


@dataclass
class LayerError:
    layer: int
    hidden: float = 0.0  # rel L2 of the layer's residual output on the reference's input
    kv: float = 0.0  # worst rel L2 of the keys/values the layer outputs, on the same input

    @property
    def worst(self) -> float:
        return max(self.hidden, self.kv)


def decoder_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    from .model.backbone import DecoderLayer

    return [m for m in module.modules() if isinstance(m, DecoderLayer)]


def reference_with_layers(module: torch.nn.Module, args: list[torch.Tensor]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The module's outputs and each decoder layer's residual output, for one call."""
    layer_out: list[np.ndarray] = []
    hooks = [m.register_forward_hook(lambda _m, _a, out: layer_out.append(out[0].detach().float().numpy().copy()))
             for m in decoder_layers(module)]
    try:
        with torch.no_grad():
            ref = module(*args)
    finally:
        for h in hooks:
            h.remove()
    ref = ref if isinstance(ref, tuple) else (ref,)
    return [r.float().numpy() for r in ref], layer_out


@dataclass
class TeacherForced:
    """``SliceRunner.on_slice``: runs each slice on the propagated inputs (returned to the runner) and
    each layer's slice once more with its residual input replaced by the reference's.

    ``layer_out[f][k]``: the reference's residual output of layer k for feed f; ``ref_out[f]``: the
    reference's graph outputs by name; ``as_float(name, array)``: a graph output as float32 (an
    8-bit KV cache's dequantized)."""

    session: Callable[[bytes], object]
    layer_out: list[list[np.ndarray]]
    ref_out: list[dict[str, np.ndarray]]
    as_float: Callable[[str, np.ndarray], np.ndarray]
    errors: dict[int, LayerError] = field(default_factory=dict)
    judged: set[str] = field(default_factory=set)  # graph outputs compared inside a layer's slice
    _residual: dict[int, str] = field(default_factory=dict)  # layer -> the tensor carrying its output

    def __call__(self, s: Slice, m: onnx.ModelProto, ins: list[Feed]) -> list[Feed]:
        sess = self.session(m.SerializeToString())
        got = [dict(zip(s.outputs, sess.run(s.outputs, x))) for x in ins]
        hit = _SLICE.fullmatch(s.name)
        if hit is None:  # head (from the graph's inputs alone) and tail: nothing to force
            return got
        k = int(hit.group(1))
        if k >= len(self.layer_out[0]):
            raise SliceError(f"slice {s.name}: the reference has {len(self.layer_out[0])} decoder layers")
        self._residual[k] = self._find_residual(s, k, got[0])
        forced = ins
        if k - 1 in self._residual and self._residual[k - 1] in s.inputs:
            name = self._residual[k - 1]
            forced = [{**x, name: lo[k - 1].astype(x[name].dtype)} for x, lo in zip(ins, self.layer_out)]
        elif k > 0 and k - 1 in self._residual:
            raise SliceError(f"slice {s.name} does not read layer {k - 1}'s output '{self._residual[k - 1]}'")
        err = self.errors.setdefault(k, LayerError(k))
        for x, lo, ro in zip(forced, self.layer_out, self.ref_out):
            y = dict(zip(s.outputs, sess.run(s.outputs, x)))
            err.hidden = max(err.hidden, rel_l2(y[self._residual[k]], lo[k]))
            for o in s.outputs:
                if o in ro and o != self._residual[k]:
                    err.kv = max(err.kv, rel_l2(self.as_float(o, y[o]), ro[o]))
                    self.judged.add(o)
        return got

    def _find_residual(self, s: Slice, k: int, got: Feed) -> str:
        """The slice output that is the layer's residual stream: the one shaped as the reference
        layer's output (keys and values are 4-D, masks and angles are made by the head)."""
        shape = self.layer_out[0][k].shape
        hits = [o for o in s.outputs if np.issubdtype(got[o].dtype, np.floating) and got[o].shape == shape]
        if len(hits) != 1:
            raise SliceError(f"slice {s.name}: {len(hits)} outputs shaped {shape} ({', '.join(hits) or 'none'}); "
                             f"cannot tell which carries layer {k}'s residual stream")
        return hits[0]

    def worst(self) -> LayerError | None:
        return max(self.errors.values(), key=lambda e: e.worst, default=None)
