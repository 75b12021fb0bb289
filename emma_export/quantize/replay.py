"""Model Optimizer run on two decoder layers of each structure; what it did replayed on the other
layers of that structure with their own weights and activations.

Why: Model Optimizer's ONNX PTQ serializes and shape-infers the slice it is given about a hundred
times; at emma-4b's widths that costs 105-125 s per decoder layer whatever the calibration data,
about an hour per backbone at fp8 (docs/scale.md). What it does to one layer is what it does to the
next one of the same structure: the same Q/DQ nodes on the same tensors, the same casts. Only the
numbers differ, and each follows a rule that is read off the first layer's result and checked there:

- ``copy``: a weight kept in float (norms), the layer's own tensor in the template's dtype;
- ``weight``: a quantized weight, the layer's weight over its scale, rounded to the template's type;
- ``weight_scale``: the layer's weight amax (per tensor, channel or block) over the type's maximum;
- ``act_scale``: the amax of the activation over this layer's calibration inputs, over the maximum;
- ``zeros``: a zero point;
- ``same``: anything else, when it is the same bytes in both layers Model Optimizer made.

A structure is replayed only when every initializer of its first layer's result follows one of
these rules and reproduces its own value, and when the replay onto the second layer reproduces what
Model Optimizer made for that layer. Otherwise (AWQ's clip search, an entropy calibration, a
structure seen once) every layer goes through Model Optimizer, and the reason is recorded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

Feed = dict[str, np.ndarray]

# How a scale follows from an amax, per quantized type: the first of these that gives back every
# scale of that type in Model Optimizer's result is the rule, computed as written in the scale's own
# dtype ``dt``. FP8 comes out of Model Optimizer as an INT8 calibration converted after the fp16
# conversion (``fp8.py``: the stored int8 scale * 448 / 127, in fp16 arithmetic on a GPU target).
_DIVISORS = {
    TensorProto.FLOAT8E4M3FN: {
        "(amax/127)*448/127": lambda a, dt: (a / np.float32(127.0)).astype(dt) * dt(448.0) / dt(127.0),
        "amax/448": lambda a, dt: (a / np.float32(448.0)).astype(dt),
    },
    TensorProto.INT8: {"amax/127": lambda a, dt: (a / np.float32(127.0)).astype(dt)},
    TensorProto.INT4: {"amax/7": lambda a, dt: (a / np.float32(7.0)).astype(dt)},
}
# Model Optimizer's INT8 calibration (ONNX Runtime's ``compute_scale_zp``) makes a scale of 1.0 where
# amax / 127 is below float32's smallest normal (an all-zero weight channel or activation); its FP8
# starts from that INT8 scale. The rules below would give 0, and 0 / 0 quantizes to NaN.
_UNIT_INT8_RULES = ("(amax/127)*448/127", "amax/127")
_RENAMED = "_QuantizeLinear_Input"  # Model Optimizer's name for a graph output it quantizes
_CLIP_MIN = 1e-5  # Model Optimizer's floor on a block scale (int4 ``find_scales``)
_SCALE_RTOL = 2e-3  # two fp16 ulps: a scale stored in fp16 may round either way
_ACT_RTOL = 5e-3  # the calibration's own amax against ours, on the same inputs


class NotReplayable(ValueError):
    pass


@dataclass(frozen=True)
class Rule:
    kind: str  # copy | weight | weight_scale | act_scale | zeros | same
    src: str = ""  # the fp32 tensor (template layer's name) the value is made from
    scale: str = ""  # weight: the initializer holding its scale (template name)
    axis: int = 1
    block: int = 0


def _attrs(n: onnx.NodeProto) -> tuple[bytes, ...]:
    """A node's attributes as comparable bytes (a Constant's tensor without its name)."""
    out = []
    for a in n.attribute:
        c = onnx.AttributeProto()
        c.CopyFrom(a)
        if c.HasField("t"):
            c.t.name = ""
        out.append(c.SerializeToString())
    return tuple(sorted(out))


def canonical(m: onnx.ModelProto) -> tuple[tuple, dict[str, int], list[str]]:
    """The slice's structure with every tensor named by its order of appearance: two layers with
    the same canonical form differ only in names and initializer values."""
    ids: dict[str, int] = {}

    def cid(name: str):
        if not name:
            return ""
        return ids.setdefault(name, len(ids))

    g = m.graph
    sig: list = [tuple(cid(i.name) for i in g.input)]
    for n in g.node:
        sig.append((n.op_type, n.domain, _attrs(n), tuple(cid(i) for i in n.input), tuple(cid(o) for o in n.output)))
    sig.append(tuple(cid(o.name) for o in g.output))
    sig.append(tuple(sorted((ids[t.name], t.data_type, tuple(t.dims)) for t in g.initializer if t.name in ids)))
    return tuple(sig), ids, [n.name for n in g.node]


def layer_index(name: str) -> int | None:
    m = re.fullmatch(r"layers\.(\d+)", name)
    return int(m.group(1)) if m else None


def _cuts(name: str) -> list[int]:
    """Where a derived name may end its stem (``<stem>_scale``, ``<stem>/inner``), longest first."""
    return [i for i in range(len(name) - 1, 0, -1) if name[i] in "_/"]


class Renamer:
    """Template names -> another layer's: fp32 tensors and nodes by position, the names Model
    Optimizer derived from them (``<tensor>_scale_2``, ``<tensor>_cast_to_fp16``) by their stem."""

    def __init__(self, tpl: Template, ids_k: dict[str, int], nodes_k: list[str], k: int):
        by_id = {v: n for n, v in ids_k.items()}
        self.tensors = {n: by_id[v] for n, v in tpl.ids.items()}
        self.nodes = dict(zip(tpl.nodes, nodes_k))
        self._scope = re.compile(rf"layers\.{tpl.layer}(?=[./_])")
        self.k, self.t = k, tpl.layer

    def _derived(self, name: str) -> str:
        for i in _cuts(name):
            stem = name[:i]
            if stem in self.tensors:  # the rest may name a node too (``<tensor>_cast_to_<node>``)
                return self.tensors[stem] + self._scope.sub(f"layers.{self.k}", name[i:])
        new = self._scope.sub(f"layers.{self.k}", name)
        return new if new != name or self.k == self.t else f"{name}#layers.{self.k}"

    def tensor(self, name: str) -> str:
        if not name:
            return name
        return self.tensors.get(name) or self._derived(name)

    def node(self, name: str) -> str:
        return self.nodes.get(name) or self._derived(name)


def _array(t: TensorProto) -> np.ndarray:
    return numpy_helper.to_array(t)


def _amax_of(w: np.ndarray, shape: tuple, axis: int, block: int) -> np.ndarray:
    """The weight's amax per tensor, channel (``axis``) or block of ``block`` along ``axis``, shaped as
    its scale."""
    a = np.abs(w.astype(np.float32))
    if len(shape) == 0 or int(np.prod(shape)) == 1:
        amax = a.max()
    elif block:
        ax = axis % w.ndim
        blocks = np.moveaxis(a, ax, -1)
        blocks = blocks.reshape(blocks.shape[:-1] + (blocks.shape[-1] // block, block)).max(axis=-1)
        amax = np.moveaxis(blocks, -1, ax)
    else:
        ax = axis % w.ndim
        amax = a.max(axis=tuple(i for i in range(w.ndim) if i != ax))
    return np.asarray(amax, np.float32).reshape(shape)


def _expand(s: np.ndarray, w: np.ndarray, axis: int, block: int) -> np.ndarray:
    if s.ndim == 0 or s.size == 1:
        return s.reshape(())
    ax = axis % w.ndim
    if block:
        return np.repeat(s, block, axis=ax)
    shape = [1] * w.ndim
    shape[ax] = s.size
    return s.reshape(shape)


def _quantize(w: np.ndarray, s: np.ndarray, qtype: int) -> np.ndarray:
    x = w.astype(np.float32) / s.astype(np.float32)
    if qtype == TensorProto.FLOAT8E4M3FN:
        return np.clip(x, -448.0, 448.0).astype(ml_dtypes.float8_e4m3fn)
    if qtype == TensorProto.INT8:
        return np.clip(np.rint(x), -128, 127).astype(np.int8)
    if qtype == TensorProto.INT4:
        return np.clip(np.rint(x), -8, 7).astype(np.int8)
    raise NotReplayable(f"no rule for quantized type {TensorProto.DataType.Name(qtype)}")


def _tensor(name: str, value: np.ndarray, dtype: int) -> TensorProto:
    t = TensorProto()
    t.name = name
    t.data_type = dtype
    t.dims.extend(value.shape)
    if dtype == TensorProto.INT4:
        q = value.astype(np.int8).reshape(-1)
        if q.size % 2:
            q = np.concatenate([q, np.zeros(1, np.int8)])
        u = q.view(np.uint8) & 0x0F
        t.raw_data = (u[0::2] | (u[1::2] << 4)).astype(np.uint8).tobytes()
    elif dtype == TensorProto.FLOAT8E4M3FN:
        t.raw_data = value.astype(ml_dtypes.float8_e4m3fn).view(np.uint8).tobytes()
    else:
        t.raw_data = np.ascontiguousarray(value.astype(helper.tensor_dtype_to_np_dtype(dtype))).tobytes()
    return t


def _attr(n: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in n.attribute if a.name == name), default)


@dataclass
class Template:
    """Model Optimizer's result for one layer (``q``, its weights kept only where a rule needs them)
    with the rule that makes each of its initializers for another layer of the same structure."""

    layer: int
    ids: dict[str, int]
    nodes: list[str]
    q: onnx.ModelProto
    rules: dict[str, Rule]
    activations: list[str]  # fp32 tensors (template names) whose amax the rules read
    divisors: dict[int, str] = field(default_factory=dict)  # quantized type -> its amax rule (``fit``)
    # the precision the weights had when they were quantized: a GPU target's fp16 conversion runs
    # before the weights are folded to FP8 (``fit`` reads it off the template)
    weight_via: str = "float32"
    confirmed: bool = False

    def activations_for(self, ids_k: dict[str, int]) -> list[str]:
        by_id = {v: n for n, v in ids_k.items()}
        return [by_id[self.ids[a]] for a in self.activations]


def derive(src: onnx.ModelProto, q: onnx.ModelProto, layer: int) -> Template:
    """The rules of Model Optimizer's result ``q`` for the fp32 slice ``src`` (both with weights).
    Raises NotReplayable naming the first initializer no rule explains."""
    _, ids, nodes = canonical(src)
    src_inits = {t.name for t in src.graph.initializer}
    producers = {o: n for n in q.graph.node for o in n.output}
    rules: dict[str, Rule] = {}
    acts: list[str] = []
    q_inits = {t.name: t for t in q.graph.initializer}

    def stem(name: str) -> str | None:
        for i in _cuts(name):
            if name[:i] in ids:
                return name[:i]
        return None

    def activation(x: str) -> str:
        while x not in ids:  # through the casts a converter put before the quantizer
            if x.endswith(_RENAMED) and x[: -len(_RENAMED)] in ids:
                return x[: -len(_RENAMED)]  # a graph output's producer, renamed to quantize it
            p = producers.get(x)
            if p is None or p.op_type != "Cast":
                raise NotReplayable(f"activation '{x}' is not a tensor of the fp32 layer")
            x = p.input[0]
        return x

    for n in q.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(n.input) < 2:
            continue
        x, s = n.input[0], n.input[1]
        if s not in q_inits:
            continue
        axis, block = _attr(n, "axis", 1), _attr(n, "block_size", 0)
        if x in q_inits:  # a weight (quantized, or float into a Q)
            base = x if x in src_inits else stem(x)
            if base not in src_inits:
                raise NotReplayable(f"weight '{x}' comes from no weight of the fp32 layer")
            rules[s] = Rule("weight_scale", base, axis=axis, block=block)
            if x not in src_inits:
                rules[x] = Rule("weight", base, scale=s, axis=axis, block=block)
        else:
            if n.op_type == "DequantizeLinear":
                qn = producers.get(x)
                if qn is None or qn.op_type != "QuantizeLinear":
                    raise NotReplayable(f"DequantizeLinear '{n.name}' reads no QuantizeLinear")
                x = qn.input[0]
            a = activation(x)
            rules[s] = Rule("act_scale", a)
            acts.append(a)
        if len(n.input) > 2 and n.input[2] in q_inits:
            rules[n.input[2]] = Rule("zeros")
    for name in q_inits:
        if name in rules:
            continue
        if name in src_inits:
            rules[name] = Rule("copy", name)
        elif (b := stem(name)) in src_inits:
            rules[name] = Rule("copy", b)
        else:
            rules[name] = Rule("same")
    tpl = Template(layer, ids, nodes, q, rules, list(dict.fromkeys(acts)))
    return tpl


def _qtype(q: onnx.ModelProto, scale_name: str) -> int:
    """The quantized type a scale's Q/DQ pairs use (their zero point's, or the weight's)."""
    q_inits = {t.name: t for t in q.graph.initializer}
    for n in q.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 1 and n.input[1] == scale_name:
            if len(n.input) > 2 and n.input[2] in q_inits:
                return q_inits[n.input[2]].data_type
            if n.input[0] in q_inits and n.op_type == "DequantizeLinear":
                return q_inits[n.input[0]].data_type
            return TensorProto.INT8  # QuantizeLinear's default output type
    raise NotReplayable(f"scale '{scale_name}' feeds no quantizer")


