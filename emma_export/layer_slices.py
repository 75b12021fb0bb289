"""A large graph as a chain of per-layer slices: run, calibrated, quantized and checked one decoder
layer at a time, so that no stage holds more than one layer's weights (an emma-4b backbone is
14.5 GB at fp32; one of its 36 layers is 0.4 GB).

A node belongs to the slice of the decoder layer its name scopes (``/llm/layers.7/...``, the names
both exporters give); the other nodes go to the ``head`` (everything computed from the graph's
inputs alone: positions, masks) or the ``tail`` (after the layers: the final norm). A slice's
inputs are the tensors it reads that it does not make (graph inputs, earlier slices' outputs); its
weights are the initializers it reads, loaded from the graph's external data for that slice only.

Running a graph slice by slice gives its exact output (the same operators on the same inputs), so
parity measured through ``SliceRunner`` is the parity of the file itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

Feed = dict[str, np.ndarray]

_LAYER = re.compile(r"/layers\.(\d+)/")


@dataclass
class Slice:
    name: str
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)  # read from outside: graph inputs, earlier slices
    outputs: list[str] = field(default_factory=list)  # read by later slices, or graph outputs
    initializers: list[str] = field(default_factory=list)


class SliceError(ValueError):
    pass


def layer_of(node: onnx.NodeProto) -> int | None:
    m = _LAYER.search(node.name)
    return int(m.group(1)) if m else None


def plan_slices(m: onnx.ModelProto) -> list[Slice]:
    """The graph's slices in execution order (``m`` may be loaded without its external data)."""
    g = m.graph
    inits = {t.name for t in g.initializer}
    producer_layer: dict[str, object] = {}
    groups: dict[object, list[onnx.NodeProto]] = {}
    after_layers: set[str] = set()  # tensors downstream of some layer node
    # Constants are not activations: each slice that reads one gets its own copy (a converter may
    # then make it fp16 in one slice and keep it fp32 in another)
    constants = {n.output[0]: n for n in g.node if n.op_type == "Constant" and not n.input and len(n.output) == 1}
    for n in g.node:
        if n.op_type == "Constant" and n.output[0] in constants:
            continue
        lay = layer_of(n)
        if lay is None:
            key = "tail" if any(i in after_layers for i in n.input) else "head"
        else:
            key = lay
        if lay is not None or key == "tail":
            after_layers.update(n.output)
        groups.setdefault(key, []).append(n)
        for o in n.output:
            producer_layer[o] = key
    layer_keys = sorted(k for k in groups if isinstance(k, int))
    order = (["head"] if "head" in groups else []) + layer_keys + (["tail"] if "tail" in groups else [])
    rank = {k: i for i, k in enumerate(order)}
    graph_outputs = [o.name for o in g.output]
    consumers: dict[str, set] = {}
    for key, nodes in groups.items():
        for n in nodes:
            for i in n.input:
                consumers.setdefault(i, set()).add(key)
    slices = []
    for key in order:
        nodes = groups[key]
        read = dict.fromkeys(i for n in nodes for i in n.input)
        nodes = [constants[i] for i in read if i in constants] + nodes
        made = {o for n in nodes for o in n.output}
        reads = list(dict.fromkeys(i for n in nodes for i in n.input if i and i not in made))
        ins, ws = [], []
        for i in reads:
            if i in inits:
                ws.append(i)
                continue
            src = producer_layer.get(i)
            if src is not None and rank[src] >= rank[key]:
                raise SliceError(f"node of slice {key} reads '{i}' made by slice {src}, which runs after it")
            ins.append(i)
        outs = [o for o in dict.fromkeys(o for n in nodes for o in n.output)
                if o in graph_outputs or any(rank[c] > rank[key] for c in consumers.get(o, ()))]
        name = f"layers.{key}" if isinstance(key, int) else key
        slices.append(Slice(name, nodes, ins, outs, ws))
    return slices


def _value_types(m: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Every tensor's type, from shape inference on the graph without its weights."""
    inferred = onnx.shape_inference.infer_shapes(m, strict_mode=False)
    types = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.output) + list(inferred.graph.value_info):
        types[vi.name] = vi.type
    return types


