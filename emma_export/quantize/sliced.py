"""A component graph too large for Model Optimizer's ONNX PTQ (which loads the graph, an augmented
copy and an ONNX Runtime session of it: several times the weights) quantized one decoder layer at
a time (``layer_slices``).

The fp32 graph runs slice by slice over the calibration feeds; before each slice runs, its inputs
(the fp32 activations the earlier slices made: the standard layer-by-layer PTQ) calibrate that
slice alone, through the same ``apply_plan`` (policy, Model Optimizer, post-passes) a small graph
takes whole. The quantized slices are then stitched back into one graph, their weights appended to
its external data file one slice at a time. Node names are the original ones, so the policy's
patterns and exclusions apply unchanged.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from ..export import external_data
from ..layer_slices import Slice, SlicedGraph, SliceRunner, layer_of

_LAYER_SCOPE = re.compile(r"^(.*?/layers\.\d+/)")

# Model Optimizer on a whole graph holds the graph, an augmented copy that outputs every tensor, an
# ONNX Runtime session of it and every tensor's calibration values: the emma-4b fp8 build was killed at
# 24.4 GB quantizing the 1.48 GB vision trunk whole. Past this many bytes of fp32 weights a graph is
# quantized layer by layer even when it is exported and run whole (below EMMA_STREAM_BYTES).
ENV = "EMMA_SLICE_QUANTIZE_BYTES"
DEFAULT_THRESHOLD = 1_000_000_000


def threshold() -> int:
    from ..export.external_data import bytes_from_env
    from ..export.streamed_export import threshold as stream_threshold

    return min(bytes_from_env(ENV, DEFAULT_THRESHOLD), stream_threshold())

Feed = dict[str, np.ndarray]


def _cpu_session(model_bytes: bytes):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def apply_plan_sliced(p, src: Path, dst: Path, feeds: list[Feed] | None, calib_samples: int = 64, progress=None,
                      replay: bool = True) -> dict:
    """``apply_plan`` for a large graph, layer by layer. Returns the details of every slice merged
    (counts added up) plus how many slices there were. ``replay``: Model Optimizer on two layers of
    each structure, the rest replayed from them (``replay.py``) where its rules hold."""
    from . import apply_plan, calibrate
    from . import replay as rp

    src, dst = Path(src), Path(dst)
    sg = SlicedGraph(src)
    chosen = calibrate.select(feeds, calib_samples) if feeds else None
    details: dict = {"slices": len(sg.slices)}
    replayer = rp.Replayer() if replay and p.method.startswith("modelopt-") and chosen else None
    # INT4 is replayed before its float part goes to fp16: the converter's casts around shared
    # constants differ from one layer to the next, the quantizer's rules do not
    fp16_after = replayer is not None and p.method == "modelopt-int4" and p.high_precision == "fp16"
    q_plan = replace(p, high_precision="fp32") if fp16_after else p
    with tempfile.TemporaryDirectory(prefix=".slices-", dir=dst.parent) as td:
        parts: list[tuple[Slice, Path]] = []

        def modelopt(s: Slice, model: onnx.ModelProto, ins: list[Feed] | None) -> Path:
            a, b = Path(td) / f"{s.name}.src.onnx", Path(td) / f"{s.name}.onnx"
            # inline below the protobuf limit (save_graph would otherwise move the weights of the
            # very model the runner is about to run out to a file)
            if external_data.inline_bytes(model) > external_data.DEFAULT_THRESHOLD:
                model = _copy(model)
            external_data.save_graph(model, a, limit=external_data.DEFAULT_THRESHOLD)
            d = apply_plan(q_plan, a, b, ins, calib_samples=len(ins) if ins else calib_samples, sliced=False)
            for k, v in d.items():
                details[k] = details.get(k, 0) + v if isinstance(v, (int, float)) and not isinstance(v, bool) else v
            for f in [a] + [a.parent / r for r in external_data.referenced_files(external_data.refs_only(a))]:
                f.unlink(missing_ok=True)
            parts.append((s, b))
            return b

        def run(s: Slice, model: onnx.ModelProto, ins: list[Feed], extra: list[str]) -> tuple[list[Feed], dict[str, float]]:
            """The slice's outputs per feed and the amax of each ``extra`` tensor over the feeds (one
            session, the model not copied). The extras are reduced feed by feed: held for every feed
            they are an emma-4b layer's activations 16 times over."""
            n = len(model.graph.output)
            model.graph.output.extend(sg.value_info(x) for x in extra if x not in s.outputs)
            try:
                sess = _cpu_session(model.SerializeToString())
            finally:
                del model.graph.output[n:]
            names = list(dict.fromkeys(s.outputs + extra))
            outs, amax = [], {}
            for x in ins:
                got = dict(zip(names, sess.run(names, x)))
                for k, v in rp.amax_of([got], extra).items():
                    amax[k] = max(amax.get(k, 0.0), v)
                outs.append({o: got[o] for o in s.outputs})
            return outs, amax

        def quantize(s: Slice, model: onnx.ModelProto, ins: list[Feed] | None):
            from ..heap import give_back

            give_back()  # what the last slice's sessions and Model Optimizer freed
            k = rp.layer_index(s.name)
            if replayer is None or k is None:
                modelopt(s, model, ins)
                return None
            sig, ids, nodes = rp.canonical(model)
            st = replayer.states.get(sig)
            if isinstance(st, rp.Template) and st.confirmed:
                names = rp.Renamer(st, ids, nodes, k)
                acts = st.activations_for(ids)
                outs, amax = run(s, model, ins, acts)
                try:
                    values = rp.make_values(st, rp.weights_of(model), amax, names)
                except rp.NotReplayable as e:  # this layer only (an all-zero weight): Model Optimizer's
                    if progress:
                        progress(f"{src.name}: {s.name} not replayed: {e}")
                    modelopt(s, model, ins)
                    replayer.modelopt += 1
                    return outs
                b = Path(td) / f"{s.name}.onnx"
                external_data.save_graph(rp.replay(st, names, values), b, limit=external_data.DEFAULT_THRESHOLD)
                parts.append((s, b))
                replayer.replayed += 1
                return outs
            b = modelopt(s, model, ins)
            replayer.modelopt += 1
            if isinstance(st, str):
                return None
            q = onnx.load(str(b))
            outs = None
            try:
                if st is None:  # the template: its rules must give back its own values
                    tpl = rp.derive(model, q, k)
                    outs, a = run(s, model, ins, tpl.activations)
                    w = rp.weights_of(model)
                    rp.fit(tpl, w, a)
                    names = rp.Renamer(tpl, ids, nodes, k)
                    rp.check(tpl, names, rp.replay(tpl, names, rp.make_values(tpl, w, a, names)), q, f"{s.name} (template)")
                    rp.strip(tpl)
                    replayer.states[sig] = tpl
                else:  # the confirmation: the replay must give what Model Optimizer gave this layer
                    names = rp.Renamer(st, ids, nodes, k)
                    acts = st.activations_for(ids)
                    outs, amax = run(s, model, ins, acts)
                    values = rp.make_values(st, rp.weights_of(model), amax, names)
                    rp.check(st, names, rp.replay(st, names, values), q, f"{s.name} replayed from layers.{st.layer}")
                    st.confirmed = True
            except rp.NotReplayable as e:
                replayer.states[sig] = str(e)
                if progress:
                    progress(f"{src.name}: no replay for slices shaped like {s.name}: {e}")
            return outs

        if chosen:
            runner = SliceRunner(sg, _cpu_session, on_slice=quantize)
            runner.run(chosen, progress=progress, keep=())  # the graph's own outputs are not needed here
            details["held_bytes"] = runner.peak_bytes
            if fp16_after:
                from . import rest_fp16

                for s, b in parts:
                    rest_fp16(b, p.keep_fp32_ops, p.keep_fp32)
        else:
            for s in sg.slices:
                if progress:
                    progress(f"{src.name}: slice {s.name}")
                quantize(s, sg.model(s), None)
        stitch(sg, parts, dst)
    if replayer is not None:
        details["replayed_slices"] = replayer.replayed
        details["modelopt_layer_slices"] = replayer.modelopt
        if replayer.reasons():
            details["replay_off"] = "; ".join(replayer.reasons())
    return details


