"""Targets, TensorRT-RTX engines for the tiny bundle, the memory plan, and the TensorRT backend.

Engine tests need the ``tensorrt_rtx`` module (``pip install tensorrt-rtx-cu13``; its builder runs
without a GPU); the TensorRT backend test needs a GPU with TensorRT and cuda-python. The target
and plan tests run everywhere.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import sys
import types

import numpy as np
import pytest
from click.testing import CliRunner

from emma_export.targets import GpuInfo, Target, TargetError, check_precision, list_targets, load_target, resolve_auto

RTX_REASON = "TensorRT-RTX is not installed (pip install tensorrt-rtx-cu13): engine tests need its builder"


@pytest.fixture(scope="session")
def rtx():
    return pytest.importorskip("tensorrt_rtx", reason=RTX_REASON)


# ---- targets ------------------------------------------------------------------------------------

def test_every_target_file_loads_and_the_required_ones_exist():
    names = list_targets()
    for need in ("cpu", "h100", "jetson-orin", "jetson-thor", "rtx-ampere", "rtx-ada", "rtx-blackwell"):
        assert need in names
    by = {n: load_target(n) for n in names}
    assert by["h100"].flavour == "tensorrt" and by["h100"].compute_capability == "9.0"
    assert by["jetson-orin"].compute_capability == "8.7" and by["jetson-orin"].memory_gb == (8, 16, 32, 64)
    assert by["jetson-thor"].compute_capability == "11.0"
    assert [by[n].compute_capability for n in ("rtx-ampere", "rtx-ada", "rtx-blackwell")] == ["8.6", "8.9", "12.0"]
    assert all(by[n].flavour == "tensorrt-rtx" for n in ("rtx-ampere", "rtx-ada", "rtx-blackwell"))
    assert by["cpu"].flavour == "ort" and by["cpu"].compute_capability is None


@pytest.mark.parametrize("name,cc", [("jetson-orin", "8.7"), ("rtx-ampere", "8.6")])
def test_fp8_refused_below_sm89_with_one_line(name, cc):
    with pytest.raises(TargetError) as e:
        check_precision(load_target(name), "fp8")
    msg = str(e.value)
    assert msg == f"--precision fp8 needs compute capability 8.9 or newer; {name} is {cc}: use --precision int8 or fp16"
    assert "\n" not in msg


@pytest.mark.parametrize("name", ["rtx-ada", "h100", "jetson-thor", "rtx-blackwell"])
def test_fp8_allowed_from_sm89(name):
    check_precision(load_target(name), "fp8")
    check_precision(load_target(name), "int8")


def test_unknown_target_and_precision_are_one_line():
    with pytest.raises(TargetError, match="unknown target 'nope'; choose one of .*rtx-ada"):
        load_target("nope")
    with pytest.raises(TargetError, match="unknown precision 'fp4'"):
        check_precision(load_target("h100"), "fp4")


def test_a_target_file_contradicting_the_hardware_rules_is_rejected():
    ok = Target.from_dict({"name": "x", "flavour": "tensorrt-rtx", "compute_capability": "8.9", "memory_gb": [8],
                           "precisions": ["fp8"]})
    assert ok.cc == (8, 9)
    with pytest.raises(TargetError, match="lists fp8 but --precision fp8 needs compute capability 8.9"):
        Target.from_dict({"name": "x", "flavour": "tensorrt-rtx", "compute_capability": "8.6", "memory_gb": [8],
                          "precisions": ["fp32", "fp8"]})
    with pytest.raises(TargetError, match="flavour"):
        Target.from_dict({"name": "x", "flavour": "cuda", "compute_capability": "8.6", "memory_gb": [8], "precisions": []})


def test_auto_resolves_to_cpu_without_a_gpu_and_to_the_gpu_otherwise(monkeypatch):
    import emma_export.targets as targets

    assert resolve_auto(gpu=None).name == "cpu"
    monkeypatch.setattr(targets, "available_flavours", lambda: ["tensorrt-rtx"])
    t = resolve_auto(gpu=GpuInfo("NVIDIA GeForce RTX 4090", "8.9", 23.6, "test"))
    assert (t.name, t.flavour, t.compute_capability, t.memory_gb) == ("auto", "tensorrt-rtx", "8.9", (24,))
    t = resolve_auto(gpu=GpuInfo("Tesla T4", "7.5", 15.0, "test"))
    assert t.compute_capability == "7.5" and "fp8" not in t.precisions and "int8" in t.precisions
    with pytest.raises(TargetError, match="needs compute capability 8.9"):
        check_precision(t, "fp8")


# ---- engines for the tiny bundle ----------------------------------------------------------------

@pytest.fixture(scope="session")
def rtx_bundle(rtx, tiny_bundle_standard, tmp_path_factory):
    """A copy of the tiny fp32 bundle with TensorRT-RTX engines for rtx-ada (SM 8.9)."""
    from emma_export.trt.builder import build_engines

    out = tmp_path_factory.mktemp("rtx") / "tiny"
    shutil.copytree(tiny_bundle_standard, out)  # TensorRT takes the standard-operator graphs
    lines = []
    results = build_engines(out, load_target("rtx-ada"), echo=lines.append)
    return out, results


def test_every_component_builds_an_engine_for_rtx_ada(rtx_bundle):
    from emma_runtime.bundle import Bundle

    out, results = rtx_bundle
    comps = Bundle.load(out).manifest.components
    assert [r.component for r in results] == list(comps)
    for r in results:
        assert r.engine_bytes > 0 and r.build_seconds > 0 and r.flavour == "tensorrt-rtx"
        assert (out / r.file).stat().st_size == r.engine_bytes


def test_each_engine_records_the_builders_peak_rss(rtx_bundle):
    from emma_runtime.bundle import Bundle

    out, results = rtx_bundle
    comps = Bundle.load(out).manifest.components
    for r in results:
        assert r.peak_rss > 50 * 2**20  # the process itself: TensorRT-RTX and the graph in memory
        assert comps[r.component].engine.builder_peak_rss == r.peak_rss and not comps[r.component].engine_on_device


def test_a_component_too_large_for_this_machine_is_left_to_the_device(rtx, tiny_bundle_standard, tmp_path, monkeypatch):
    """Past the memory the builder may use (3.2x the graph's weight bytes), the component gets no
    engine here, one line says why and how to build it on the device, and the manifest records it;
    a later build with enough memory clears the record."""
    from emma_export.export.external_data import graph_weight_bytes
    from emma_export.trt.builder import BUILDER_RSS_PER_WEIGHT_BYTE, build_engines
    from emma_runtime.bundle import Bundle

    out = tmp_path / "b"
    shutil.copytree(tiny_bundle_standard, out)
    w = {n: graph_weight_bytes(out / c.file) for n, c in Bundle.load(out).manifest.components.items()}
    big = max(w, key=w.get)
    # room for every component but the largest
    limit = BUILDER_RSS_PER_WEIGHT_BYTE * (w[big] + sorted(w.values())[-2]) / 2
    monkeypatch.setenv("EMMA_ENGINE_BUILD_MEMORY_GB", str(limit / 2**30))
    lines = []
    built = build_engines(out, load_target("rtx-ada"), components=[big, "gen_head"], echo=lines.append)
    assert [r.component for r in built] == ["gen_head"]
    assert len(lines) == 1 and lines[0].startswith(f"{big}: the builder needs about") and f"--component {big}" in lines[0]
    comps = Bundle.load(out).manifest.components
    assert comps[big].engine is None and "build it on the device" in comps[big].engine_on_device
    monkeypatch.setenv("EMMA_ENGINE_BUILD_MEMORY_GB", "64")
    build_engines(out, load_target("rtx-ada"), components=[big, "gen_head"], echo=lines.append)
    comps = Bundle.load(out).manifest.components
    assert comps[big].engine is not None and comps[big].engine_on_device == ""


def test_engine_sha256_and_profile_are_in_the_manifest(rtx_bundle):
    from emma_runtime.bundle import Bundle, sha256_file

    out, results = rtx_bundle
    bundle = Bundle.load(out)  # checks every file's sha256, the engines' included
    for r in results:
        info = bundle.manifest.components[r.component]
        e = info.engine
        assert e is not None and e.file == f"{r.component}.engine"
        assert e.sha256 == sha256_file(out / e.file) == r.sha256
        assert (e.target, e.compute_capability) == ("rtx-ada", "8.9")
        assert {k: tuple(v) for k, v in info.profile.items()}.items() <= e.profile.items()
    assert not list(out.glob(".*.tmp")), "temporary files left behind"


def test_profile_shapes_cover_every_symbolic_input_dim(tiny_bundle):
    from emma_runtime.bundle import Bundle

    from emma_export.trt.builder import profile_shapes, resolve_profile

    for name, info in Bundle.load(tiny_bundle).manifest.components.items():
        shapes = profile_shapes(info, name)
        prof = resolve_profile(info.profile)
        assert set(shapes) == {t.name for t in info.inputs}
        for t in info.inputs:
            lo, opt, hi = shapes[t.name]
            assert len(lo) == len(opt) == len(hi) == len(t.shape)
            for i, d in enumerate(t.shape):
                if isinstance(d, str):
                    assert d in prof, f"{name}.{t.name}: {d} not in the profile"
                    assert (lo[i], opt[i], hi[i]) == prof[d]
                else:
                    assert lo[i] == opt[i] == hi[i] == d
                assert 0 <= lo[i] <= opt[i] <= hi[i]
        if "past" in prof and "seq" in prof:
            assert prof["total"][0] <= prof["past"][0] + prof["seq"][0]
            assert prof["total"][2] >= prof["past"][2] + prof["seq"][2] or prof["total"][2] >= info.profile["seq"][2]


def test_total_is_derived_from_past_and_seq_when_missing():
    from emma_export.trt.builder import EngineBuildError, resolve_profile

    assert resolve_profile({"past": (0, 8, 16), "seq": (1, 4, 16)})["total"] == (1, 12, 32)
    with pytest.raises(EngineBuildError, match="min <= opt <= max"):
        resolve_profile({"seq": (4, 2, 8)})


def test_parse_bundle_accepts_every_graph(rtx, tiny_bundle_standard):
    from emma_export.trt.parse_check import parse_bundle

    res = parse_bundle(tiny_bundle_standard)
    assert res and all(v == "ok" for v in res.values()), res


def test_unsupported_operator_is_rejected_naming_the_node(rtx, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from emma_runtime.bundle import ComponentInfo, TensorInfo

    from emma_export.trt.builder import EngineBuildError, build_component

    node = helper.make_node("Unique", ["x"], ["y"], name="odd_unique")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m"])])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    info = ComponentInfo("bad.onnx", "", (TensorInfo("x", "float32", ("n",)),), (TensorInfo("y", "float32", ("m",)),),
                         profile={"n": (1, 4, 8)})
    with pytest.raises(EngineBuildError) as e:
        build_component(rtx, load_target("rtx-ada"), path, info, "bad")
    msg = str(e.value)
    assert "bad" in msg and "odd_unique" in msg and "(Unique)" in msg and "unsupported_node" in msg
    assert "\n" not in msg


def test_a_target_without_its_tensorrt_defers_with_one_line(tiny_bundle):
    import importlib.util

    from emma_export.trt.builder import build_engines

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("full TensorRT is installed here: the h100 build would not be deferred")
    lines = []
    before = (tiny_bundle / "manifest.json").read_text()
    assert build_engines(tiny_bundle, load_target("h100"), echo=lines.append) == []
    assert len(lines) == 1 and "h100" in lines[0] and "emma-export engines" in lines[0] and "H100" in lines[0]
    assert build_engines(tiny_bundle, load_target("cpu"), echo=lines.append) == []
    assert "no engines" in lines[-1]
    assert (tiny_bundle / "manifest.json").read_text() == before


def test_engines_cli_refuses_an_unknown_target(tiny_bundle):
    from emma_export.cli import main

    r = CliRunner().invoke(main, ["engines", "--bundle", str(tiny_bundle), "--target", "nope"])
    assert r.exit_code == 2 and "unknown target" in r.output


# ---- memory plan --------------------------------------------------------------------------------

def test_plan_weights_gen_head_by_hand(tiny_cfg):
    from emma_export.plan import graph_params, plan_memory

    H, C = tiny_cfg.llm.hidden_size, tiny_cfg.ae.latent_channels
    norm, weight, bias = H, H * C, C  # RMSNorm(H) -> Linear(H -> C) with bias
    split = graph_params(tiny_cfg)["gen_head"]
    assert (split.matmul, split.llm_matmul, split.other) == (weight, 0, norm + bias)
    # the policy keeps the Gen head fp32 at every precision (quantize/policy.py)
    for precision in ("fp16", "int8", "int4w"):
        assert plan_memory(tiny_cfg, precision, load_target("rtx-ada")).weights["gen_head"] == 4 * (norm + weight + bias)


def test_plan_counts_the_embedding_twice_and_the_kv_cache(tiny_cfg):
    from emma_export.info import model_info
    from emma_export.plan import plan_memory

    V, H = tiny_cfg.llm.vocab_size, tiny_cfg.llm.hidden_size
    p = plan_memory(tiny_cfg, "fp32", load_target("cpu"), context=512, cfg_mode="sequential")
    assert p.parameters["embed_tokens"] == V * H and p.parameters["lm_head"] == V * H + H
    assert p.weights["embed_tokens"] == 4 * V * H
    mi = model_info(tiny_cfg)
    assert sum(p.parameters.values()) > mi.total  # embedding and shared Q/K held twice
    l = tiny_cfg.llm
    row = 2 * l.num_hidden_layers * l.num_key_value_heads * l.head_dim * 4 * 512
    assert p.kv_cache == row * 3
    # the peak phase: its activations plus the cache rows alive then (3 guidance prefixes, none yet
    # at the vision tower, one understanding cache at the LM head)
    rows = {"prefill": 3, "denoise_step": 3, "lm_head": 1, "vision": 0, "autoencoder": 3}
    assert p.phases == {k: a + rows[k] * row for k, a in p.activations.items()}
    assert p.total == p.weights_total + max(p.phases.values())
    pb = plan_memory(tiny_cfg, "fp32", load_target("cpu"), context=512, cfg_mode="batch")
    assert pb.kv_cache == 2 * p.kv_cache
    assert pb.phases["denoise_step"] == pb.activations["denoise_step"] + 6 * row  # and the stacked copy


def test_plan_advises_when_it_does_not_fit():
    from emma_export.config import get_config
    from emma_export.plan import plan_memory

    p = plan_memory(get_config("emma-4b"), "fp16", load_target("jetson-orin"))
    fit = {v.memory_gb: v for v in p.variants}
    assert fit[64].fits and not fit[16].fits
    assert "--precision" in fit[16].advice or "--context" in fit[16].advice
    assert not fit[8].fits and fit[8].advice


def test_plan_cli_prints_a_plan():
    from emma_export.cli import main

    r = CliRunner().invoke(main, ["plan", "--config", "emma-4b", "--precision", "fp8", "--target", "jetson-thor"])
    assert r.exit_code == 0, r.output
    for word in ("backbone_und", "KV cache", "activations", "total", "64 GB", "128 GB", "fits"):
        assert word in r.output
    r = CliRunner().invoke(main, ["plan", "--config", "tiny", "--precision", "fp8", "--target", "jetson-orin", "--json"])
    assert r.exit_code == 2
    assert "--precision fp8 needs compute capability 8.9 or newer; jetson-orin is 8.7: use --precision int8 or fp16" in r.output
    r = CliRunner().invoke(main, ["plan", "--config", "tiny", "--precision", "int8", "--target", "rtx-ada", "--json"])
    d = json.loads(r.output)
    assert d["total"] == d["weights_total"] + max(d["phases"].values()) and d["kv_cache_dtype"] == "fp16"


# ---- the TensorRT backend -----------------------------------------------------------------------

class _FakeCudart(types.SimpleNamespace):
    """Host memory behind cuda-python's runtime API: checks the backend's pointer arithmetic."""

    def __init__(self):
        super().__init__()
        self.blocks = {}
        self.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2, cudaMemcpyDeviceToDevice=3)

    def cudaGetDeviceCount(self):
        return 0, 1

    def cudaSetDevice(self, i):
        return (0,)

    def cudaGetDeviceProperties(self, i):
        return 0, types.SimpleNamespace(name=b"Fake GPU", major=8, minor=9, totalGlobalMem=2**30)

    def cudaStreamCreate(self):
        return 0, 0

    def cudaStreamSynchronize(self, s):
        return (0,)

    def cudaStreamDestroy(self, s):
        return (0,)

    def cudaMalloc(self, n):
        buf = np.zeros(n, np.uint8)
        self.blocks[buf.ctypes.data] = buf
        return 0, buf.ctypes.data

    def cudaFree(self, p):
        self.blocks.pop(p, None)
        return (0,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        ctypes.memmove(dst, src, n)
        return (0,)

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        for r in range(height):
            ctypes.memmove(dst + r * dpitch, src + r * spitch, width)
        return (0,)

    def cudaMemsetAsync(self, dst, value, n, stream):
        ctypes.memset(dst, value, n)
        return (0,)

    def cudaGetErrorString(self, e):
        return 0, b"fake error"


def test_device_arrays_rows_are_zero_copy_views(rtx, monkeypatch):
    from emma_runtime.backends import trt as trt_backend
    from emma_runtime.kv_cache import KVCache

    fake = _FakeCudart()
    monkeypatch.setattr(trt_backend, "_import_cudart", lambda: fake)
    b = trt_backend.TrtBackend()
    assert b.compute_capability == "8.9" and "Fake GPU" in b.describe()
    dims = types.SimpleNamespace(num_layers=3, num_kv_heads=2, head_dim=4)
    cache = KVCache.allocate(b, dims, batch=2, capacity=10)
    layer = 2 * 2 * 10 * 4 * 4
    assert [k.shape for k in cache.keys] == [(2, 2, 10, 4)] * 3
    assert [k.ptr - cache.keys[0].ptr for k in cache.keys] == [0, layer, 2 * layer]  # one buffer, a view per layer
    np.testing.assert_array_equal(b.to_host(cache.keys[1]), 0)  # zeroed: a standard graph reads it whole
    # a standard graph's new keys for a 3-token chunk, row 0 with 3 real tokens, row 1 with 2
    new = np.arange(2 * 2 * 3 * 4, dtype=np.float32).reshape(2, 2, 3, 4) + 1
    cache.lengths = np.array([4, 1])
    b.write_positions(cache.keys[1], b.from_host(new), cache.lengths, np.array([3, 2]))
    got = b.to_host(cache.keys[1])
    np.testing.assert_array_equal(got[0, :, 4:7], new[0])
    np.testing.assert_array_equal(got[1, :, 1:3], new[1, :, :2])
    assert np.count_nonzero(got) == new[0].size + new[1, :, :2].size  # nothing else was touched
    np.testing.assert_array_equal(b.to_host(cache.keys[0]), 0)
    assert b.rows(b.empty((5, 2), np.float32), 0, 0).shape[0] == 0
    with pytest.raises(IndexError):
        b.rows(b.empty((5, 2), np.float32), 5, 11)


def test_trt_backend_unavailable_is_one_line(monkeypatch):
    from emma_runtime.backends import make_backend
    from emma_runtime.backends import trt as trt_backend

    if "cuda" not in sys.modules:
        monkeypatch.setitem(sys.modules, "cuda", None)
        monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    try:
        make_backend("trt")
    except trt_backend.TrtBackendUnavailable as e:
        assert str(e).startswith("--backend trt needs an NVIDIA GPU with TensorRT and cuda-python") and "\n" not in str(e)
    else:
        pytest.skip("a GPU with TensorRT and cuda-python is present")


def _gpu_or_skip():
    from emma_export.targets import available_flavours, detect_gpu

    if detect_gpu() is None:
        pytest.skip("no NVIDIA GPU visible: the TensorRT backend runs only on a GPU")
    if not available_flavours():
        pytest.skip("neither tensorrt nor tensorrt_rtx is installed")
    pytest.importorskip("cuda.bindings", reason="cuda-python is not installed (pip install cuda-python)")


def test_trt_backend_matches_onnxruntime_on_a_gpu(tiny_bundle_standard, tmp_path):
    _gpu_or_skip()
    from emma_runtime.backends.ort import OrtBackend
    from emma_runtime.backends.trt import TrtBackend
    from emma_runtime.pipelines import Pipeline

    from emma_export.trt.builder import build_engines

    target = resolve_auto()
    out = tmp_path / "b"
    shutil.copytree(tiny_bundle_standard, out)
    if not build_engines(out, target, echo=print):
        pytest.skip(f"this machine cannot build engines for {target.name}")
    from emma_runtime.bundle import Bundle

    bundle = Bundle.load(out)
    ref, got = Pipeline(bundle, OrtBackend("cpu")), Pipeline(bundle, TrtBackend())
    img = np.random.default_rng(0).uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)
    a = ref.understand(img, "what is this?", max_new_tokens=6)
    g = got.understand(img, "what is this?", max_new_tokens=6)
    assert a.token_ids == g.token_ids
    ia = ref.generate("a red circle", steps=2, seed=1).image
    ig = got.generate("a red circle", steps=2, seed=1).image
    assert np.abs(np.asarray(ia) - np.asarray(ig)).max() < 1e-2


def test_a_partial_rebuild_for_another_target_is_refused(rtx_bundle):
    from emma_export.trt.builder import EngineBuildError, build_engines

    out, _ = rtx_bundle
    before = (out / "manifest.json").read_text()
    with pytest.raises(EngineBuildError, match="other engines are for rtx-ada"):
        build_engines(out, load_target("rtx-blackwell"), components=["gen_head"], echo=lambda s: None)
    assert (out / "manifest.json").read_text() == before