class SlicedGraph:
    """A graph file seen as its slices; ``model(slice)`` is a standalone model of one slice with
    that slice's weights read into it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.proto = onnx.load(str(self.path), load_external_data=False)
        self.slices = plan_slices(self.proto)
        self.types = _value_types(self.proto)
        self._inits = {t.name: t for t in self.proto.graph.initializer}

    def value_info(self, name: str) -> onnx.ValueInfoProto:
        t = self.types.get(name)
        if t is None:
            raise SliceError(f"{self.path.name}: no type for tensor '{name}' (shape inference did not reach it)")
        vi = onnx.ValueInfoProto()
        vi.name = name
        vi.type.CopyFrom(t)
        return vi

    def model(self, s: Slice, with_weights: bool = True) -> onnx.ModelProto:
        from onnx.external_data_helper import load_external_data_for_tensor

        inits = []
        for name in s.initializers:
            t = onnx.TensorProto()
            t.CopyFrom(self._inits[name])
            if with_weights and t.data_location == onnx.TensorProto.EXTERNAL:
                load_external_data_for_tensor(t, str(self.path.parent))
                t.data_location = onnx.TensorProto.DEFAULT
                del t.external_data[:]
            inits.append(t)
        g = helper.make_graph(list(s.nodes), f"{self.proto.graph.name}.{s.name}", [self.value_info(i) for i in s.inputs],
                              [self.value_info(o) for o in s.outputs], inits)
        m = helper.make_model(g, opset_imports=self.proto.opset_import, ir_version=self.proto.ir_version)
        return m


@dataclass
class SliceRunner:
    """Runs a graph's feeds through its slices in order, one slice's session alive at a time.
    ``on_slice(slice, model, inputs)``, if given, sees each slice's standalone model and its input
    values per feed before it runs (calibration); when it returns the slice's outputs per feed (it
    ran the slice itself), the runner takes those instead of running it again."""

    graph: SlicedGraph
    session: Callable[[bytes], object]  # serialized model -> an ONNX Runtime session
    on_slice: Callable[[Slice, onnx.ModelProto, list[Feed]], list[Feed] | None] | None = None
    peak_bytes: int = 0  # the most bytes of values held between two slices, over every feed

    def run(self, feeds: list[Feed], progress: Callable[[str], None] | None = None,
            keep: Collection[str] | None = None) -> list[Feed]:
        """The graph's outputs per feed. ``keep``: only these outputs (calibration needs none, and each
        layer's keys and values kept to the end over every feed are an emma-4b cache's worth)."""
        slices = self.graph.slices
        last_use: dict[str, int] = {}
        for k, s in enumerate(slices):
            for i in s.inputs:
                last_use[i] = k
        outputs = [o.name for o in self.graph.proto.graph.output]
        if keep is not None:
            outputs = [o for o in outputs if o in set(keep)]
        env = [dict(f) for f in feeds]
        for k, s in enumerate(slices):
            if progress:
                progress(f"{self.graph.path.name}: slice {s.name} ({k + 1}/{len(slices)})")
            m = self.graph.model(s)
            ins = [{i: e[i] for i in s.inputs} for e in env]
            got = self.on_slice(s, m, ins) if self.on_slice else None
            if got is None:
                sess = self.session(m.SerializeToString())
                del m
                got = [dict(zip(s.outputs, sess.run(s.outputs, x))) for x in ins]
                del sess
            for e, y in zip(env, got):
                e.update({o: _own(y[o]) for o in s.outputs})
            for e in env:  # what no later slice reads is dropped (the outputs asked for kept)
                for name in [n for n in e if last_use.get(n, -1) <= k and n not in outputs]:
                    del e[name]
            self.peak_bytes = max(self.peak_bytes, sum(a.nbytes for e in env for a in e.values() if hasattr(a, "nbytes")))
        return [{o: e[o] for o in outputs} for e in env]


def _own(a):
    """A value held past its slice, in memory of its own. ONNX Runtime's outputs are views on its
    OrtValues, which keep the allocation they came from (the session's arena chunk) alive after the
    session is gone: verify of the emma-4b fp8 Und backbone grew ~0.75 GB a slice, holding 84 MB of
    values, and was killed at 24 GB; copied, it stayed flat (0.77-0.91 GB at layers 4-7)."""
    return a.copy() if isinstance(a, np.ndarray) and not a.flags.owndata else a