def _amaxes(tpl: Template, weights: dict[str, np.ndarray], amax: dict[str, float], rename) -> dict[str, np.ndarray]:
    """The amax behind every scale of the template's result, for one layer."""
    q_inits = {t.name: t for t in tpl.q.graph.initializer}
    out = {}
    for name, r in tpl.rules.items():
        shape = tuple(q_inits[name].dims)
        if r.kind == "weight_scale":
            out[name] = _amax_of(weights[rename(r.src)], shape, r.axis, r.block)
        elif r.kind == "act_scale":
            out[name] = np.full(shape, amax[rename(r.src)], np.float32)
    return out


def fit(tpl: Template, weights: dict[str, np.ndarray], amax: dict[str, float]) -> None:
    """Reads off the template which amax rule each quantized type's scales follow (``_DIVISORS``);
    raises NotReplayable when none gives them all back (a clip search, an entropy calibration)."""
    q_inits = {t.name: t for t in tpl.q.graph.initializer}
    got = _amaxes(tpl, weights, amax, lambda x: x)
    by_type: dict[int, list[str]] = {}
    for name in got:
        by_type.setdefault(_qtype(tpl.q, name), []).append(name)
    for qt, names in by_type.items():
        rules = _DIVISORS.get(qt, {})
        for label, f in rules.items():
            ok = True
            for n in names:
                want = _array(q_inits[n]).astype(np.float64)
                dt = helper.tensor_dtype_to_np_dtype(q_inits[n].data_type).type
                mine = f(got[n], dt).astype(np.float64)
                rtol = _SCALE_RTOL if tpl.rules[n].kind == "weight_scale" else _ACT_RTOL
                if not np.all(np.abs(mine - want) <= rtol * np.abs(want)):  # NaN: no fit
                    ok = False
                    break
            if ok:
                tpl.divisors[qt] = label
                break
        else:
            n = names[0]
            ratio = float(np.median(got[n] / np.maximum(_array(q_inits[n]).astype(np.float32), 1e-30)))
            raise NotReplayable(f"{TensorProto.DataType.Name(qt)} scales follow no amax rule (e.g. '{n}': amax/scale "
                                f"{ratio:.4g}, tried {', '.join(rules) or 'none'})")
    weights_q = [n for n, r in tpl.rules.items() if r.kind == "weight"]
    if weights_q:
        for via in ("float32", "float16"):
            tpl.weight_via = via
            values = make_values(tpl, weights, amax, None)
            if all(_close("weight", values[n], q_inits[n]) is None for n in weights_q):
                break


