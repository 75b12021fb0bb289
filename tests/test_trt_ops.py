"""Static TensorRT ONNX-parser support check (emma_export.export.trt_ops)."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from emma_export.export.trt_ops import (
    OPSET_RANGE,
    SUPPORTED_OPS,
    OpIssue,
    UnsupportedGraphError,
    assert_supported,
    check_model,
)


def _model(nodes, inputs, outputs, initializers=(), opset=19, extra_opsets=(), functions=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", opset), *extra_opsets]
    return helper.make_model(graph, opset_imports=opsets, functions=list(functions))


def _vi(name, elem=TensorProto.FLOAT, shape=(2, 4)):
    return helper.make_tensor_value_info(name, elem, list(shape))


def _supported_graph():
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="/mm"),
        helper.make_node("Relu", ["h"], ["r"], name="/relu"),
        helper.make_node("Softmax", ["r"], ["y"], name="/softmax", axis=-1),
    ]
    return _model(nodes, [_vi("x")], [_vi("y")], [w])


def test_issue_str():
    issue = OpIssue("/llm/layers.0/Foo", "Bar", "not supported by TensorRT's ONNX parser")
    assert str(issue) == "node '/llm/layers.0/Foo' (op Bar): not supported by TensorRT's ONNX parser"


def test_table_shape():
    assert OPSET_RANGE == (9, 24)
    assert "LayerNormalization" in SUPPORTED_OPS and "Bernoulli" not in SUPPORTED_OPS
    assert {TensorProto.INT8, TensorProto.FLOAT8E4M3FN, TensorProto.INT4} <= SUPPORTED_OPS["DequantizeLinear"]


def test_supported_graph_passes():
    m = _supported_graph()
    onnx.checker.check_model(m)
    assert check_model(m) == []
    assert_supported(m, "tiny")


@pytest.mark.parametrize("op, attrs", [("StringNormalizer", {}), ("Bernoulli", {})])
def test_unsupported_op_rejected(op, attrs):
    elem = TensorProto.STRING if op == "StringNormalizer" else TensorProto.FLOAT
    nodes = [helper.make_node(op, ["x"], ["y"], name="/llm/layers.0/Bad", **attrs)]
    m = _model(nodes, [_vi("x", elem)], [_vi("y", elem)])
    issues = check_model(m)
    assert issues and issues[0].node == "/llm/layers.0/Bad" and issues[0].op_type == op
    assert "not supported by TensorRT's ONNX parser" in issues[0].reason
    with pytest.raises(UnsupportedGraphError, match=r"^llm: node '/llm/layers.0/Bad' \(op " + op):
        assert_supported(m, "llm")


def test_custom_domain_rejected():
    nodes = [
        helper.make_node("Relu", ["x"], ["h"], name="/relu"),
        helper.make_node("FusedThing", ["h"], ["y"], name="/custom", domain="com.example"),
    ]
    m = _model(nodes, [_vi("x")], [_vi("y")], extra_opsets=[helper.make_opsetid("com.example", 1)])
    issues = check_model(m)
    assert [(i.node, i.op_type) for i in issues] == [("/custom", "FusedThing")]
    assert "com.example" in issues[0].reason


def test_trt_domain_not_assumed():
    nodes = [helper.make_node("TRT_FP4DynamicQuantize", ["x"], ["y"], name="/q", domain="trt")]
    m = _model(nodes, [_vi("x")], [_vi("y")], extra_opsets=[helper.make_opsetid("trt", 1)])
    assert [i.node for i in check_model(m)] == ["/q"]


def test_local_function_body_is_checked():
    ok = helper.make_function("local", "Act", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])],
                              [helper.make_opsetid("", 19)])
    bad = helper.make_function("local", "Noise", ["a"], ["b"], [helper.make_node("Bernoulli", ["a"], ["b"])],
                               [helper.make_opsetid("", 19)])
    extra = [helper.make_opsetid("local", 1)]
    m_ok = _model([helper.make_node("Act", ["x"], ["y"], name="/f", domain="local")],
                  [_vi("x")], [_vi("y")], extra_opsets=extra, functions=[ok])
    assert check_model(m_ok) == []
    m_bad = _model([helper.make_node("Noise", ["x"], ["y"], name="/f", domain="local")],
                   [_vi("x")], [_vi("y")], extra_opsets=extra, functions=[bad])
    assert [(i.node, i.op_type) for i in check_model(m_bad)] == [("/f/Bernoulli_0", "Bernoulli")]


def test_subgraph_nodes_are_walked():
    then_g = helper.make_graph([helper.make_node("Bernoulli", ["x"], ["t"], name="/then/bern")], "then", [], [_vi("t")])
    else_g = helper.make_graph([helper.make_node("Relu", ["x"], ["e"], name="/else/relu")], "else", [], [_vi("e")])
    nodes = [helper.make_node("If", ["c"], ["y"], name="/if", then_branch=then_g, else_branch=else_g)]
    m = _model(nodes, [_vi("c", TensorProto.BOOL, ()), _vi("x")], [_vi("y")])
    assert [(i.node, i.op_type) for i in check_model(m)] == [("/then/bern", "Bernoulli")]


def test_element_types():
    # MatMul has no integer support; Add lists INT64; Gather indices are not held to the data set.
    nodes = [
        helper.make_node("MatMul", ["a", "b"], ["c"], name="/mm_int"),
        helper.make_node("Add", ["a", "a"], ["d"], name="/add_int"),
        helper.make_node("Gather", ["f", "a"], ["g"], name="/gather"),
    ]
    ints = [_vi("a", TensorProto.INT64, (4, 4)), _vi("b", TensorProto.INT64, (4, 4)), _vi("f", TensorProto.FLOAT, (4, 4))]
    m = _model(nodes, ints, [_vi("c", TensorProto.INT64, (4, 4)), _vi("d", TensorProto.INT64, (4, 4)),
                             _vi("g", TensorProto.FLOAT, (4, 4, 4))])
    issues = check_model(m)
    assert {i.node for i in issues} == {"/mm_int"}
    assert "INT64" in issues[0].reason


def test_double_follows_float_and_uint8_quantization_flagged():
    dbl = _model([helper.make_node("Relu", ["x"], ["y"], name="/relu")],
                 [_vi("x", TensorProto.DOUBLE)], [_vi("y", TensorProto.DOUBLE)])
    assert check_model(dbl) == []
    dbl_not = _model([helper.make_node("And", ["x", "x"], ["y"], name="/and")],
                     [_vi("x", TensorProto.DOUBLE)], [_vi("y", TensorProto.BOOL)])
    assert [i.node for i in check_model(dbl_not)] == ["/and"]

    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    for elem, expect in ((TensorProto.INT8, []), (TensorProto.FLOAT8E4M3FN, []), (TensorProto.INT4, []),
                         (TensorProto.UINT8, ["/q"])):
        zp = helper.make_tensor("zp", elem, [], [0])
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="/q"),
                 helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="/dq")]
        m = _model(nodes, [_vi("x")], [_vi("y")], [scale, zp], opset=21)
        flagged = sorted({i.node for i in check_model(m)})
        assert flagged == (["/dq", "/q"] if expect else []), (elem, check_model(m))


def test_nonzero_zero_point_and_opset_range():
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zp = helper.make_tensor("zp", TensorProto.INT8, [], [3])
    m = _model([helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["y"], name="/q")],
               [_vi("x")], [_vi("y", TensorProto.INT8)], [scale, zp])
    assert any("zero point" in i.reason for i in check_model(m))

    old = _supported_graph()
    old.opset_import[0].version = 8
    issues = check_model(old)
    assert issues[0].node == "<model>" and "8" in issues[0].reason
    assert check_model(old, opset_range=(7, 24)) == []


def test_assert_supported_counts_further_issues():
    nodes = [helper.make_node("Bernoulli", ["x"], ["h"], name="/b1"),
             helper.make_node("Bernoulli", ["h"], ["y"], name="/b2")]
    m = _model(nodes, [_vi("x")], [_vi("y")])
    with pytest.raises(UnsupportedGraphError) as ei:
        assert_supported(m, "decoder")
    msg = str(ei.value)
    assert msg.startswith("decoder: node '/b1' (op Bernoulli)") and "+1 further issue" in msg
    assert isinstance(ei.value, ValueError) and len(ei.value.issues) == 2


class _TinyMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(16)
        self.up = torch.nn.Linear(16, 32)
        self.down = torch.nn.Linear(32, 16)
        self.proj = torch.nn.Parameter(torch.randn(16, 8))

    def forward(self, x):
        h = self.down(torch.nn.functional.gelu(self.up(self.norm(x))))
        return torch.softmax(torch.matmul(h, self.proj), dim=-1)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torch_export_passes():
    torch.manual_seed(0)
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(_TinyMLP().eval(), (torch.randn(2, 5, 16),), buf, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "b", 1: "t"}},
                          opset_version=19, dynamo=False)
    m = onnx.load_from_string(buf.getvalue())
    ops = {n.op_type for n in m.graph.node}
    assert {"LayerNormalization", "MatMul", "Softmax"} <= ops, ops
    assert check_model(m) == []
    assert_supported(m, "tiny_mlp")
