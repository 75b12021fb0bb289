"""Static check that an ONNX graph only uses what TensorRT's ONNX parser can import.

Runs on the ``onnx.ModelProto`` alone (no TensorRT install, no GPU), so a graph that the
parser would refuse is rejected at export time, naming the offending node, instead of
failing later inside an engine build.

Source of the support table below:
    repository  onnx/onnx-tensorrt
    path        docs/operators.md
    commit      fa5aa9f61e7781d2ca8f5351d42c1f19525a6124
    states      TensorRT 10.15; default-domain opsets 9 to 24 inclusive

Only the operator names, the type columns, and those restrictions that can be enforced
from the graph alone are encoded (as data, in this module's own words). Type names of the
doc map to ONNX element types as FP32->FLOAT, FP16->FLOAT16, BF16->BFLOAT16,
FP8->FLOAT8E4M3FN, FP4->FLOAT4E2M1, INT4/INT8/INT32/INT64/UINT8/BOOL unchanged.

Type policy:
  * An op's input/output element types must be in its listed set. Inputs that carry
    shapes, indices, axes, conditions or other auxiliary values (``_CHECKED_IO``) are not
    held to that set, and a type that cannot be determined is skipped.
  * DOUBLE: the doc gives DOUBLE limited support (the parser casts it down to FLOAT), so it
    is accepted wherever FLOAT is listed and flagged everywhere else.
  * INT64 is accepted exactly where the doc lists it.
  * Non-default domains are rejected (no TensorRT plugin, "trt" domain included, is
    assumed), except calls to model-local functions, whose bodies are checked instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

__all__ = [
    "OpIssue",
    "UnsupportedGraphError",
    "SUPPORTED_OPS",
    "UNSUPPORTED_OPS",
    "RESTRICTIONS",
    "OPSET_RANGE",
    "SOURCE",
    "check_model",
    "assert_supported",
]

SOURCE = {
    "repo": "onnx/onnx-tensorrt",
    "path": "docs/operators.md",
    "commit": "fa5aa9f61e7781d2ca8f5351d42c1f19525a6124",
    "tensorrt": "10.15",
}
OPSET_RANGE = (9, 24)

# ---- element types -------------------------------------------------------------------------------

_T = TensorProto
FP32, FP16, BF16 = _T.FLOAT, _T.FLOAT16, _T.BFLOAT16
FP8, FP4 = _T.FLOAT8E4M3FN, _T.FLOAT4E2M1
INT4, INT8, INT32, INT64, UINT8, BOOL = _T.INT4, _T.INT8, _T.INT32, _T.INT64, _T.UINT8, _T.BOOL

_F2 = frozenset({FP32, FP16})
_F3 = frozenset({FP32, FP16, BF16})
_F3I = _F3 | {INT32, INT64}
_F3IB = _F3I | {BOOL}
_BOOL = frozenset({BOOL})
_QUANT = frozenset({INT8, FP8, FP4, INT4})  # TensorRT's quantized types (only reachable via Q/DQ)
_CONST = _F3 | {FP8, FP4, INT4, INT32, INT64, BOOL}
_CAST = _F3I | {UINT8, BOOL}

# ---- operator support matrix (default ONNX domain) -----------------------------------------------

# op_type -> element types the parser accepts for the op's data tensors (ops marked "Y").
SUPPORTED_OPS: dict[str, frozenset[int]] = {
    "Abs": _F3I,
    "Acos": _F3,
    "Acosh": _F3,
    "Add": _F3I,
    "And": _BOOL,
    "ArgMax": _F3I,
    "ArgMin": _F3I,
    "Asin": _F3,
    "Asinh": _F3,
    "Atan": _F3,
    "Atanh": _F3,
    "Attention": _F3 | {INT8, FP8},
    "AveragePool": _F3,
    "BatchNormalization": _F3,
    "BlackmanWindow": _F2,
    "Cast": _CAST,
    "CastLike": _CAST,
    "Ceil": _F3,
    "Celu": _F3,
    "Clip": _F3,
    "Concat": _F3IB,
    "Constant": _CONST,
    "ConstantOfShape": _CONST,
    "Conv": _F3,
    "ConvTranspose": _F3,
    "Cos": _F3,
    "Cosh": _F3,
    "CumSum": _F3,
    "DeformConv": _F2,
    "DepthToSpace": _F3I,
    "DequantizeLinear": _QUANT,
    "Div": _F3I,
    "Dropout": _F3,
    "Einsum": _F3,
    "Elu": _F3,
    "Equal": _F3I,
    "Erf": _F3,
    "Exp": _F3,
    "Expand": _F3IB,
    "EyeLike": _F3IB,
    "Flatten": _F3IB,
    "Floor": _F3,
    "Gather": _F3IB,
    "GatherElements": _F3IB,
    "GatherND": _F3IB,
    "Gelu": _F3I | {INT8},
    "Gemm": _F3,
    "GlobalAveragePool": _F3,
    "GlobalLpPool": _F3,
    "GlobalMaxPool": _F3,
    "Greater": _F3I,
    "GreaterOrEqual": _F3I,
    "GridSample": _F2,
    "GroupNormalization": _F3,
    "GRU": _F3,
    "HammingWindow": _F2,
    "HannWindow": _F2,
    "HardSigmoid": _F3,
    "HardSwish": _F3,
    "Hardmax": _F3,
    "Identity": _F3IB,
    "If": _F3IB,
    "ImageScaler": _F3,
    "InstanceNormalization": _F3,
    "IsInf": _F3,
    "IsNaN": _F3I,
    "LayerNormalization": _F3,
    "LeakyRelu": _F3,
    "Less": _F3I,
    "LessOrEqual": _F3I,
    "Log": _F3,
    "LogSoftmax": _F3,
    "Loop": _F3IB,
    "LRN": _F3,
    "LSTM": _F3,
    "LpNormalization": _F3,
    "LpPool": _F3,
    "MatMul": _F3,
    "Max": _F3I,
    "MaxPool": _F3,
    "Mean": _F3I | {FP8},
    "MeanVarianceNormalization": _F3,
    "Min": _F3I,
    "Mish": _F2,
    "Mod": _F3I,
    "Mul": _F3I,
    "Neg": _F3I,
    "NonMaxSuppression": _F2,
    "NonZero": _F2,
    "Not": _BOOL,
    "OneHot": _F3IB,
    "Or": _BOOL,
    "Pad": _F3I,
    "ParametricSoftplus": _F3,
    "Pow": _F3I,
    "PRelu": _F3,
    "QuantizeLinear": _F3,
    "RandomNormal": _F3,
    "RandomNormalLike": _F3,
    "RandomUniform": _F3,
    "RandomUniformLike": _F3,
    "Range": _F3I,
    "Reciprocal": _F3,
    "ReduceL1": _F3I,
    "ReduceL2": _F3I,
    "ReduceLogSum": _F3I,
    "ReduceLogSumExp": _F3I,
    "ReduceMax": _F3I,
    "ReduceMean": _F3I,
    "ReduceMin": _F3I,
    "ReduceProd": _F3I,
    "ReduceSum": _F3I,
    "ReduceSumSquare": _F3I,
    "Relu": _F3I,
    "Reshape": _F3IB,
    "Resize": _F3,
    "ReverseSequence": _F3IB,
    "RMSNormalization": _F3,
    "RNN": _F3,
    "RoiAlign": _F2,
    "RotaryEmbedding": _F3,
    "Round": _F3,
    "STFT": frozenset({FP32}),
    "ScaledTanh": _F3,
    "Scan": _F3,
    "Scatter": _F3I,
    "ScatterElements": _F3I,
    "ScatterND": _F3I,
    "Selu": _F3,
    "Shape": _F3IB,
    "Shrink": _F3I,
    "Sigmoid": _F3,
    "Sign": _F3I,
    "Sin": _F3,
    "Sinh": _F3,
    "Size": _F3IB,
    "Slice": _F3IB,
    "Softmax": _F3,
    "Softplus": _F3,
    "Softsign": _F3,
    "SpaceToDepth": _F3I,
    "Split": _F3IB,
    "Sqrt": _F3,
    "Squeeze": _F3IB,
    "Sub": _F3I,
    "Sum": _F3I,
    "Tan": _F3,
    "Tanh": _F3,
    "TensorScatter": _F3 | {INT32},
    "ThresholdedRelu": _F3,
    "Tile": _F3IB,
    "TopK": _F3I,
    "Transpose": _F3IB,
    "Trilu": _F3IB,
    "Unsqueeze": _F3IB,
    "Upsample": _F3,
    "Where": _F3IB,
    "Xor": _BOOL,
}

# Ops the matrix marks "N" (kept only to word the report; anything absent from SUPPORTED_OPS fails).
UNSUPPORTED_OPS: frozenset[str] = frozenset({
    "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor",
    "Col2Im", "CenterCropPad", "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det",
    "DynamicQuantizeLinear", "ImageDecoder", "MatMulInteger", "MaxRoiPool", "MaxUnpool",
    "MelWeightMatrix", "Multinomial", "NegativeLogLikelihoodLoss", "Optional",
    "OptionalGetElement", "OptionalHasElement", "QLinearConv", "QLinearMatMul", "RegexFullMatch",
    "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert",
    "SequenceLength", "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence",
    "StringConcat", "StringNormalizer", "StringSplit", "TfIdfVectorizer", "Unique",
})

# Restrictions of the matrix that this module enforces statically (see _check_restrictions).
RESTRICTIONS: dict[str, str] = {
    "Attention": "Q/K/V rank 4; no past_key/past_value/nonpad_kv_seqlen inputs; only output Y; "
                 "qk_matmul_output_mode and softcap unset",
    "AveragePool": "2D/3D kernels only; dilations all 1",
    "LpPool": "dilations all 1",
    "MaxPool": "2D/3D kernels only; dilations all 1; no Indices output",
    "Constant": "no sparse_value / value_string / value_strings",
    "CumSum": "axis must be constant",
    "Dropout": "is_training must be a constant False",
    "GridSample": "input rank 4",
    "GRU": "bidirectional: same activations both directions",
    "RNN": "bidirectional: same activations both directions",
    "LSTM": "bidirectional: same activations both directions; input_forget=0; layout=0",
    "LayerNormalization": "only output Y",
    "OneHot": "depth must be constant",
    "QuantizeLinear": "y_zero_point must be 0; output a TensorRT quantized type",
    "DequantizeLinear": "x_zero_point must be 0",
    **{f"Reduce{k}": "axes must be an initializer"
       for k in ("L1", "L2", "LogSum", "LogSumExp", "Max", "Mean", "Min", "Prod", "Sum", "SumSquare")},
    "Resize": "coordinate modes half_pixel/pytorch_half_pixel/tf_half_pixel_for_nn/asymmetric/"
              "align_corners; modes nearest/linear; nearest modes floor/ceil/round_prefer_*; "
              "keep_aspect_ratio_policy stretch; no antialias",
    "RotaryEmbedding": "position_ids must be INT64",
    "ScatterND": "reduction must be none",
    "STFT": "frame_step and window must be initializers",
    "TensorScatter": "axis must be -2; past_cache/update rank 4",
    "TopK": "sorted=1; K < 3840",
}

# Which inputs/outputs are held to the op's type set: (input indices, output indices); None = all.
# Unlisted ops check every input and output.
_CHECKED_IO: dict[str, tuple[tuple[int, ...] | None, tuple[int, ...] | None]] = {
    **{op: ((0,), ()) for op in ("ArgMax", "ArgMin", "IsInf", "IsNaN", "NonZero", "Shape", "Size")},
    **{op: (None, ()) for op in ("Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual")},
    **{op: ((0,), None) for op in (
        "CumSum", "Expand", "Gather", "GatherElements", "GatherND", "Reshape", "Resize",
        "ReverseSequence", "Slice", "Split", "Squeeze", "Unsqueeze", "Tile", "Trilu", "Upsample",
        "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
        "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "EyeLike")},
    **{op: ((), None) for op in (
        "BlackmanWindow", "HammingWindow", "HannWindow", "ConstantOfShape", "RandomNormalLike",
        "RandomUniformLike", "If", "Loop", "Scan")},
    **{op: ((0, 2), None) for op in ("Pad", "Scatter", "ScatterElements", "ScatterND", "STFT", "OneHot")},
    "Attention": ((0, 1, 2), (0,)),
    "Dropout": ((0,), (0,)),
    "GridSample": ((0, 1), None),
    "GRU": ((0, 1, 2, 3, 5), None),
    "RNN": ((0, 1, 2, 3, 5), None),
    "LSTM": ((0, 1, 2, 3, 5, 6, 7), None),
    "LayerNormalization": (None, (0,)),
    "MaxPool": (None, (0,)),
    "NonMaxSuppression": ((0, 1), ()),
    "RoiAlign": ((0, 1), None),
    "RotaryEmbedding": ((0, 1, 2), None),
    "TensorScatter": ((0, 1), None),
    "TopK": ((0,), (0,)),
    "Where": ((1, 2), None),
    "QuantizeLinear": ((0, 1), ()),
    "DequantizeLinear": ((0, 2), ()),
}

# Per-slot sets that differ from the op's main set: (op, "in"|"out", index) -> types.
_SLOT_TYPES: dict[tuple[str, str, int], frozenset[int]] = {
    ("QuantizeLinear", "in", 2): _QUANT,
    ("QuantizeLinear", "out", 0): _QUANT,
    ("DequantizeLinear", "in", 1): _F3,
    ("DequantizeLinear", "out", 0): _F3,
    ("Where", "in", 0): _BOOL,
}

_DEFAULT_DOMAINS = ("", "ai.onnx")


# ---- API -----------------------------------------------------------------------------------------


@dataclass
class OpIssue:
    node: str
    op_type: str
    reason: str

    def __str__(self) -> str:
        return f"node '{self.node}' (op {self.op_type}): {self.reason}"


class UnsupportedGraphError(ValueError):
    """A graph uses operators or types TensorRT's ONNX parser does not support."""

    def __init__(self, message: str, issues: list[OpIssue] | None = None):
        super().__init__(message)
        self.issues = list(issues or [])