def _zero_amax(a: np.ndarray, label: str, r: Rule, name: str) -> np.ndarray:
    """``a`` with a zero amax made what Model Optimizer takes for it (``_UNIT_INT8_RULES``); a block
    scale is floored after the rule instead (``_CLIP_MIN``). Any other rule: NotReplayable (the
    layer goes through Model Optimizer), not a zero scale."""
    zero = np.asarray(a, np.float32) / np.float32(127.0) < np.finfo(np.float32).tiny
    if not zero.any() or r.block:
        return a
    if label in _UNIT_INT8_RULES:
        return np.where(zero, np.float32(127.0), a).astype(np.float32)  # INT8 scale 1.0
    raise NotReplayable(f"'{name}': amax 0, and rule {label} has no scale for it that Model Optimizer is known to give")


def make_values(tpl: Template, weights: dict[str, np.ndarray], amax: dict[str, float],
                names: Renamer | None) -> dict[str, TensorProto]:
    """Every initializer of the template's result, made by its rule from one layer's fp32 weights
    (``weights``, by that layer's names) and activation amaxes. Names are the template's."""
    q_inits = {t.name: t for t in tpl.q.graph.initializer}
    rename = names.tensor if names else (lambda x: x)
    amaxes = _amaxes(tpl, weights, amax, rename)
    out: dict[str, TensorProto] = {}
    scales: dict[str, np.ndarray] = {}
    order = sorted(tpl.rules, key=lambda n: tpl.rules[n].kind == "weight")  # scales before the weights
    for name in order:
        r, t = tpl.rules[name], q_inits[name]
        shape = tuple(t.dims)
        if r.kind == "copy":
            v = weights[rename(r.src)].astype(helper.tensor_dtype_to_np_dtype(t.data_type)).reshape(shape)
            out[name] = _tensor(name, v, t.data_type)
        elif r.kind in ("weight_scale", "act_scale"):
            qt = _qtype(tpl.q, name)
            if qt not in tpl.divisors:
                raise NotReplayable(f"no amax rule fitted for {TensorProto.DataType.Name(qt)}")
            dt = helper.tensor_dtype_to_np_dtype(t.data_type).type
            s = _DIVISORS[qt][tpl.divisors[qt]](_zero_amax(amaxes[name], tpl.divisors[qt], r, name), dt)
            if r.block:
                s = np.clip(s, dt(_CLIP_MIN), None)
            out[name] = _tensor(name, s, t.data_type)
            scales[name] = _array(out[name]).astype(np.float32)
        elif r.kind == "weight":
            w = weights[rename(r.src)].astype(tpl.weight_via)
            s = _expand(scales[r.scale], w, r.axis, r.block)
            out[name] = _tensor(name, _quantize(w, s, t.data_type), t.data_type)
        elif r.kind == "zeros":
            out[name] = _tensor(name, np.zeros(shape, np.float32), t.data_type)
        else:  # same: the template's bytes
            c = TensorProto()
            c.CopyFrom(t)
            out[name] = c
    return out


