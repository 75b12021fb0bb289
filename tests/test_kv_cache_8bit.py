"""The 8-bit KV cache (``build --kv-cache int8|fp8``) on the tiny model: the rewritten backbones against
the PyTorch reference, the runtime's cache in the graphs' dtype, the manifest's checks, a wrong scale
caught by verify, and the memory plan."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from emma_runtime import names
from emma_runtime.bundle import MANIFEST, Bundle, BundleError, sha256_file


@pytest.fixture(scope="module")
def feeds(tiny_reference, tokenizer):
    """The quick calibration capture (its cached keys give the scales) and held-out real feeds."""
    import torch

    from emma_export.quantize.calibrate import capture, select

    torch.set_num_threads(1)
    calib = capture(tiny_reference, tokenizer, "quick")
    held = {k: select(v, 8) for k, v in capture(tiny_reference, tokenizer, "verify").items() if k in names.BACKBONES}
    return calib, held


def _with_cache(src, dst, kind, calib):
    from emma_export.quantize.kv_cache import apply_to_bundle

    shutil.copytree(src, dst)
    apply_to_bundle(dst, kind, calib)
    return dst


@pytest.fixture(scope="module")
def int8_gqa(tiny_bundle, feeds, tmp_path_factory):
    return _with_cache(tiny_bundle, tmp_path_factory.mktemp("kv") / "int8-gqa", "int8", feeds[0])


@pytest.fixture(scope="module")
def fp8_standard(tiny_bundle_standard, feeds, tmp_path_factory):
    return _with_cache(tiny_bundle_standard, tmp_path_factory.mktemp("kv") / "fp8-standard", "fp8", feeds[0])


def _backbones(bundle_dir, model, held):
    from emma_export.verify import verify_components

    return verify_components(Bundle.load(bundle_dir), model, names=list(names.BACKBONES), real_feeds=held)


def test_fp8_bytes_dequantize_as_ml_dtypes():
    import ml_dtypes

    from emma_runtime.kv_cache import FLOAT8, dequantize

    b = np.arange(256, dtype=np.uint8)
    want = b.view(ml_dtypes.float8_e4m3fn).astype(np.float32) * np.float32(0.5)
    got = dequantize(b, 0.5, FLOAT8)
    assert np.array_equal(np.isnan(got), np.isnan(want)) and np.array_equal(got[~np.isnan(got)], want[~np.isnan(want)])


@pytest.mark.parametrize("which", ["int8_gqa", "fp8_standard"])
def test_8bit_backbones_match_the_reference(which, request, feeds, tiny_reference):
    d = request.getfixturevalue(which)
    m = Bundle.load(d).manifest
    dtype = {"int8_gqa": "int8", "fp8_standard": "float8e4m3fn"}[which]
    assert m.kv_cache.dtype == dtype and len(m.kv_cache.key_scales) == m.model.num_layers
    for name in names.BACKBONES:
        io = {t.name: t.dtype for t in m.components[name].inputs + m.components[name].outputs}
        assert io["past_key_0"] == dtype and io["past_value_1"] == dtype
    assert m.components[names.BACKBONE_UND].attention == ("gqa" if which == "int8_gqa" else "standard")
    res = _backbones(d, tiny_reference, feeds[1])
    for name, r in res.items():
        assert r.passed and r.feeds == "real", (name, r.rel_l2, r.tolerance)
        assert r.rel_l2 > 1e-4, f"{name}: an 8-bit cache that measures like fp32 was not quantized ({r.rel_l2})"


def test_runtime_keeps_the_cache_in_8_bits(int8_gqa, fp8_standard, tiny_bundle):
    from emma_runtime.backends import make_backend
    from emma_runtime.images import psnr
    from emma_runtime.kv_cache import KVCache
    from emma_runtime.pipelines import Pipeline

    ref = Pipeline(Bundle.load(tiny_bundle), make_backend("ort", "cpu"))
    img = np.random.default_rng(0).uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)
    want = ref.understand(img, "what is this?", max_new_tokens=4).token_ids
    want_img = ref.generate("a red circle", 64, 64, steps=4, seed=0).image
    for d, storage in ((int8_gqa, np.int8), (fp8_standard, np.uint8)):
        p = Pipeline(Bundle.load(d), make_backend("ort", "cpu"))
        assert p.kv_dtype == np.dtype(storage)
        cache = KVCache.allocate(p.backend, p.dims, 1, 8, p.kv_dtype)
        assert cache.keys[0].dtype == np.dtype(storage) and cache.keys[0].nbytes == ref.dims.num_kv_heads * 8 * ref.dims.head_dim
        assert p.understand(img, "what is this?", max_new_tokens=4).token_ids == want
        got = p.generate("a red circle", 64, 64, steps=4, seed=0).image
        assert psnr((got + 1) / 2, (want_img + 1) / 2, peak=1.0) > 40


def _set_key_scales(bundle_dir, factor: float, manifest_too: bool) -> None:
    """Multiplies every layer's key scale in both backbone graphs (and in the manifest)."""
    import onnx
    from onnx import numpy_helper

    m = Bundle.load(bundle_dir, check_files=False).manifest
    comps = dict(m.components)
    for name in names.BACKBONES:
        info = comps[name]
        g = onnx.load(str(bundle_dir / info.file))
        for t in g.graph.initializer:
            if t.name.startswith("past_key_") and t.name.endswith("/kv_scale"):
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(factor), t.name))
        onnx.save(g, str(bundle_dir / info.file))
        comps[name] = replace(info, sha256=sha256_file(bundle_dir / info.file))
    kv = m.kv_cache
    if manifest_too:
        kv = replace(kv, key_scales=tuple(s * factor for s in kv.key_scales))
    (bundle_dir / MANIFEST).write_text(replace(m, components=comps, kv_cache=kv).to_json())