def check_model(model: onnx.ModelProto, opset_range: tuple[int, int] = OPSET_RANGE) -> list[OpIssue]:
    """Every reason TensorRT's ONNX parser (per SOURCE) would refuse ``model``; empty if none."""
    issues: list[OpIssue] = []
    lo, hi = opset_range
    opset = None
    for imp in model.opset_import:
        if imp.domain in _DEFAULT_DOMAINS:
            opset = imp.version
    if opset is None:
        issues.append(OpIssue("<model>", "opset_import", "no default-domain (ai.onnx) opset import"))
    elif not lo <= opset <= hi:
        issues.append(OpIssue("<model>", "opset_import",
                              f"default-domain opset {opset} outside the supported range {lo}..{hi}"))

    inferred = _infer(model)
    functions = {(f.domain, f.name): f for f in model.functions}
    checker = _Checker(functions, issues)
    checker.graph(inferred.graph, scope="", outer_types={}, outer_consts={})
    return issues


def assert_supported(model: onnx.ModelProto, name: str) -> None:
    """Raise UnsupportedGraphError naming the first offending node of component ``name``."""
    issues = check_model(model)
    if issues:
        more = len(issues) - 1
        raise UnsupportedGraphError(
            f"{name}: {issues[0]} (+{more} further issue{'' if more == 1 else 's'})", issues)


