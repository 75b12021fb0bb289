"""Model Optimizer on two layers of each structure, the rest replayed (issue 23: an hour per emma-4b
backbone at fp8 otherwise). The replay must give the bytes Model Optimizer gives, refuse what its
rules do not cover (AWQ's clip search), and its checks must catch a replay that is wrong."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from emma_export.components import get_component
from emma_export.export.onnx_export import export_component
from emma_export.export.source import WeightSource

pytest.importorskip("modelopt.onnx.quantization")


@pytest.fixture(scope="module")
def backbone(tmp_path_factory, tiny_cfg):
    """tiny's Und backbone (standard attention) with 6 layers: layer 0 is shaped apart (it makes the
    mask the others read), 1 is the template, 2 confirms it, 3-5 are replayed."""
    cfg = dataclasses.replace(tiny_cfg, llm=dataclasses.replace(tiny_cfg.llm, shared_layers=3, decoupled_layers=3))
    comp = get_component(cfg, "backbone_und", "standard")
    path = tmp_path_factory.mktemp("replay") / "backbone_und.onnx"
    export_component(comp, cfg, WeightSource(cfg, 0), path)
    dims = comp.verify_dims(cfg)
    feeds = [comp.sample_inputs(cfg, dims[i % len(dims)], np.random.default_rng(i)) for i in range(4)]
    return cfg, path, feeds


def _quantize(backbone, tmp_path, precision, method="", replay=True, label="q"):
    from emma_export.quantize.policy import plan
    from emma_export.quantize.sliced import apply_plan_sliced

    cfg, src, feeds = backbone
    p = plan("backbone_und", precision, True, cfg)
    if method:
        p = dataclasses.replace(p, calibration_method=method)
    dst = tmp_path / label / "g.onnx"
    dst.parent.mkdir()
    return dst, apply_plan_sliced(p, src, dst, feeds, len(feeds), replay=replay)


def _same_graph(a, b) -> list[str]:
    """What differs between two graph files: nodes (in any order) and initializer values."""
    ma, mb = onnx.load(str(a)), onnx.load(str(b))
    key = lambda m: sorted((n.name, n.op_type, tuple(n.input), tuple(n.output)) for n in m.graph.node)
    out = [] if key(ma) == key(mb) else ["nodes"]
    # values, not storage: Model Optimizer writes INT8 zero points in int32_data, the replay in raw_data
    val = lambda t: (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes())
    ib = {t.name: val(t) for t in mb.graph.initializer}
    out += [t.name for t in ma.graph.initializer if ib.get(t.name) != val(t)]
    if len(ma.graph.initializer) != len(mb.graph.initializer):
        out.append("initializer count")
    return out


@pytest.mark.parametrize("precision,method", [("fp8", ""), ("int4w", "rtn_dq")])
def test_replay_gives_model_optimizers_bytes(backbone, tmp_path, precision, method):
    replayed, d = _quantize(backbone, tmp_path, precision, method, label="replay")
    assert d["replayed_slices"] == 3 and d["modelopt_layer_slices"] == 3 and "replay_off" not in d, d
    every, _ = _quantize(backbone, tmp_path, precision, method, replay=False, label="modelopt")
    assert _same_graph(replayed, every) == []


def test_awq_clip_is_not_replayed(backbone, tmp_path):
    """AWQ's clip search picks each block's scale: no amax rule gives it back, so every layer goes
    through Model Optimizer and the reason is recorded."""
    _, d = _quantize(backbone, tmp_path, "int4w", "awq_clip")
    assert d["replayed_slices"] == 0 and d["modelopt_layer_slices"] == 6
    assert "INT4 scales follow no amax rule" in d["replay_off"]


def test_a_wrong_replay_is_caught_and_not_used(backbone, tmp_path, monkeypatch):
    """A replay that is wrong in one weight (the layer's own tensor read off by one value) fails the
    check against Model Optimizer's result for the second layer: nothing is replayed, and the graph is
    Model Optimizer's throughout."""
    from emma_export.quantize import replay as rp

    real = rp.make_values

    def off_by_one(tpl, weights, amax, names):
        if names is not None and names.k != tpl.layer:  # a replay onto another layer
            name = next(n for n, r in tpl.rules.items() if r.kind == "copy")
            src = names.tensor(tpl.rules[name].src)
            weights = dict(weights)
            weights[src] = weights[src].copy()
            weights[src].flat[0] += 1.0
        return real(tpl, weights, amax, names)

    monkeypatch.setattr(rp, "make_values", off_by_one)
    got, d = _quantize(backbone, tmp_path, "fp8", label="bad")
    assert d["replayed_slices"] == 0 and "replayed from layers.1" in d["replay_off"], d
    monkeypatch.setattr(rp, "make_values", real)
    every, _ = _quantize(backbone, tmp_path, "fp8", replay=False, label="modelopt")
    assert _same_graph(got, every) == []


def test_a_wrong_scale_rule_is_refused_on_the_template(backbone, tmp_path, monkeypatch):
    """Scales 1% off the rule Model Optimizer used: the template's own values do not come back."""
    from emma_export.quantize import replay as rp

    def bend(f):
        return lambda a, dt: f(a * np.float32(1.01), dt)

    bent = {qt: {k: bend(f) for k, f in rules.items()} for qt, rules in rp._DIVISORS.items()}
    monkeypatch.setattr(rp, "_DIVISORS", bent)
    _, d = _quantize(backbone, tmp_path, "fp8")
    assert d["replayed_slices"] == 0 and "scales follow no amax rule" in d["replay_off"], d


def test_layers_of_one_structure_share_a_canonical_form(backbone):
    from emma_export.layer_slices import SlicedGraph
    from emma_export.quantize.replay import canonical

    sg = SlicedGraph(backbone[1])
    sigs = {s.name: canonical(sg.model(s, with_weights=False))[0] for s in sg.slices if s.name.startswith("layers.")}
    assert len({sigs[f"layers.{i}"] for i in range(1, 6)}) == 1
    assert sigs["layers.0"] != sigs["layers.1"]


def _edited_backbone(tmp_path, tiny_cfg, edit):
    """The fixture's backbone with ``edit(model)`` applied to its graph, exported afresh."""
    cfg = dataclasses.replace(tiny_cfg, llm=dataclasses.replace(tiny_cfg.llm, shared_layers=3, decoupled_layers=3))
    comp = get_component(cfg, "backbone_und", "standard")
    path = tmp_path / "src" / "backbone_und.onnx"
    path.parent.mkdir()
    export_component(comp, cfg, WeightSource(cfg, 0), path)
    m = onnx.load(str(path))
    edit(m)
    onnx.save(m, str(path))
    dims = comp.verify_dims(cfg)
    return cfg, path, [comp.sample_inputs(cfg, dims[i % len(dims)], np.random.default_rng(i)) for i in range(4)]


def _zero(m, needle):
    t = next(t for t in m.graph.initializer if needle in t.name)
    t.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(t)), t.name))
    return t.name