def _copy(m: onnx.ModelProto) -> onnx.ModelProto:
    c = onnx.ModelProto()
    c.CopyFrom(m)
    return c


def _scope(s: Slice) -> str:
    """'/llm/layers.7/' for a layer's slice (from its own nodes' names); '' for the head and tail."""
    for n in s.nodes:
        m = _LAYER_SCOPE.match(n.name)
        if m:
            return m.group(1)
    return ""


def stitch(sg: SlicedGraph, parts: list[tuple[Slice, Path]], dst: Path) -> None:
    """One graph from the converted slices, in order: the original graph's IO, each slice's nodes
    and weights (names another slice already used get the slice's name appended), the weights
    appended to ``dst``'s data file one slice at a time."""
    orig = sg.proto.graph
    io_names = {v.name for v in list(orig.input) + list(orig.output)}
    used: set[str] = set(io_names)
    nodes, inits, value_info = [], [], []
    opsets: dict[str, int] = {o.domain: o.version for o in sg.proto.opset_import}
    ir = sg.proto.ir_version
    data = dst.parent / external_data.data_file_name(dst)
    types: dict[str, onnx.TypeProto] = {}
    with external_data.DataWriter(data) as w:
        for s, path in parts:
            q = onnx.load(str(path))  # one slice's weights
            for o in q.opset_import:
                opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
            ir = max(ir, q.ir_version)
            boundary = set(s.inputs) | set(s.outputs)
            for v in list(q.graph.input) + list(q.graph.output):
                types.setdefault(v.name, v.type)
            mine = {o for n in q.graph.node for o in n.output} | {t.name for t in q.graph.initializer}
            rename = {t: f"{t}#{s.name}" for t in mine if t in used and t not in boundary}
            scope = _scope(s)
            for n in q.graph.node:
                if scope and layer_of(n) is None:
                    # a node a converter added (a Cast, a Q/DQ pair) keeps its layer's scope, so the
                    # stitched graph slices again as it was sliced
                    n.name = scope + n.name.lstrip("/")
                n.input[:] = [rename.get(i, i) for i in n.input]
                n.output[:] = [rename.get(o, o) for o in n.output]
                if n.name in used:
                    n.name = f"{n.name}#{s.name}"
                used.add(n.name)
                nodes.append(n)
            for t in q.graph.initializer:
                name = rename.get(t.name, t.name)
                inits.append(w.add(name, t))
            used |= {rename.get(t, t) for t in mine}
            for vi in q.graph.value_info:
                vi.name = rename.get(vi.name, vi.name)
                value_info.append(vi)
            del q
    outs = []
    for v in orig.output:  # a slice may have changed an output's element type (fp16): take the slice's
        vi = onnx.ValueInfoProto()
        vi.CopyFrom(v)
        if v.name in types:
            vi.type.tensor_type.elem_type = types[v.name].tensor_type.elem_type
        outs.append(vi)
    g = helper.make_graph(nodes, orig.name, list(orig.input), outs, inits, value_info=value_info)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()], ir_version=ir)
    if not w.bytes_written:
        data.unlink(missing_ok=True)
    dst.write_bytes(m.SerializeToString())
