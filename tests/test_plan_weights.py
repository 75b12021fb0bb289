"""`plan`'s weight bytes (weight_bytes.py) against what the quantizer writes (issue 23): the arithmetic by
hand, Model Optimizer's own shape rules against Model Optimizer, the exporter's node names, and tiny
bundles of every precision, on the cpu and a GPU target, within 5 % of the plan per component."""

from __future__ import annotations

import math

import pytest
import torch

from emma_export.quantize.policy import Plan
from emma_export.weight_bytes import (
    FP16,
    FP32,
    Gemm,
    PlannedTensor,
    component_bytes,
    modelopt_skips,
)


def _linear(node: str, k: int, n: int) -> PlannedTensor:
    return PlannedTensor(node.strip("/").replace("/", ".") + ".weight", k * n, node, gemm=Gemm("MatMul", k, n))


# ---- the arithmetic -------------------------------------------------------------------------------

def test_int8_and_fp8_weights_by_hand():
    up, down = _linear("/llm/layers.0/mlp/und/up_proj/", 64, 128), _linear("/llm/layers.0/mlp/und/down_proj/", 128, 64)
    norm = PlannedTensor("llm.layers.0.input_layernorm.und.weight", 64, "/llm/layers.0/input_layernorm/und/")
    cpu = Plan("backbone_und", "int8", "modelopt-int8", "fp32", exclude=(r"/down_proj/",))
    b = component_bytes([up, down, norm], cpu)
    # up: 1 B a weight + a 4 B scale and a 1 B zero point per output column; down kept fp32; the norm fp32
    assert (b.quantized, b.scales, b.high) == (64 * 128, 128 * (4 + 1), 4 * 128 * 64 + 4 * 64)
    gpu = Plan("backbone_und", "fp8", "modelopt-fp8", "fp16")
    b = component_bytes([up, down, norm], gpu)
    assert (b.quantized, b.scales, b.high) == (2 * 64 * 128, (128 + 64) * (2 + 1), 2 * 64)
    assert b.total == 2 * 64 * 128 + 192 * 3 + 128


def test_int4_weights_by_hand():
    q = _linear("/llm/layers.0/mlp/und/gate_proj/", 100, 48)  # K not a multiple of the block: ceil
    o = _linear("/llm/layers.0/self_attn/o_proj/und/", 64, 64)
    norm = PlannedTensor("llm.layers.0.post_attention_layernorm.und.weight", 64, "/llm/layers.0/post_attention_layernorm/und/")
    p = Plan("backbone_und", "int4w", "modelopt-int4", "fp16", exclude=(r"/self_attn/",), block_size=32)
    b = component_bytes([q, o, norm], p)
    assert b.quantized == math.ceil(0.5 * 100 * 48)
    assert b.scales == FP16 * math.ceil(100 / 32) * 48  # one fp16 scale per block of 32 along K, per column
    assert b.high == FP16 * 64 * 64  # the excluded projection at the high precision
    assert b.kept_fp32 == FP32 * 64  # the fp16 conversion after INT4 keeps norms fp32
    cpu = component_bytes([q, norm], Plan("backbone_und", "int4w", "modelopt-int4", "fp32", block_size=32))
    assert cpu.scales == FP32 * 4 * 48 and cpu.high == FP32 * 64 and cpu.kept_fp32 == 0


def test_half_precision_fp32_and_tables_by_hand():
    w = _linear("/gen_adapter/fused/fc1/", 64, 64)
    t = _linear("/gen_adapter/timestep/linear_1/", 32, 64)
    ln = PlannedTensor("gen_adapter.fused.ln.weight", 64, "/gen_adapter/fused/ln/", op="LayerNormalization")
    p16 = Plan("gen_adapter", "fp16", "fp16", "fp16", keep_fp32=(r"/gen_adapter/timestep/",), keep_fp32_ops=("LayerNormalization",))
    b = component_bytes([w, t, ln], p16)
    assert (b.high, b.kept_fp32) == (2 * 64 * 64, 4 * (32 * 64 + 64))
    assert component_bytes([w, t, ln], Plan("gen_adapter", "fp32", "none", "fp32")).total == 4 * (64 * 64 + 32 * 64 + 64)
    table = PlannedTensor("rope_cos_cache", 1024 * 8, "/GroupQueryAttention/")
    assert component_bytes([table], Plan("backbone_und", "int8", "modelopt-int8", "fp32")).tables == 4 * 1024 * 8
    assert component_bytes([table], p16).tables == 2 * 1024 * 8


