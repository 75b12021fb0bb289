"""Export of a component whose weights cannot be held twice: the emma-4b backbones (3.6 B
parameters, 14.5 GB at fp32).

The TorchScript exporter holds the module's weights, its constant-folded copies (every Linear's
transposed weight) and the serialized initializers at once: measured 3.5 GB of peak RSS for 0.8 GB
of weights (two emma-4b layers), so about 60 GB for one emma-4b backbone. Here the weights never
enter the trace: the module stays on the meta device and each weight is a graph INPUT whose example
value is a stride-0 stand-in (no memory). After tracing, every weight input becomes an initializer,
read one tensor at a time from the weight source (seeded init or checkpoint), passed through the
weight-only nodes the trace put after it (the Linear's Transpose: what constant folding would have
done) and appended to the external data file. Peak memory is one tensor and its folded copy.

The graph is the normal export's graph: the same operators and node names (the precision policy
matches them), its weights as initializers. Only the initializer names differ (the weight's
state-dict name instead of ``onnx::MatMul_123``).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from ..components import Component
from ..config import EMMAConfig
from . import external_data
from .graph_edit import set_nodes

ENV = "EMMA_STREAM_BYTES"
# the scope the wrapper below adds to every traced node name (removed after tracing)
_SCOPE = "inner"


def threshold() -> int:
    """Bytes of a component's fp32 weights past which every stage goes layer by layer (default: where
    the graph needs external data anyway). Tests set it to 0 so that tiny components take this path."""
    return external_data.bytes_from_env(ENV, external_data.DEFAULT_THRESHOLD)


class _WeightsAsInputs(nn.Module):
    """Calls the component module with its weights taken from the trailing arguments: each is put
    in its module's parameter slot for the call (torch.func.functional_call refuses to run under the
    TorchScript tracer), so the trace records them as graph inputs."""

    def __init__(self, inner: nn.Module, n_data: int, names: list[str]):
        super().__init__()
        self.inner, self.n_data, self.names = inner, n_data, names

    def forward(self, *args):
        data, weights = args[: self.n_data], args[self.n_data :]
        saved = []
        for name, w in zip(self.names, weights):
            mod_name, _, leaf = name.rpartition(".")
            mod = self.inner.get_submodule(mod_name) if mod_name else self.inner
            slots = mod._parameters if leaf in mod._parameters else mod._buffers
            saved.append((slots, leaf, slots[leaf]))
            slots[leaf] = w
        try:
            return self.inner(*data)
        finally:
            for slots, leaf, old in saved:
                slots[leaf] = old


def export_streamed(comp: Component, cfg: EMMAConfig, source, out_file: Path, dtype: str = "fp32") -> None:
    """Writes ``out_file`` and ``out_file.data`` for ``comp`` with weights from ``source``
    (a ``WeightSource``), never holding more than one weight tensor in memory."""
    from ..model.emma import EMMA
    from .onnx_export import OPSET, _torch_inputs
    from .source import DTYPES

    if dtype not in ("fp32", "fp16"):
        raise ValueError(f"{comp.name}: a streamed export writes fp32 or fp16 weights, not {dtype}")
    td = DTYPES[dtype]
    with torch.device("meta"):
        model = EMMA(cfg)
    module = comp.module(model).eval()
    # module-relative name -> the full model's state-dict name (what the source knows)
    full = {id(t): n for n, t in model.state_dict(keep_vars=True).items()}
    local = [(ln, full[id(t)], t) for ln, t in module.state_dict(keep_vars=True).items()
             if id(t) in full and comp.uses(full[id(t)])]
    local = list({full_name: (ln, full_name, t) for ln, full_name, t in local}.values())  # a tied tensor once
    data_specs = comp.inputs(cfg)
    data_args = _torch_inputs(comp, cfg, dtype)
    stand_ins = [torch.zeros((), dtype=td if t.is_floating_point() else t.dtype).expand(t.shape) for _, _, t in local]
    weight_inputs = [full_name for _, full_name, _ in local]
    wrapper = _WeightsAsInputs(module, len(data_args), [ln for ln, _, _ in local]).eval()
    out_file = Path(out_file)
    with tempfile.TemporaryDirectory(dir=out_file.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper, (*data_args, *stand_ins), str(raw),
                input_names=[s.name for s in data_specs] + weight_inputs,
                output_names=[s.name for s in comp.outputs(cfg)],
                dynamic_axes=comp.dynamic_axes(cfg), opset_version=OPSET, do_constant_folding=True,
                custom_opsets={"com.microsoft": 1} if getattr(comp, "attention", None) == "gqa" else None,
                dynamo=False,
            )
        m = onnx.load(str(raw))
    del wrapper, module, model, stand_ins
    _drop_scope(m)
    _weights_to_initializers(m, weight_inputs, lambda name: source.tensor(name, td), out_file)


def _drop_scope(m: onnx.ModelProto) -> None:
    """'/inner/llm/layers.0/...' -> '/llm/layers.0/...': the names the normal export gives."""
    pre = f"/{_SCOPE}/"

    def fix(s: str) -> str:
        return "/" + s[len(pre):] if s.startswith(pre) else s

    g = m.graph
    for n in g.node:
        n.name = fix(n.name)
        n.input[:] = [fix(i) for i in n.input]
        n.output[:] = [fix(o) for o in n.output]
    for coll in (g.initializer,):
        for t in coll:
            t.name = fix(t.name)
    for vi in list(g.value_info) + list(g.output):
        vi.name = fix(vi.name)


def _constant_values(g: onnx.GraphProto) -> dict[str, np.ndarray]:
    vals = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            vals[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return vals


def _weights_to_initializers(m: onnx.ModelProto, weight_inputs: list[str], read, out_file: Path) -> None:
    """Each weight input becomes initializers: itself where a compute node reads it, and the
    results of the weight-only nodes after it (Transpose, Cast ...) where those feed compute nodes.
    The folded nodes go. Tensors are written to ``out_file.data`` one at a time."""
    from onnx.reference import ReferenceEvaluator

    g = m.graph
    consts = _constant_values(g)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    weights = set(weight_inputs)
    folded: set[int] = set()  # id() of nodes computed here
    data = out_file.parent / external_data.data_file_name(out_file)
    new_inits: list[onnx.TensorProto] = []
    with external_data.DataWriter(data) as writer:
        for w in weight_inputs:
            if w not in consumers:
                continue  # the trace never read it (a parameter of a path not taken)
            # the weight-only closure: nodes whose every input is this weight, a constant, or
            # another closure node's output
            closure: list[onnx.NodeProto] = []
            produced = {w}
            changed = True
            while changed:
                changed = False
                for name in list(produced):  # noqa: PERF101 - produced grows inside the loop
                    for n in consumers.get(name, []):
                        if id(n) in folded or n.op_type in ("Shape", "Size"):
                            continue
                        if all(i in produced or i in consts or i == "" for i in n.input):
                            closure.append(n)
                            folded.add(id(n))
                            produced.update(n.output)
                            changed = True
            # tensors of the closure that something outside it reads (or a graph output)
            inside = {id(n) for n in closure}
            outputs_named = {o.name for o in g.output}
            boundary = [t for t in produced
                        if t in outputs_named or any(id(c) not in inside for c in consumers.get(t, []))]
            value = read(w).numpy()
            values = {w: value}
            if closure:
                sub = helper.make_graph(
                    closure, "fold", [helper.make_tensor_value_info(w, numpy_helper.from_array(value[:0] if value.ndim else value).data_type, value.shape)],
                    [helper.make_tensor_value_info(t, onnx.TensorProto.UNDEFINED, None) for t in boundary if t != w],
                    [numpy_helper.from_array(consts[i], i) for i in {i for n in closure for i in n.input if i in consts}],
                )
                fold_model = helper.make_model(sub, opset_imports=m.opset_import)
                outs = ReferenceEvaluator(fold_model).run(None, {w: value})
                values.update(zip([t for t in boundary if t != w], outs))
            for t in boundary:
                new_inits.append(writer.add(t, np.ascontiguousarray(values[t])))
            del values, value
    set_nodes(g, [n for n in g.node if id(n) not in folded], new_inits)
    kept_inputs = [i for i in g.input if i.name not in weights]
    del g.input[:]
    g.input.extend(kept_inputs)
    if not writer.bytes_written:
        data.unlink(missing_ok=True)
    out_file.write_bytes(m.SerializeToString())