def _close(kind: str, got: TensorProto, want: TensorProto) -> str | None:
    """Why ``got`` is not ``want`` within the rule's tolerance (None when it is)."""
    if got.data_type != want.data_type or list(got.dims) != list(want.dims):
        return f"type/shape {got.data_type}{list(got.dims)} != {want.data_type}{list(want.dims)}"
    a, b = _array(got), _array(want)
    if kind in ("weight_scale", "act_scale"):
        a, b = a.astype(np.float64), b.astype(np.float64)
        rtol = _SCALE_RTOL if kind == "weight_scale" else _ACT_RTOL
        bad = ~(np.abs(a - b) <= rtol * np.abs(b))  # a NaN on either side is off, not within tolerance
        return f"{int(bad.sum())} of {a.size} values off by more than {rtol:g} relative (max {np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)):.3g})" if bad.any() else None
    if kind == "weight":
        # a value on a rounding tie may go either way when the scale differs by an fp16 ulp: at most
        # 0.1% of the values, each the neighbouring value of its type (one integer step; for FP8 the
        # next code of the same sign, NaN never), no further
        if got.data_type == TensorProto.FLOAT8E4M3FN:
            a, b = _fp8_ordinal(got), _fp8_ordinal(want)
        else:
            a, b = a.astype(np.int64), b.astype(np.int64)
        off = a != b
        if off.mean() > 1e-3 or (off.any() and np.abs(a - b).max() > 1):
            return f"{int(off.sum())} of {a.size} quantized values differ (at most {int(np.abs(a - b).max())} steps)"
        return None
    if a.tobytes() != b.tobytes():
        return "values differ"
    return None


