"""The KV cache's dtype in the backbone graphs (``build --kv-cache``): float32 (what export writes),
float16, or 8 bits, int8 or FP8 E4M3, with one calibrated scale per layer for the keys and one for the
values (per tensor).

An 8-bit cache halves a 16-bit one: on emma-4b at 8192 tokens the six cache rows of an edit are 6.75
GiB at fp16 and 3.38 GiB at 8 bits (``emma-export plan --kv-cache``). The graphs do the conversion,
so the runtime only stores and moves bytes:

- a **standard** backbone takes ``past_key_i`` as 8-bit and dequantizes it
  (``DequantizeLinear``) before attention, and emits ``new_key_i`` through ``QuantizeLinear`` with
  the same scale. The chunk attends to its own keys unquantized; every later chunk reads them from
  the cache. TensorRT parses Q/DQ (INT8 everywhere, FP8 on compute capability 8.9+); ONNX Runtime's
  CPU provider runs both (FP8 with graph optimizations off, as for FP8 precision graphs).
- a **gqa** backbone gets ONNX Runtime's own quantized cache: ``GroupQueryAttention`` with an int8
  ``past_key``/``present_key`` and per-tensor ``k_scale``/``v_scale``. ONNX Runtime's CPU provider
  has no FP8 cache for the operator, nor an fp16 one beside float32 compute (NOT_IMPLEMENTED in
  1.32), so an fp8- or fp16-cache build for an ONNX Runtime target uses the standard flavour instead
  (``build`` says so).

Both backbones read the one cache (the Gen graph attends to what the Und graph wrote), so the
scales are shared: ``scale_i = amax_i / qmax`` over every cached key (value) of layer ``i`` in the
calibration capture, both branches together. Every key a graph ever reads from the cache was a
``past_key_i`` feed of some captured step, so the captured pasts are the calibration set.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from emma_runtime import names
from emma_runtime.bundle import MANIFEST, Bundle, KVCacheInfo, sha256_file
from emma_runtime.kv_cache import FLOAT8

from ..export.graph_edit import set_nodes

#: ``--kv-cache`` choices; ``auto`` keeps what the export wrote (float32 KV IO)
KV_CACHE_CHOICES = ("auto", "fp32", "fp16", "int8", "fp8")
EIGHT_BIT = ("int8", "fp8")
#: the largest magnitude each 8-bit type holds: the calibrated amax maps onto it
QMAX = {"int8": 127.0, "fp8": 448.0}
#: the manifest / TensorInfo dtype of each choice
DTYPE = {"fp32": "float32", "fp16": "float16", "int8": "int8", "fp8": FLOAT8}
_ONNX = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "int8": TensorProto.INT8, "fp8": TensorProto.FLOAT8E4M3FN}
#: bytes per cached element (``plan``)
BYTES = {"fp32": 4, "fp16": 2, "int8": 1, "fp8": 1}
#: the caches ONNX Runtime's GroupQueryAttention runs on the CPU provider (with float32 compute): the
#: others (fp16, fp8) make the standard graph (NOT_IMPLEMENTED in ONNX Runtime 1.32)
GQA_KV_CACHES = ("auto", "fp32", "int8")

Feed = dict[str, np.ndarray]


def kind_of(dtype: str) -> str:
    """The ``--kv-cache`` name of a manifest dtype (float8e4m3fn -> fp8)."""
    return {v: k for k, v in DTYPE.items()}[dtype]


@dataclass(frozen=True)
class Scales:
    """Per layer: the amax of every cached key and value in the calibration capture, and the scales."""

    kind: str
    key_amax: tuple[float, ...]
    value_amax: tuple[float, ...]

    @property
    def keys(self) -> tuple[float, ...]:
        return tuple(_scale(a, self.kind) for a in self.key_amax)

    @property
    def values(self) -> tuple[float, ...]:
        return tuple(_scale(a, self.kind) for a in self.value_amax)

    def info(self) -> KVCacheInfo:
        return KVCacheInfo(DTYPE[self.kind], self.keys, self.values)


def _scale(amax: float, kind: str) -> float:
    # a layer whose cache is all zeros (a zero-initialised projection) still gets a valid scale
    return float(np.float32(max(float(amax), 1e-6) / QMAX[kind]))


def calibrate(feeds: dict[str, list[Feed]], layers: int, kind: str) -> Scales:
    """Per-layer amax of the cached keys and values over the standard backbones' captured feeds
    (``past_key_i``: the real cache each step read), both branches together."""
    if kind not in EIGHT_BIT:
        raise ValueError(f"--kv-cache {kind} has no scales")
    ka, va = np.zeros(layers), np.zeros(layers)
    seen = 0
    for comp in names.BACKBONES:
        for f in feeds.get(comp, []):
            for i in range(layers):
                k, v = (f.get(n) for n in names.past_kv(i))
                if k is None or v is None or not k.size:
                    continue
                seen += 1
                ka[i] = max(ka[i], float(np.abs(k).max()))
                va[i] = max(va[i], float(np.abs(v).max()))
    if not seen:
        raise ValueError("--kv-cache: the calibration capture holds no cached keys (no backbone step read a past)")
    if not (np.isfinite(ka).all() and np.isfinite(va).all()):
        raise ValueError("--kv-cache: the calibration capture holds non-finite cached keys or values")
    return Scales(kind, tuple(float(x) for x in ka), tuple(float(x) for x in va))


def quantize_host(a: np.ndarray, scale: float, dtype: str) -> np.ndarray:
    """Host float32 -> the cache's storage (what QuantizeLinear writes: round half to even, saturated);
    a float cache is cast. FP8 bytes come back as uint8 (``kv_cache.storage_dtype``)."""
    if dtype == "int8":
        return np.clip(np.rint(np.asarray(a, np.float32) / np.float32(scale)), -128, 127).astype(np.int8)
    if dtype == FLOAT8:
        import ml_dtypes

        x = np.clip(np.asarray(a, np.float32) / np.float32(scale), -448.0, 448.0)
        return x.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    return np.asarray(a, dtype)


# ---- the graph rewrite ------------------------------------------------------------------------------

def rewrite_graph(m: onnx.ModelProto, kind: str, layers: int, scales: Scales | None) -> None:
    """``m``'s KV IO (past in, new or present out) as ``kind``; in place. A gqa graph (it holds
    GroupQueryAttention nodes) gets the operator's quantized cache, a standard graph Q/DQ or Casts."""
    if kind in EIGHT_BIT and scales is None:
        raise ValueError(f"--kv-cache {kind} needs calibrated scales")
    gqa = [n for n in m.graph.node if n.op_type == "GroupQueryAttention"]
    if gqa:
        if kind not in GQA_KV_CACHES:
            raise ValueError(f"ONNX Runtime's GroupQueryAttention takes an int8 KV cache on the CPU, not {kind}: "
                             f"use the standard graph (--attention standard) for --kv-cache {kind}")
        if kind == "fp32":
            return
        _rewrite_gqa(m, gqa, layers, scales)
    else:
        _rewrite_standard(m, kind, layers, scales)