@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_a_replayed_layer_with_a_zero_weight_has_no_nan(tmp_path, tiny_cfg, precision):
    """A weight that is all zeros in a replayed layer (layers 3-5; 1 and 2 are Model Optimizer's): its
    amax is 0, the replay's scale amax/k is 0, and 0/0 quantizes to NaN (FP8 has a NaN). Model
    Optimizer's own result for that layer has a finite, positive scale."""
    names = []
    zeroed = _edited_backbone(tmp_path, tiny_cfg, lambda m: names.append(_zero(m, "layers.4/self_attn/o_proj")) if any(
        "layers.4/self_attn/o_proj" in t.name for t in m.graph.initializer) else names.append(_zero(m, "layers.4.self_attn.o_proj")))
    replayed, d = _quantize(zeroed, tmp_path, precision, label="replay")
    assert d["replayed_slices"] == 3 and "replay_off" not in d, d
    every, _ = _quantize(zeroed, tmp_path, precision, replay=False, label="modelopt")
    bad = []
    for path in (replayed, every):
        m = onnx.load(str(path))
        for t in m.graph.initializer:
            a = numpy_helper.to_array(t, base_dir=str(path.parent))
            if a.dtype.kind == "f" or "float8" in str(a.dtype):
                a = a.astype(np.float32)
                if not np.all(np.isfinite(a)) or (t.name.endswith("scale") and np.any(a == 0)):
                    bad.append((path.parent.name, t.name))
    assert bad == [], (names, bad)
    assert _same_graph(replayed, every) == []  # Model Optimizer's bytes, the zero layer included


def test_a_replay_with_a_few_wrong_fp8_weights_is_caught(backbone, tmp_path, monkeypatch):
    """The confirmation compares each FP8 weight with Model Optimizer's allowing 0.1% of values to
    differ (a rounding tie may go either way when the scale is one fp16 ulp off) but did not bound by
    how much: three values of a 64x64 weight negated on every replayed layer passed, and were used on
    layers 3-5. A differing value must be the neighbouring FP8 value, no further."""
    from emma_export.quantize import replay as rp

    real = rp.make_values

    def flip(tpl, weights, amax, names):
        out = real(tpl, weights, amax, names)
        if names is not None and names.k != tpl.layer:  # a replay onto another layer
            name = next(n for n, r in sorted(tpl.rules.items()) if r.kind == "weight")
            t = out[name]
            a = numpy_helper.to_array(t).astype(np.float32)
            a.flat[[1, 2, 3]] = -a.flat[[1, 2, 3]] - 1.0  # 3 of 4096 values: 0.07%
            out[name] = rp._tensor(name, a, t.data_type)
        return out

    monkeypatch.setattr(rp, "make_values", flip)
    _, d = _quantize(backbone, tmp_path, "fp8", label="bad")
    assert d["replayed_slices"] == 0 and "replayed from layers.1" in d.get("replay_off", ""), d


def test_a_nan_scale_is_not_within_tolerance():
    """``_close`` compared |a - b| > rtol |b|, which is False for a NaN: a NaN scale (an activation amax
    taken over NaN values) passed as Model Optimizer's."""
    from onnx import TensorProto

    from emma_export.quantize import replay as rp

    want = rp._tensor("s", np.array([0.5, 0.25], np.float16), TensorProto.FLOAT16)
    for kind in ("weight_scale", "act_scale"):
        assert rp._close(kind, rp._tensor("s", np.array([0.5, 0.25], np.float16), TensorProto.FLOAT16), want) is None
        assert rp._close(kind, rp._tensor("s", np.array([np.nan, 0.25], np.float16), TensorProto.FLOAT16), want) is not None


def test_an_activation_with_a_nan_has_an_infinite_amax():
    """The replay's activation amax was a running ``max`` that a NaN fell out of (``max(0.0, nan)``);
    inf instead, so its scale fails the build's finite-scale check."""
    from emma_export.quantize.replay import amax_of

    a = np.ones((2, 3), np.float32)
    b = a.copy()
    b[0, 0] = np.nan
    assert amax_of([{"x": a}], ["x"]) == {"x": 1.0}
    assert amax_of([{"x": b}, {"x": a}], ["x"]) == {"x": np.inf}