def _fp8_ordinal(t: TensorProto) -> np.ndarray:
    """FP8 E4M3FN codes as integers in value order (+0 and -0 both 0, neighbours one apart); a NaN code
    far from every value, so it matches only another NaN."""
    u = np.frombuffer(t.raw_data, np.uint8).astype(np.int64) if t.raw_data else _array(t).view(np.uint8).astype(np.int64)
    mag, neg = u & 0x7F, u >= 0x80
    out = np.where(neg, -mag, mag)
    return np.where(mag == 0x7F, 1 << 20, out).reshape(tuple(t.dims))


def _node_key(n: onnx.NodeProto) -> tuple:
    return n.op_type, n.domain, tuple(n.input), tuple(n.output), _attrs(n)


def check(tpl: Template, names: Renamer, got: onnx.ModelProto, reference: onnx.ModelProto, what: str) -> None:
    """Raises NotReplayable when the replayed graph ``got`` is not Model Optimizer's ``reference`` for
    the same layer: the same nodes (by name, in any order: Model Optimizer's order is not stable),
    the same IO, each initializer within its rule's tolerance."""
    mine = {n.name: _node_key(n) for n in got.graph.node}
    ref = {n.name: _node_key(n) for n in reference.graph.node}
    if mine != ref:
        name = min(set(mine.items()) ^ set(ref.items()))[0]
        a, b = mine.get(name), ref.get(name)
        show = lambda k: "none" if k is None else f"{k[0]}({', '.join(k[2])}) -> {', '.join(k[3])}"
        raise NotReplayable(f"{what}: node '{name}' is {show(a)} replayed, {show(b)} by Model Optimizer")
    # names, element types and ranks (the symbolic dims shape inference invents differ per layer)
    io = lambda m: [(v.name, v.type.tensor_type.elem_type, len(v.type.tensor_type.shape.dim))
                    for v in list(m.graph.input) + list(m.graph.output)]
    if io(got) != io(reference):
        raise NotReplayable(f"{what}: the graph inputs or outputs differ from Model Optimizer's")
    kinds = {names.tensor(n): r.kind for n, r in tpl.rules.items()}
    want = {t.name: t for t in reference.graph.initializer}
    if set(want) != {t.name for t in got.graph.initializer}:
        raise NotReplayable(f"{what}: the initializers differ from Model Optimizer's by name")
    for t in got.graph.initializer:
        why = _close(kinds[t.name], t, want[t.name])
        if why:
            raise NotReplayable(f"{what}: '{t.name}' ({kinds[t.name]}): {why}")