def _scale_inits(g, kind: str, name: str, scale: float, shape=()) -> tuple[str, str]:
    s = numpy_helper.from_array(np.full(shape, scale, np.float32), f"{name}/kv_scale")
    z = helper.make_tensor(f"{name}/kv_zero_point", _ONNX[kind], list(shape), [0] * int(np.prod(shape, dtype=int)))
    g.initializer.extend([s, z])
    return s.name, z.name


def _rename_uses(g, old: str, new: str) -> None:
    for node in g.node:
        node.input[:] = [new if i == old else i for i in node.input]


def _rewrite_standard(m: onnx.ModelProto, kind: str, layers: int, scales: Scales | None) -> None:
    g = m.graph
    ins, outs = {i.name: i for i in g.input}, {o.name: o for o in g.output}
    head, tail = [], []
    for i in range(layers):
        for j, (past, new) in enumerate(zip(names.past_kv(i), names.new_kv(i))):
            if past not in ins or new not in outs:
                raise ValueError(f"not a standard backbone graph: no {past} input or {new} output")
            inner_past, inner_new = past + "/kv_float", new + "/kv_float"
            _rename_uses(g, past, inner_past)
            for node in g.node:  # the producer of the output, and anything inside that reads it
                node.output[:] = [inner_new if o == new else o for o in node.output]
            _rename_uses(g, new, inner_new)
            # scoped as the layer's own nodes (/layers.i/): a graph run slice by slice then makes layer
            # i's cache in layer i's slice, and verify judges it there (unscoped, they fell to the tail
            # slice and emma-4b's int8-cache verify compared no keys/values per layer)
            scope = f"/kv_cache/layers.{i}"
            if kind in EIGHT_BIT:
                scale = (scales.keys if j == 0 else scales.values)[i]
                s, z = _scale_inits(g, kind, past, scale)
                head.append(helper.make_node("DequantizeLinear", [past, s, z], [inner_past], name=f"{scope}/{past}/DequantizeLinear"))
                tail.append(helper.make_node("QuantizeLinear", [inner_new, s, z], [new], name=f"{scope}/{new}/QuantizeLinear"))
            else:
                head.append(helper.make_node("Cast", [past], [inner_past], to=TensorProto.FLOAT, name=f"{scope}/{past}/Cast"))
                tail.append(helper.make_node("Cast", [inner_new], [new], to=_ONNX[kind], name=f"{scope}/{new}/Cast"))
            ins[past].type.tensor_type.elem_type = _ONNX[kind]
            outs[new].type.tensor_type.elem_type = _ONNX[kind]
    nodes = head + list(g.node) + tail  # topological: the pasts first, the new keys last
    del g.node[:]
    g.node.extend(nodes)