@pytest.mark.parametrize("manifest_too", [True, False])
def test_a_wrong_scale_fails_verify(manifest_too, int8_gqa, feeds, tiny_reference, tmp_path):
    """Scales 1/50 of the calibrated ones clip every cached key: parity fails. Changed in the graphs
    only, the graphs and the manifest disagree, and verify says so as well."""
    from emma_export.verify import kv_scale_mismatches

    d = tmp_path / "wrong"
    shutil.copytree(int8_gqa, d)
    _set_key_scales(d, 0.02, manifest_too)
    res = _backbones(d, tiny_reference, feeds[1])
    assert not res[names.BACKBONE_UND].passed and not res[names.BACKBONE_GEN].passed
    mism = kv_scale_mismatches(Bundle.load(d))
    assert (mism == []) if manifest_too else (len(mism) == 2 * Bundle.load(d).manifest.model.num_layers)


def test_the_manifest_is_checked(int8_gqa, tmp_path):
    d = tmp_path / "b"
    shutil.copytree(int8_gqa, d)
    raw = json.loads((d / MANIFEST).read_text())

    def load_with(kv):
        doc = dict(raw)
        if kv is None:
            doc.pop("kv_cache")
        else:
            doc["kv_cache"] = kv
        (d / MANIFEST).write_text(json.dumps(doc))
        with pytest.raises(BundleError) as e:
            Bundle.load(d, check_files=False)
        return str(e.value)

    kv = raw["kv_cache"]
    assert "kv_cache.dtype" in load_with({**kv, "dtype": "int4"})
    assert "one scale per layer" in load_with({**kv, "key_scales": kv["key_scales"][:-1]})
    assert "finite numbers > 0" in load_with({**kv, "value_scales": [0.0] * len(kv["value_scales"])})
    assert "no kv_cache entry" in load_with(None)
    assert "the manifest's kv_cache is float8e4m3fn" in load_with({**kv, "dtype": "float8e4m3fn"})


def test_build_picks_the_standard_graph_for_fp8(tiny_cfg, tmp_path):
    from emma_export.build import BuildError, build
    from emma_export.export.bundle_writer import default_attention

    assert default_attention(tiny_cfg, "cpu") == "gqa" and default_attention(tiny_cfg, "cpu", kv_cache="fp8") == "standard"
    with pytest.raises(BuildError, match="GroupQueryAttention has no FP8 cache"):
        build(echo=None, out=tmp_path / "b", precision="fp32", target="cpu", config_name="tiny", attention="gqa", kv_cache="fp8")
    assert not (tmp_path / "b").exists()


def test_plan_fits_the_16_gb_orin_with_an_8_bit_cache():
    from click.testing import CliRunner

    from emma_export.cli import main
    from emma_export.config import get_config
    from emma_export.plan import plan_memory
    from emma_export.targets import TargetError, load_target

    cfg, orin = get_config("emma-4b"), load_target("jetson-orin")
    auto = plan_memory(cfg, "int4w", orin, context=8192)
    int8 = plan_memory(cfg, "int4w", orin, context=8192, kv_cache="int8")
    fit16 = lambda p: next(v for v in p.variants if v.memory_gb == 16)
    assert auto.kv_cache_dtype == "fp16" and not fit16(auto).fits and "--kv-cache int8" in fit16(auto).advice
    assert int8.kv_cache_dtype == "int8" and int8.kv_cache * 2 == auto.kv_cache and fit16(int8).fits
    assert int8.total == int8.weights_total + max(int8.phases.values())
    with pytest.raises(TargetError, match="--kv-cache fp8 needs compute capability 8.9"):
        plan_memory(cfg, "int4w", orin, context=8192, kv_cache="fp8")
    r = CliRunner().invoke(main, ["plan", "--config", "emma-4b", "--precision", "int4w", "--target", "jetson-orin",
                                  "--context", "8192", "--kv-cache", "int8"])
    assert r.exit_code == 0, r.output
    assert "KV cache int8 (1 B/value" in r.output and "16 GB (14 usable): fits" in r.output


def test_an_fp16_cache_is_cast_in_the_standard_graph(tiny_bundle_standard, tiny_bundle, feeds, tiny_reference, tmp_path):
    from emma_export.quantize.kv_cache import apply_to_bundle
    from emma_runtime.backends import make_backend
    from emma_runtime.pipelines import Pipeline

    d = _with_cache(tiny_bundle_standard, tmp_path / "fp16", "fp16", None)
    m = Bundle.load(d).manifest
    assert m.kv_cache.dtype == "float16" and m.kv_cache.key_scales == ()
    assert m.components[names.BACKBONE_GEN].tensor("new_value_1").dtype == "float16"
    assert Pipeline(Bundle.load(d), make_backend("ort", "cpu")).kv_dtype == np.float16
    res = _backbones(d, tiny_reference, feeds[1])
    assert all(r.passed and 0 < r.rel_l2 < 1e-2 for r in res.values()), {k: r.rel_l2 for k, r in res.items()}
    g = tmp_path / "gqa"
    shutil.copytree(tiny_bundle, g)
    with pytest.raises(ValueError, match="GroupQueryAttention takes an int8 KV cache on the CPU, not fp16"):
        apply_to_bundle(g, "fp16", None)