def replay(tpl: Template, names: Renamer, values: dict[str, TensorProto]) -> onnx.ModelProto:
    """The template's graph with another layer's names and ``values``."""
    q = tpl.q.graph
    nodes = []
    for n in q.node:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        c.name = names.node(n.name)
        c.input[:] = [names.tensor(i) for i in n.input]
        c.output[:] = [names.tensor(o) for o in n.output]
        nodes.append(c)

    def vis(vs):
        out = []
        for v in vs:
            c = onnx.ValueInfoProto()
            c.CopyFrom(v)
            c.name = names.tensor(v.name)
            out.append(c)
        return out

    inits = []
    for t in q.initializer:
        v = values[t.name]
        v.name = names.tensor(t.name)
        inits.append(v)
    g = helper.make_graph(nodes, q.name, vis(q.input), vis(q.output), inits, value_info=vis(q.value_info))
    return helper.make_model(g, opset_imports=tpl.q.opset_import, ir_version=tpl.q.ir_version)


def strip(tpl: Template) -> None:
    """Drops the template's bytes no rule reads again (all but ``same``): a layer's worth of weights."""
    for t in tpl.q.graph.initializer:
        if tpl.rules[t.name].kind != "same":
            t.ClearField("raw_data")
            for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                t.ClearField(f)
            t.data_location = TensorProto.DEFAULT
            del t.external_data[:]


def weights_of(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: _array(t) for t in m.graph.initializer}


def amax_of(outputs: list[Feed], names: list[str]) -> dict[str, float]:
    """Each tensor's amax over the outputs; inf where a value is not finite (its scale then fails the
    build's finite-scale check instead of a NaN being taken for 0)."""
    from ..numerics import abs_peak

    return {n: max(abs_peak(o[n]) for o in outputs) for n in names}


@dataclass
class Replayer:
    """Per structure of layer slice: None (first seen), a Template, or the reason it is not replayed."""

    states: dict[tuple, Template | str] = field(default_factory=dict)
    replayed: int = 0
    modelopt: int = 0

    def reasons(self) -> list[str]:
        return [s for s in self.states.values() if isinstance(s, str)]