def _rewrite_gqa(m: onnx.ModelProto, nodes, layers: int, scales: Scales) -> None:
    """Each GroupQueryAttention reads and writes the graph's cache IO directly (a Cast between them, as
    an fp16 graph has, goes) as int8 with its layer's per-tensor scales."""
    g = m.graph
    ins, outs = {i.name: i for i in g.input}, {o.name: o for o in g.output}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    drop = []

    def source(x: str) -> str:
        """The graph input behind ``x`` through Casts."""
        while x not in ins and x in producer and producer[x].op_type == "Cast":
            drop.append(producer[x])
            x = producer[x].input[0]
        return x

    def sink(x: str) -> str:
        """The graph output ``x`` reaches through Casts."""
        while x not in outs and len(consumers.get(x, [])) == 1 and consumers[x][0].op_type == "Cast":
            drop.append(consumers[x][0])
            x = consumers[x][0].output[0]
        return x

    done = set()
    for node in nodes:
        pk, pv = source(node.input[3]), source(node.input[4])
        layer = next((i for i in range(layers) if names.past_kv(i) == (pk, pv)), None)
        if layer is None:
            raise ValueError(f"{node.name}: its past key/value are not a layer's past_key_i/past_value_i inputs")
        ok, ov = sink(node.output[1]), sink(node.output[2])
        if (ok, ov) != names.present_kv(layer):
            raise ValueError(f"{node.name}: its present key/value are not present_key_{layer}/present_value_{layer}")
        node.input[3], node.input[4] = pk, pv
        node.output[1], node.output[2] = ok, ov
        inputs = list(node.input) + [""] * (14 - len(node.input))
        inputs[12], _ = _scale_inits(g, "int8", pk, scales.keys[layer], (1,))
        inputs[13], _ = _scale_inits(g, "int8", pv, scales.values[layer], (1,))
        node.input[:] = inputs
        node.attribute.extend([helper.make_attribute("k_quant_type", "PER_TENSOR"), helper.make_attribute("v_quant_type", "PER_TENSOR"),
                               helper.make_attribute("kv_cache_bit_width", 8)])
        for n in (pk, pv):
            ins[n].type.tensor_type.elem_type = TensorProto.INT8
        for n in (ok, ov):
            outs[n].type.tensor_type.elem_type = TensorProto.INT8
        done.add(layer)
    if done != set(range(layers)):
        raise ValueError(f"the gqa graph has GroupQueryAttention for layers {sorted(done)}, not all {layers}")
    gone = {id(n) for n in drop}
    set_nodes(g, [n for n in g.node if id(n) not in gone])


def graph_scales(m: onnx.ModelProto, layers: int) -> dict[str, float]:
    """The scale each KV tensor of a rewritten graph quantizes with (verify checks them against the
    manifest's): ``past_key_i`` -> its scale initializer."""
    init = {i.name: i for i in m.graph.initializer}
    out = {}
    for i in range(layers):
        for n in names.past_kv(i):
            t = init.get(f"{n}/kv_scale")
            if t is not None:
                out[n] = float(numpy_helper.to_array(t).reshape(-1)[0])
    return out


# ---- the bundle -------------------------------------------------------------------------------------

def apply_to_bundle(bundle_dir: str | Path, kind: str, feeds: dict[str, list[Feed]] | None) -> KVCacheInfo | None:
    """Rewrites the backbones of the bundle at ``bundle_dir`` (in place) for a ``kind`` KV cache and
    records it in the manifest (``kv_cache``). ``auto``: nothing changes. Returns what was recorded."""
    from ..export.bundle_writer import data_files, graph_io
    from ..export.external_data import load_graph, save_graph

    if kind == "auto":
        return None
    if kind not in KV_CACHE_CHOICES:
        raise ValueError(f"unknown --kv-cache {kind!r}; choose one of {', '.join(KV_CACHE_CHOICES)}")
    bundle_dir = Path(bundle_dir)
    m = Bundle.load(bundle_dir, check_files=False).manifest
    if m.kv_cache is not None:
        raise ValueError(f"{bundle_dir}: the KV cache is already {m.kv_cache.dtype}")
    layers = m.model.num_layers
    scales = calibrate(feeds or {}, layers, kind) if kind in EIGHT_BIT else None
    info = scales.info() if scales else KVCacheInfo(DTYPE[kind])
    entries = dict(m.components)
    for name in names.BACKBONES:
        c = entries.get(name)
        if c is None:
            continue
        path = bundle_dir / c.file
        if kind != "fp32":
            g = load_graph(path)
            rewrite_graph(g, kind, layers, scales)
            save_graph(g, path)
        inputs, outputs = graph_io(path)
        entries[name] = replace(c, inputs=inputs, outputs=outputs, sha256=sha256_file(path), data_files=data_files(path))
    new = replace(m, components=entries, kv_cache=info)
    tmp = bundle_dir / (MANIFEST + ".tmp")
    tmp.write_text(new.to_json())
    tmp.replace(bundle_dir / MANIFEST)
    return info