# ---- implementation ------------------------------------------------------------------------------


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    except Exception:  # >2 GB protos, unknown domains, malformed graphs: check without inferred types
        return model


def _type_name(t: int) -> str:
    try:
        return TensorProto.DataType.Name(t)
    except ValueError:
        return str(t)


def _types_str(ts: frozenset[int]) -> str:
    return ", ".join(sorted(_type_name(t) for t in ts))


def _elem_type(vi: onnx.ValueInfoProto) -> int | None:
    tt = vi.type
    if tt.HasField("tensor_type") and tt.tensor_type.elem_type:
        return tt.tensor_type.elem_type
    return None


def _rank(vi: onnx.ValueInfoProto | None) -> int | None:
    if vi is None or not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return None
    return len(vi.type.tensor_type.shape.dim)


class _Checker:
    def __init__(self, functions: dict, issues: list[OpIssue]):
        self.functions = functions
        self.issues = issues
        self._in_function: set[tuple[str, str]] = set()

    def add(self, node: str, op: str, reason: str) -> None:
        self.issues.append(OpIssue(node, op, reason))

    # A graph's name -> type / name -> ValueInfo / name -> constant value (None when not a literal).
    def graph(self, g: onnx.GraphProto, scope: str, outer_types: dict, outer_consts: dict) -> None:
        types = dict(outer_types)
        infos: dict[str, onnx.ValueInfoProto] = {}
        consts = dict(outer_consts)
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            infos[vi.name] = vi
            t = _elem_type(vi)
            if t is not None:
                types[vi.name] = t
        for init in g.initializer:
            types[init.name] = init.data_type
            consts[init.name] = init
        for node in g.node:
            if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS and node.output:
                for a in node.attribute:
                    if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                        consts[node.output[0]] = a.t
                        types.setdefault(node.output[0], a.t.data_type)
        for i, node in enumerate(g.node):
            label = node.name or f"{scope}{node.op_type}_{i}"
            self.node(node, label, types, infos, consts)

    def node(self, node: onnx.NodeProto, label: str, types: dict, infos: dict, consts: dict) -> None:
        op = node.op_type
        if node.domain not in _DEFAULT_DOMAINS:
            fn = self.functions.get((node.domain, op))
            if fn is not None:
                self.function(fn, label)
                return
            self.add(label, op, f"custom domain '{node.domain}' is not supported by TensorRT's ONNX "
                                f"parser (no TensorRT plugin is assumed)")
            return
        if op not in SUPPORTED_OPS:
            fn = self.functions.get((node.domain, op))
            if fn is not None:
                self.function(fn, label)
                return
            why = "marked unsupported in the support matrix" if op in UNSUPPORTED_OPS else "not in the support matrix"
            self.add(label, op, f"not supported by TensorRT's ONNX parser ({why})")
            return
        self.types(node, label, types)
        self.restrictions(node, label, types, infos, consts)
        for a in node.attribute:
            subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for sub in subs:
                self.graph(sub, f"{label}/{a.name}/", types, consts)

    def function(self, fn: onnx.FunctionProto, label: str) -> None:
        key = (fn.domain, fn.name)
        if key in self._in_function:
            return
        self._in_function.add(key)
        try:
            consts: dict = {}
            for i, n in enumerate(fn.node):
                self.node(n, f"{label}/{n.name or f'{n.op_type}_{i}'}", {}, {}, consts)
        finally:
            self._in_function.discard(key)

    def types(self, node: onnx.NodeProto, label: str, types: dict) -> None:
        op = node.op_type
        main = SUPPORTED_OPS[op]
        ins, outs = _CHECKED_IO.get(op, (None, None))
        seen: set[str] = set()
        for kind, names, picked in (("in", node.input, ins), ("out", node.output, outs)):
            for idx, name in enumerate(names):
                if not name or name in seen or (
                        picked is not None and idx not in picked and (op, kind, idx) not in _SLOT_TYPES):
                    continue
                seen.add(name)
                t = types.get(name)
                if t is None:
                    continue
                allowed = _SLOT_TYPES.get((op, kind, idx), main)
                if t in allowed or (t == TensorProto.DOUBLE and FP32 in allowed):
                    continue
                side = "input" if kind == "in" else "output"
                self.add(label, op, f"{side} {idx} '{name}' has element type {_type_name(t)}; "
                                    f"TensorRT supports {_types_str(allowed)} here")

    def restrictions(self, node, label, types, infos, consts) -> None:
        op = node.op_type
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

        def bad(reason: str) -> None:
            self.add(label, op, reason)

        def present(seq, idx) -> bool:
            return len(seq) > idx and bool(seq[idx])

        def is_const(name: str) -> bool:
            return name in consts

        def const_value(name: str):
            t = consts.get(name)
            if t is None:
                return None
            try:
                return numpy_helper.to_array(t)
            except Exception:
                return None

        if op in ("AveragePool", "MaxPool", "LpPool"):
            if any(d != 1 for d in attrs.get("dilations", [])):
                bad("dilations other than 1 are not supported")
            if op != "LpPool" and "kernel_shape" in attrs and len(attrs["kernel_shape"]) not in (2, 3):
                bad(f"{len(attrs['kernel_shape'])}D pooling is not supported (2D or 3D only)")
            if op == "MaxPool" and present(node.output, 1):
                bad("the Indices output is not supported")
        elif op == "Constant":
            for k in ("sparse_value", "value_string", "value_strings"):
                if k in attrs:
                    bad(f"attribute '{k}' is not supported")
        elif op == "CumSum":
            if present(node.input, 1) and not is_const(node.input[1]):
                bad("'axis' must be a build-time constant")
        elif op == "Dropout":
            if present(node.input, 2):
                v = const_value(node.input[2])
                if v is None or bool(np.asarray(v).reshape(-1)[0]):
                    bad("'training_mode' must be a constant False")
        elif op in ("GRU", "RNN", "LSTM"):
            acts = attrs.get("activations")
            if attrs.get("direction", b"forward") in (b"bidirectional", "bidirectional") and acts:
                half = len(acts) // 2
                if list(acts[:half]) != list(acts[half:]):
                    bad("bidirectional activations differ between the forward and reverse pass")
            if op == "LSTM":
                if attrs.get("input_forget", 0) != 0:
                    bad("input_forget must be 0")
                if attrs.get("layout", 0) != 0:
                    bad("layout must be 0")
        elif op == "LayerNormalization":
            if present(node.output, 1) or present(node.output, 2):
                bad("only the first output (Y) is supported")
        elif op == "OneHot":
            if present(node.input, 1) and not is_const(node.input[1]):
                bad("'depth' must be a build-time constant")
        elif op in ("QuantizeLinear", "DequantizeLinear"):
            if present(node.input, 2):
                v = const_value(node.input[2])
                if v is not None and np.any(np.asarray(v, dtype=np.float64) != 0):
                    bad("zero point must be 0")
        elif op.startswith("Reduce"):
            if present(node.input, 1) and not is_const(node.input[1]):
                bad("'axes' must be an initializer")
        elif op == "Resize":
            _check_choice(bad, attrs, "coordinate_transformation_mode", "half_pixel",
                          {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"})
            _check_choice(bad, attrs, "mode", "nearest", {"nearest", "linear"})
            _check_choice(bad, attrs, "nearest_mode", "round_prefer_floor",
                          {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"})
            _check_choice(bad, attrs, "keep_aspect_ratio_policy", "stretch", {"stretch"})
            if attrs.get("antialias", 0):
                bad("antialiasing is not supported")
        elif op == "RotaryEmbedding":
            if present(node.input, 3) and types.get(node.input[3]) not in (None, INT64):
                bad(f"position_ids must be INT64, got {_type_name(types[node.input[3]])}")
        elif op == "ScatterND":
            _check_choice(bad, attrs, "reduction", "none", {"none"})
        elif op == "STFT":
            for idx, what in ((1, "frame_step"), (2, "window")):
                if present(node.input, idx) and not is_const(node.input[idx]):
                    bad(f"'{what}' must be an initializer")
        elif op == "TensorScatter":
            if attrs.get("axis", -2) != -2:
                bad("axis must be -2")
            for idx in (0, 1):
                r = _rank(infos.get(node.input[idx])) if present(node.input, idx) else None
                if r is not None and r != 4:
                    bad(f"input {idx} must be 4D, got rank {r}")
        elif op == "TopK":
            if attrs.get("sorted", 1) != 1:
                bad("sorted must be 1")
            if present(node.input, 1):
                k = const_value(node.input[1])
                if k is not None and np.asarray(k).size and int(np.asarray(k).reshape(-1)[0]) >= 3840:
                    bad("K must be less than 3840")
        elif op == "GridSample":
            r = _rank(infos.get(node.input[0])) if present(node.input, 0) else None
            if r is not None and r != 4:
                bad(f"input must be 4D, got rank {r}")
        elif op == "Attention":
            for idx, what in ((4, "past_key"), (5, "past_value"), (6, "nonpad_kv_seqlen")):
                if present(node.input, idx):
                    bad(f"input '{what}' is not supported")
            for idx, what in ((1, "present_key"), (2, "present_value"), (3, "qk_matmul_output")):
                if present(node.output, idx):
                    bad(f"output '{what}' is not supported")
            if attrs.get("qk_matmul_output_mode", 0):
                bad("attribute 'qk_matmul_output_mode' is not supported")
            if attrs.get("softcap", 0.0):
                bad("attribute 'softcap' is not supported")
            for idx in (0, 1, 2):
                r = _rank(infos.get(node.input[idx])) if present(node.input, idx) else None
                if r is not None and r != 4:
                    bad(f"input {idx} must be 4D, got rank {r}")


def _check_choice(bad, attrs: dict, key: str, default: str, allowed: set[str]) -> None:
    v = attrs.get(key, default)
    if isinstance(v, bytes):
        v = v.decode()
    if v not in allowed:
        bad(f"{key}='{v}' is not supported")
