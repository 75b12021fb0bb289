"""The tied token embedding stored once in a bundle.

EMMA's LM head is the token embedding (``heads.LMHead``): exported, ``embed_tokens`` holds the
(vocab, hidden) table for its Gather and ``lm_head`` holds the same numbers transposed, (hidden,
vocab), folded into its MatMul: vocab x hidden weights twice (emma-4b: 389M parameters, 1.56 GB in
fp32). ``tie`` writes the table once, to ``tied_embedding.data``, and points both graphs at it: the
embedding's Gather reads it as it is, the LM head reads ``Transpose(table)`` (ONNX Runtime and
TensorRT fold a Transpose of a constant when the graph is loaded, so what runs is what ran before).
Both components list the file in their manifest ``data_files`` with the same name and sha256.

The table is shared only when both graphs hold it in the same dtype and bytes, which the pass
checks (it compares the values, it does not assume them): fp32, fp16 and int4w bundles (the LM head
stays at the high precision in int4w). At int8 and fp8 the LM head's weight is quantized (1 byte
per weight, the largest GEMM of decoding) while the Gather table stays at the high precision: the
two are different bytes, so each graph keeps its own (1 + 2 or 4 bytes per vocab x hidden weight,
against 2 x 4 before); sharing would mean either an unquantized LM head or a Gather from the
quantized table (a dequantize per looked-up row), neither measured here. bf16 stores weights as
bf16 + Cast, which the pass does not match: not shared.

``untie`` folds the LM head's ``Transpose(table)`` back into a plain initializer: the quantizer
(Model Optimizer) recognises only initializers as GEMM weights, so every precision conversion
starts from the untied graph and ``tie`` runs again on the result.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .external_data import is_external, load_graph, location, save_graph, set_external
from .graph_edit import set_nodes

TIED_FILE = "tied_embedding.data"
_TRANSPOSE = "/lm_head/tied_embedding/Transpose"
_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


def _gather_table(m: onnx.ModelProto) -> onnx.TensorProto | None:
    init = {i.name: i for i in m.graph.initializer}
    for node in m.graph.node:
        if node.op_type == "Gather" and node.input[0] in init:
            t = init[node.input[0]]
            if t.data_type in _FLOATS and len(t.dims) == 2:
                return t
    return None


def untie(m: onnx.ModelProto) -> int:
    """Every ``Transpose`` of an initializer folded into a transposed initializer. Returns how many."""
    g = m.graph
    init = {i.name: i for i in g.initializer}
    keep, n = [], 0
    for node in g.node:
        if node.op_type == "Transpose" and node.input[0] in init:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            a = numpy_helper.to_array(init[node.input[0]])
            g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(a.transpose(perm) if perm else a.T), node.output[0]))
            n += 1
            continue
        keep.append(node)
    if n:
        set_nodes(g, keep)
    return n


def tie(folder: str | Path, embed_file: str, head_file: str) -> bool:
    """Stores the embedding table once (``TIED_FILE``) for both graphs when they hold the same
    numbers; returns whether it did. Both graph files are rewritten."""
    folder = Path(folder)
    emb, head = load_graph(folder / embed_file), load_graph(folder / head_file)
    untie(head)
    table = _gather_table(emb)
    if table is None:
        return False
    t = numpy_helper.to_array(table)
    init = {i.name: i for i in head.graph.initializer}
    target = None
    for node in head.graph.node:
        w = init.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if w is not None and w.data_type == table.data_type and tuple(w.dims) == t.shape[::-1]:
            if np.array_equal(numpy_helper.to_array(w), t.T):
                target = w
                break
    if target is None:
        return False
    raw = np.ascontiguousarray(t).tobytes()
    # written new and renamed over, never in place: a reader holding the old file (a session, a copy
    # made by hard link) keeps the bytes it checked
    tmp = folder / (TIED_FILE + ".tmp")
    tmp.write_bytes(raw)
    tmp.replace(folder / TIED_FILE)
    set_external(table, TIED_FILE, 0, len(raw))
    shared = onnx.TensorProto()
    shared.CopyFrom(table)
    shared.name = "tied_embedding"
    head.graph.initializer.remove(target)
    head.graph.initializer.append(shared)
    head.graph.node.insert(0, helper.make_node("Transpose", [shared.name], [target.name], name=_TRANSPOSE, perm=[1, 0]))
    save_graph(emb, folder / embed_file)
    save_graph(head, folder / head_file)
    return True


def is_tied(m: onnx.ModelProto) -> bool:
    return any(is_external(t) and location(t) == TIED_FILE for t in m.graph.initializer)
