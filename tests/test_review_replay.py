"""Review of quantize/replay.py: cases the replay's two checks (template, confirmation) never see."""

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


def _backbone(tmp_path, tiny_cfg, edit):
    cfg = dataclasses.replace(tiny_cfg, llm=dataclasses.replace(tiny_cfg.llm, shared_layers=3, decoupled_layers=3))
    comp = get_component(cfg, "backbone_und", "standard")
    path = tmp_path / "src" / "backbone_und.onnx"
    path.parent.mkdir()
    export_component(comp, cfg, WeightSource(cfg, 0), path)
    m = onnx.load(str(path))
    edit(m)
    onnx.save(m, str(path))
    dims = comp.verify_dims(cfg)
    feeds = [comp.sample_inputs(cfg, dims[i % len(dims)], np.random.default_rng(i)) for i in range(4)]
    return cfg, path, feeds


def _quantize(cfg, src, feeds, tmp_path, precision, replay, label):
    from emma_export.quantize.policy import plan
    from emma_export.quantize.sliced import apply_plan_sliced

    p = plan("backbone_und", precision, True, cfg)
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
    cfg, src, feeds = _backbone(tmp_path, tiny_cfg, lambda m: names.append(_zero(m, "layers.4/self_attn/o_proj")) if any(
        "layers.4/self_attn/o_proj" in t.name for t in m.graph.initializer) else names.append(_zero(m, "layers.4.self_attn.o_proj")))
    replayed, d = _quantize(cfg, src, feeds, tmp_path, precision, True, "replay")
    assert d["replayed_slices"] == 3 and "replay_off" not in d, d
    every, _ = _quantize(cfg, src, feeds, tmp_path, precision, False, "modelopt")
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


def test_a_replay_with_a_few_wrong_fp8_weights_is_caught(tmp_path, tiny_cfg, monkeypatch):
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

    cfg, src, feeds = _backbone(tmp_path, tiny_cfg, lambda m: None)
    monkeypatch.setattr(rp, "make_values", flip)
    _, d = _quantize(cfg, src, feeds, tmp_path, "fp8", True, "bad")
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