def test_modelopt_gemm_rule():
    assert modelopt_skips(Gemm("MatMul", 15, 64), "int8") and modelopt_skips(Gemm("MatMul", 64, 8), "fp8")
    assert not modelopt_skips(Gemm("MatMul", 16, 16), "int8")


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_modelopt_conv_rule_is_model_optimizers(mode):
    """The convolutions Model Optimizer itself leaves unquantized, on a graph of every case the rule
    distinguishes, against ``modelopt_skips``: a Model Optimizer upgrade that changes it fails here."""
    pytest.importorskip("modelopt.onnx.quantization", reason="the quant extra is not installed")
    import numpy as np
    import onnx_graphsurgeon as gs
    from modelopt.onnx.quantization.graph_utils import find_nodes_from_convs_to_exclude
    from onnx import TensorProto, helper, numpy_helper

    # (in, out, kernel, groups, reads a graph input): first layer / narrow / multiple of 8 / fp8 filter and
    # channel limits / grouped; the last reads another convolution's output (8 channels of conv1)
    cases = [(3, 8, 3, 1, True), (8, 8, 3, 1, True), (8, 24, 3, 1, True), (12, 12, 3, 1, True), (16, 16, 3, 1, True),
             (16, 32, 3, 1, True), (32, 32, 3, 1, True), (32, 32, 7, 1, True), (32, 32, 5, 1, True), (16, 8, 1, 1, True),
             (32, 32, 3, 32, True), (8, 8, 3, 8, True), (17, 17, 3, 1, True), (8, 8, 3, 1, False)]
    nodes, inits, inputs = [], [], []
    for i, (cin, cout, k, g, reads_input) in enumerate(cases):
        src = f"x{i}" if reads_input else "y1"
        if reads_input:
            inputs.append(helper.make_tensor_value_info(src, TensorProto.FLOAT, [1, cin, 32, 32]))
        w = numpy_helper.from_array(np.zeros((cout, cin // g, k, k), np.float32), f"w{i}")
        inits.append(w)
        nodes.append(helper.make_node("Conv", [src, w.name], [f"y{i}"], name=f"conv{i}", kernel_shape=[k, k], group=g,
                                      pads=[k // 2] * 4))
    outs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(len(cases))]
    graph = gs.import_onnx(helper.make_model(helper.make_graph(nodes, "convs", inputs, outs, inits)))
    got = set(find_nodes_from_convs_to_exclude(graph, mode))
    mine = {f"conv{i}" for i, (cin, cout, k, g, first) in enumerate(cases)
            if modelopt_skips(Gemm("Conv", cin, cout, (k, k), g, reads_input=first), mode)}
    assert got == mine, (sorted(got), sorted(mine))
    assert got and len(got) < len(cases)


# ---- the exporter's names ------------------------------------------------------------------------------

@pytest.mark.parametrize("flavour", ["standard", "gqa"])
def test_every_planned_gemm_is_a_gemm_of_the_exported_graph(request, tiny_cfg, flavour):
    """Every weight the plan calls a GEMM weight is read by exactly one MatMul/Gemm/Conv of the exported
    graph whose name is the planned node path (the part the exporter writes), with its element count:
    the policy's patterns are matched against the same names in both."""
    import onnx

    from emma_export.size_check import tensor_bytes
    from emma_export.weight_bytes import graph_tensors

    bundle = request.getfixturevalue("tiny_bundle" if flavour == "gqa" else "tiny_bundle_standard")
    for name, tensors in graph_tensors(tiny_cfg, flavour).items():
        g = onnx.load(str(bundle / f"{name}.onnx"), load_external_data=False).graph
        init = {i.name: i for i in g.initializer}
        # the LM head reads the tied embedding through a Transpose (export/tied_embedding.py)
        init.update({n.output[0]: init[n.input[0]] for n in g.node if n.op_type == "Transpose" and n.input[0] in init})
        gemms = [(n.name.rsplit("/", 1)[0] + "/", tensor_bytes(init[n.input[1]]) // 4) for n in g.node
                 if n.op_type in ("MatMul", "Gemm", "Conv") and len(n.input) > 1 and n.input[1] in init]
        if flavour == "gqa" and name == "backbone_und":
            tables = {n.input[j] for n in g.node if n.op_type == "GroupQueryAttention" for j in (7, 8)}  # one pair, shared
            assert sum(t.numel for t in tensors if t.node == "/GroupQueryAttention/") == sum(tensor_bytes(init[i]) // 4 for i in tables)
        for t in tensors:
            if t.gemm is None:
                continue
            hits = [(path, numel) for path, numel in gemms if t.node.endswith(path)]
            assert len(hits) == 1 and hits[0][1] == t.numel, (name, t.key, t.node, hits)


# ---- plan_memory ------------------------------------------------------------------------------------

def test_plan_memory_counts_the_policy(tiny_cfg):
    from emma_export.plan import plan_memory
    from emma_export.targets import load_target

    V, H = tiny_cfg.llm.vocab_size, tiny_cfg.llm.hidden_size
    cpu, gpu = load_target("cpu"), load_target("rtx-ada")
    p = plan_memory(tiny_cfg, "int8", cpu)
    assert p.weights["embed_tokens"] == 4 * V * H  # the cpu target's high precision is fp32
    assert p.weights_detail["lm_head"]["quantized"] == V * H  # the LM head is quantized at int8
    assert p.stored_once == 0
    g = plan_memory(tiny_cfg, "int8", gpu)
    assert g.weights["embed_tokens"] == 2 * V * H and g.weights_detail["backbone_und"]["tables"] == 0
    assert p.weights_detail["backbone_und"]["tables"] > 0  # the cpu's gqa backbone holds RoPE tables
    # int4w: the LM head stays high, so the tied table is stored once, at the target's high precision
    assert plan_memory(tiny_cfg, "int4w", cpu).stored_once == 4 * V * H
    assert plan_memory(tiny_cfg, "int4w", gpu).stored_once == 2 * V * H
    for q in ("int8", "fp8", "int4w"):
        pq = plan_memory(tiny_cfg, q, cpu)
        assert pq.weights["gen_head"] == plan_memory(tiny_cfg, "fp32", cpu).weights["gen_head"]  # fp32 always
        assert sum(d["total"] for d in pq.weights_detail.values()) == pq.weights_total


def test_plan_cli_prints_weight_bytes_per_graph():
    import json

    from click.testing import CliRunner

    from emma_export.cli import main

    r = CliRunner().invoke(main, ["plan", "--config", "tiny", "--precision", "int4w", "--target", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["weights_detail"]["backbone_und"]["quantized"] > 0 and d["weights_detail"]["lm_head"]["quantized"] == 0
    r = CliRunner().invoke(main, ["plan", "--config", "small", "--precision", "int8", "--target", "cpu"])
    assert r.exit_code == 0, r.output
    assert "weights MB" in r.output and "quantized" in r.output and "45.310" in r.output  # small's backbone_und


# ---- bundles against the plan ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def calibration_dir(tmp_path_factory, tiny_reference, tokenizer):
    pytest.importorskip("modelopt.onnx.quantization", reason="the quant extra is not installed")
    from emma_export.quantize.calibrate import capture, save

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        feeds = capture(tiny_reference, tokenizer, "quick")
    finally:
        torch.set_num_threads(before)
    d = tmp_path_factory.mktemp("calibration")
    save(feeds, d)
    return d


@pytest.mark.parametrize("precision,target", [("fp16", "cpu"), ("int8", "cpu"), ("fp8", "cpu"), ("int4w", "cpu"),
                                              ("int8", "rtx-ada"), ("int4w", "rtx-ada")])
def test_bundle_matches_plan(request, tmp_path, calibration_dir, precision, target):
    """Every component of the built bundle within 5 % of the plan (above the floor), the report
    carrying both; a bundle that kept float weights beside its quantized ones fails here."""
    from emma_export.build import build
    from emma_export.size_check import FLOOR_BYTES

    src = request.getfixturevalue("tiny_bundle" if target == "cpu" else "tiny_bundle_standard")
    rep = build(source_bundle=src, precision=precision, target=target, out=tmp_path / "B", calibration=calibration_dir,
                verify=False, e2e=False, engines=False, task_eval_n=0, echo=lambda s: None)
    judged = [r for r in rep.rows if r.plan_bytes >= FLOOR_BYTES]
    assert len(judged) >= 5, [(r.component, r.plan_bytes) for r in rep.rows]
    off = [(r.component, r.weight_bytes, r.plan_bytes) for r in judged if abs(r.weight_bytes / r.plan_bytes - 1) > 0.05]
    assert not off, off
    assert not any(r.size_off for r in rep.rows)
    assert all(r.bytes >= r.weight_bytes > 0 for r in rep.rows)
    assert rep.plan_bundle_weights > 0 and rep.to_dict()["rows"][0]["plan_bytes"] > 0
    # no dead initializers (a float weight left beside its quantized copy is one)
    import onnx

    for r in rep.rows:
        g = onnx.load(str(tmp_path / "B" / f"{r.component}.onnx"), load_external_data=False).graph
        read = {i for n in g.node for i in n.input}
        assert not [i.name for i in g.initializer if i.name not in read], r.component
