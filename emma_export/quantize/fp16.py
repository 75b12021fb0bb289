"""Half-precision graphs: fp16 conversion with an overflow check, and bf16 weight storage.

fp16: onnxconverter-common's float16 converter with ``keep_io_types`` (the runtime keeps feeding and
reading float32), the policy's sensitive ops blocked (kept fp32 with Casts around them), every
``Cast(to=FLOAT)`` blocked (the converter retypes their outputs but not their ``to`` attribute, which
ORT then rejects), and every node whose inputs or outputs exceed the fp16 range on real calibration
feeds blocked as well (the overflow check, ``overflowing_nodes``).

bf16: ONNX Runtime's CPU provider has almost no bfloat16 kernels (no MatMul, Conv, LayerNorm...), so a
bf16-computing graph cannot be verified or run here. The bf16 bundle therefore stores every weight
as bfloat16 (half the bytes) followed by a ``Cast`` to float32, and computes in float32: the only
error is the weights' bf16 rounding. ORT runs it; TensorRT (``--bf16``) may fuse the Cast into
bf16 kernels.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

import onnx
from onnx import TensorProto, helper, numpy_helper

from ..numerics import abs_peak  # a NaN counts as overflow, not as 0
from ..export.external_data import PROTOBUF_LIMIT, has_external, load_graph, save_graph

FP16_MAX = 65504.0
# Headroom: an fp16 value above this has at most ~4x margin before an intermediate overflows.
OVERFLOW_THRESHOLD = FP16_MAX / 4

Feed = dict[str, np.ndarray]


def _match(name: str, patterns) -> bool:
    return any(re.search(p, name) for p in patterns)


def overflowing_nodes(path: Path, feeds: list[Feed], threshold: float = OVERFLOW_THRESHOLD, max_feeds: int = 8) -> list[str]:
    """Nodes of the fp32 graph whose float inputs or outputs exceed ``threshold`` on ``feeds``."""
    import onnxruntime as ort

    external = has_external(path)
    # a graph with external data is run from a file beside its data: the weights are read once, by
    # ONNX Runtime, not also into this process's protobuf
    m = onnx.load(str(path), load_external_data=False) if external else load_graph(path)
    init = {i.name for i in m.graph.initializer}
    m = onnx.shape_inference.infer_shapes(m) if m.ByteSize() < PROTOBUF_LIMIT else m
    floats = {vi.name for vi in list(m.graph.value_info) + list(m.graph.output) + list(m.graph.input)
              if vi.type.tensor_type.elem_type == TensorProto.FLOAT}
    nodes = [(n.name, set(n.input) | set(n.output)) for n in m.graph.node]
    probes = _peak_probes(m, floats)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    # each probe run as soon as its tensor exists, so the tensor is freed as in a plain run (the default
    # order ran them after everything: a 40-node chain on 64 MB tensors held 2.94 GB; this order 0.36 GB)
    so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    so.log_severity_level = 3
    sess = _session_beside(m, so, Path(path)) if external else _session(m, so)
    input_names = {i.name for i in sess.get_inputs()}
    peak: dict[str, float] = {}
    wanted = [n for _, pk, nf in probes for n in (pk, nf)]
    for f in feeds[:max_feeds]:
        outs = dict(zip(wanted, sess.run(wanted, {k: v for k, v in f.items() if k in input_names})))
        for n, pk, nf in probes:
            v = float(outs[pk]) if np.isfinite(outs[nf]) else float("inf")  # a NaN counts as overflow, not as 0
            peak[n] = max(peak.get(n, 0.0), v)
    for i in m.graph.input:
        if i.name in input_names and i.name not in init:
            for f in feeds[:max_feeds]:
                if i.name in f and f[i.name].dtype == np.float32 and f[i.name].size:
                    peak[i.name] = max(peak.get(i.name, 0.0), abs_peak(f[i.name]))
    hot = {n for n, v in peak.items() if not np.isfinite(v) or v > threshold}
    return [name for name, io in nodes if hot & io]


def _peak_probes(m: onnx.ModelProto, floats: set[str]) -> list[tuple[str, str, str]]:
    """Each float tensor's peak computed inside the graph, right after the node that makes it: max |x|,
    and sum |x|, not finite when x holds a NaN (ReduceMax skips it: max |[1, nan, 3, -5]| gave 3) or an
    inf. Returns (tensor, peak output, sum output). Only scalars leave the graph, so each activation can
    be freed as in a plain run; with every tensor a graph output, an emma-4b autoencoder run at 512 px
    would hold all of its activations at once (several GB)."""
    nodes, probes = [], []
    for node in m.graph.node:
        nodes.append(node)
        for o in node.output:
            if o not in floats:
                continue
            pk, nf = f"{o}__emma_peak", f"{o}__emma_sum"
            nodes += [helper.make_node("Abs", [o], [o + "__emma_abs"], name=o + "__emma_abs"),
                      helper.make_node("ReduceMax", [o + "__emma_abs"], [pk], name=pk, keepdims=0),
                      helper.make_node("ReduceSum", [o + "__emma_abs"], [nf], name=nf, keepdims=0)]
            m.graph.output.extend([helper.make_tensor_value_info(pk, TensorProto.FLOAT, []),
                                   helper.make_tensor_value_info(nf, TensorProto.FLOAT, [])])
            probes.append((o, pk, nf))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return probes


def _session(m: onnx.ModelProto, so):
    """A CPU session on ``m``; past the protobuf limit through a file with its data beside it."""
    import tempfile

    import onnxruntime as ort

    if m.ByteSize() < PROTOBUF_LIMIT:
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory(prefix="emma-overflow-") as td:
        path = Path(td) / "graph.onnx"
        save_graph(m, path, limit=0)
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _session_beside(m: onnx.ModelProto, so, path: Path):
    """A CPU session on ``m`` (its external tensors not loaded), written next to ``path`` so that
    its data files resolve as they do for the graph itself."""
    import tempfile

    import onnxruntime as ort

    with tempfile.NamedTemporaryFile(prefix=".overflow-", suffix=".onnx", dir=path.parent) as f:
        f.write(m.SerializeToString())
        f.flush()
        return ort.InferenceSession(f.name, so, providers=["CPUExecutionProvider"])


def convert_fp16(src: Path, dst: Path, keep_ops=(), keep_nodes=(), feeds: list[Feed] | None = None) -> dict:
    """fp16 weights and compute, float32 IO. Returns what was kept fp32 (for the manifest's policy).
    A graph with external data is converted on its structure alone, and its weights streamed from
    the source's files to the new graph's (``_stream_weights``): the emma-4b LM head's table is 1.56 GB,
    and the whole-graph conversion held it about five times over."""
    from onnxconverter_common import float16

    src, dst = Path(src), Path(dst)
    external = has_external(src)
    m = onnx.load(str(src), load_external_data=False) if external else load_graph(src)
    del m.graph.value_info[:]  # stale float types would be re-typed blindly
    _outputs_through_identity(m)
    overflow = overflowing_nodes(src, feeds) if feeds else []
    block = set(overflow)
    for node in m.graph.node:
        if node.op_type == "Cast" and any(a.name == "to" and a.i == TensorProto.FLOAT for a in node.attribute):
            block.add(node.name)
        elif node.op_type in keep_ops or _match(node.name, keep_nodes):
            block.add(node.name)
    op_block = list(float16.DEFAULT_OP_BLOCK_LIST)
    _unshare_initializers(m, block | {n.name for n in m.graph.node if n.op_type in op_block})
    kept = sorted(n.name for n in m.graph.node if n.name in block and n.op_type != "Cast")
    was = {t.name: t.data_type for t in m.graph.initializer}
    m16 = float16.convert_float_to_float16(m, keep_io_types=True, op_block_list=op_block, node_block_list=sorted(block),
                                           max_finite_val=FP16_MAX, min_positive_val=2.0 ** -24)
    _drop_cast_round_trips(m16.graph, block | {n.name for n in m.graph.node if n.op_type in op_block})
    if external:
        _stream_weights(m16, was, src, dst)
        dst.write_bytes(m16.SerializeToString())
    else:
        save_graph(m16, dst)
    return {"kept_fp32_nodes": len(kept), "overflow_nodes": overflow}


def _drop_cast_round_trips(g: onnx.GraphProto, kept: set[str]) -> None:
    """A float32 value from a node kept fp32 into other kept nodes, without its trip through fp16: the
    converter casts every kept node's outputs to fp16 and its inputs back, and drops the pair only
    when the value has one reader (its check for several compares ``to`` with 16 and 32, which ONNX's
    type codes never are). With two readers (the AE's linear attention: the numerator and denominator
    rows sliced from one MatMul) the sum overflowed in the round trip and the latents were NaN."""
    def to(n):
        return next((a.i for a in n.attribute if a.name == "to"), None)

    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    drop, rename = set(), {}
    for n in g.node:
        if n.op_type != "Cast" or to(n) != TensorProto.FLOAT16 or n.output[0] in outputs:
            continue
        src = producer.get(n.input[0])
        if src is None or src.name not in kept:  # only a kept node's float32 output is known to be float32
            continue
        rs = readers.get(n.output[0], [])
        if not rs or any(r.op_type != "Cast" or to(r) != TensorProto.FLOAT or r.output[0] in outputs for r in rs):
            continue
        drop.add(n.name)
        for r in rs:
            drop.add(r.name)
            rename[r.output[0]] = n.input[0]
    if not drop:
        return
    keep = [n for n in g.node if n.name not in drop]
    for n in keep:
        for k, i in enumerate(n.input):
            if i in rename:
                n.input[k] = rename[i]
    del g.node[:]
    g.node.extend(keep)


def _stream_weights(m: onnx.ModelProto, was: dict[str, int], src: Path, dst: Path, chunk: int = 1 << 24) -> None:
    """The external tensors of a converted structure (``m``), written to ``dst``'s data file a chunk at a
    time from ``src``'s files: the ones the converter retyped to FLOAT16 with its own rounding
    (``convert_np_to_float16``), the others as they are. ``was``: each initializer's type before."""
    import warnings

    from onnxconverter_common import float16

    from ..export.external_data import data_file_name, is_external, location, set_external

    data = dst.parent / data_file_name(dst)
    root = src.parent.resolve()
    offset = 0
    with open(data, "wb") as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the converter warns for every value it moves into the fp16 range
        for t in m.graph.initializer:
            if not is_external(t):
                continue
            info = {e.key: e.value for e in t.external_data}
            file = (src.parent / location(t)).resolve()
            if not file.is_relative_to(root):
                raise ValueError(f"{src}: tensor '{t.name}' is stored outside the graph's folder ({location(t)})")
            start, length = int(info.get("offset", 0)), int(info["length"])
            to_half = was.get(t.name) == TensorProto.FLOAT and t.data_type == TensorProto.FLOAT16
            pad = -offset % 64
            out.write(b"\0" * pad)
            offset += pad
            written = 0
            with open(file, "rb") as f:
                f.seek(start)
                left = length
                while left:
                    raw = f.read(min(chunk, left))
                    if not raw:
                        raise ValueError(f"{file}: tensor '{t.name}' runs past the end of the file")
                    left -= len(raw)
                    if to_half:
                        raw = float16.convert_np_to_float16(np.frombuffer(raw, np.float32), min_positive_val=2.0 ** -24,
                                                            max_finite_val=FP16_MAX).tobytes()
                    out.write(raw)
                    written += len(raw)
            set_external(t, data.name, offset, written)
            offset += written
    if offset == 0:
        data.unlink()


def _outputs_through_identity(m: onnx.ModelProto) -> None:
    """A graph output that nodes also read (a standard backbone's ``new_key_i``, read by its attention)
    gets its own Identity: with ``keep_io_types`` the converter casts the output back to float32 under
    its own name, and the fp16 nodes reading that name would get float32."""
    outs = {o.name for o in m.graph.output}
    read = {i for n in m.graph.node for i in n.input}
    for name in sorted(outs & read):
        inner = name + "/inner"
        for n in m.graph.node:
            n.output[:] = [inner if o == name else o for o in n.output]
            n.input[:] = [inner if i == name else i for i in n.input]
        m.graph.node.append(helper.make_node("Identity", [inner], [name], name=name + "/output"))


def _unshare_initializers(m: onnx.ModelProto, block: set[str]) -> None:
    """The exporter and onnxslim share identical constants between nodes (zero biases of a Conv and
    of LayerNorms, GELU's scalars). The converter keeps an initializer fp32 if ANY consumer is
    blocked, which then mistypes its fp16 consumers: blocked consumers get their own copy."""
    inits = {i.name: i for i in m.graph.initializer}
    consumers: dict[str, list] = {}
    for node in m.graph.node:
        for i in set(node.input):
            if i in inits:
                consumers.setdefault(i, []).append(node)
    for name, nodes in consumers.items():
        blocked = [n for n in nodes if n.name in block]
        if not blocked or len(blocked) == len(nodes):
            continue
        copy = onnx.TensorProto()
        copy.CopyFrom(inits[name])
        copy.name = name + "_fp32"
        m.graph.initializer.append(copy)
        for n in blocked:
            for k, i in enumerate(n.input):
                if i == name:
                    n.input[k] = copy.name


def convert_bf16_weights(src: Path, dst: Path, keep_nodes=(), min_elements: int = 256) -> int:
    """Every float32 initializer of at least ``min_elements`` stored as bfloat16 + Cast(to=FLOAT),
    except those read by nodes matching ``keep_nodes``. Returns the number converted."""
    import ml_dtypes

    m = load_graph(src)
    g = m.graph
    kept = {i for node in g.node if _match(node.name, keep_nodes) for i in node.input}
    casts = []
    n = 0
    for init in g.initializer:
        if init.data_type != TensorProto.FLOAT or int(np.prod(init.dims)) < min_elements or init.name in kept:
            continue
        a = numpy_helper.to_array(init)
        b = a.astype(ml_dtypes.bfloat16)
        name = init.name
        new = TensorProto()
        new.name = name + "_bf16"
        new.data_type = TensorProto.BFLOAT16
        new.dims.extend(a.shape)
        new.raw_data = b.view(np.uint16).tobytes()
        init.CopyFrom(new)
        casts.append(helper.make_node("Cast", [new.name], [name], to=TensorProto.FLOAT, name=f"{name}_cast_fp32"))
        n += 1
    # Casts first: every consumer of a weight now reads the Cast's output (same name as before).
    nodes = casts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    save_graph(m, dst)
    return n


def convert_bf16_autocast(src: Path, dst: Path, keep_ops=(), keep_nodes=()) -> dict:
    """A bf16-computing graph for TensorRT (Model Optimizer's autocast), float32 IO. ONNX Runtime's
    CPU provider cannot run it (no bf16 MatMul/Conv kernels): verify skips such components."""
    import re as _re

    from modelopt.onnx.autocast import convert_to_mixed_precision

    m = onnx.load(str(src), load_external_data=False)  # node names only
    names = [n.name for n in m.graph.node if _match(n.name, keep_nodes)]
    out = convert_to_mixed_precision(
        str(src), low_precision_type="bf16", nodes_to_exclude=[f"^{_re.escape(n)}$" for n in names] or None,
        op_types_to_exclude=list(keep_ops) or None, keep_io_types=True, data_max=float("inf"), init_max=float("inf"),
    )
    save_graph(out, dst)
    return {"kept_fp32_nodes": len(names)}
