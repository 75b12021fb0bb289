"""ONNX Runtime's execution providers: choosing them, their options, the KV cache bound by address
in OrtValues, and (where a GPU is present) the CUDA and TensorRT providers against the CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from emma_runtime.backends import ort_providers as prov
from emma_runtime.backends.ort import OrtBackend, OrtDeviceArray
from emma_runtime.bundle import Bundle
from emma_runtime.pipelines import Pipeline

ROOT = Path(__file__).resolve().parents[1]
AVAILABLE = ort.get_available_providers()


def _gpu_reason(provider: str) -> str:
    """Why ``provider`` cannot run here ('' when it can)."""
    if provider not in AVAILABLE:
        return prov.missing_provider_message(provider)
    try:
        ort.OrtValue.ortvalue_from_shape_and_type([1], np.float32, "cuda", 0)
    except Exception as e:  # the GPU build without a GPU or a driver
        return f"{provider} is in onnxruntime but no CUDA device answers ({str(e).splitlines()[0]})"
    return ""


def test_provider_names_resolve_and_missing_ones_say_how_to_install():
    c = prov.choose("cpu")
    assert c.providers == (prov.CPU,) and not c.gpu
    assert prov.choose(None).providers[-1] == prov.CPU
    assert prov.choose(["CPUExecutionProvider"]).providers == (prov.CPU,)
    assert prov.choose("cpu, CPUExecutionProvider").providers == (prov.CPU,)  # a command line's comma list
    with pytest.raises(ValueError, match="must be a number"):
        prov.choose("cuda:x")
    if prov.CUDA not in AVAILABLE:
        with pytest.raises(prov.ProviderUnavailable) as e:
            prov.choose("cuda")
        msg = str(e.value)
        assert "\n" not in msg and "CPU build" in msg and "pip install 'emma-runtime[gpu]'" in msg


def test_cli_names_the_missing_provider_in_one_line(tiny_bundle, tmp_path):
    if prov.CUDA in AVAILABLE:
        pytest.skip("the CUDA provider is installed here: nothing is missing")
    r = subprocess.run([sys.executable, "-m", "emma_runtime.cli", "generate", "--bundle", str(tiny_bundle), "--provider", "cuda",
                        "--prompt", "x", "--out", str(tmp_path / "o.png")], capture_output=True, text=True, cwd=ROOT)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: CUDAExecutionProvider is not available") and "emma-runtime[gpu]" in lines[0]


def test_tensorrt_provider_options_come_from_the_bundle(tiny_bundle):
    b = Bundle.load(tiny_bundle)
    o = prov.trt_options(b, "backbone_gen", 0)
    sha = b.manifest.components["backbone_gen"].sha256
    assert o["trt_engine_cache_enable"] == "True" and o["trt_engine_cache_prefix"] == f"backbone_gen_{sha[:16]}"
    assert Path(o["trt_engine_cache_path"]) == tiny_bundle.resolve() / prov.TRT_CACHE_DIR == Path(o["trt_timing_cache_path"])
    assert o["trt_fp16_enable"] == "False"  # an fp32 bundle stays fp32
    info = b.manifest.components["backbone_gen"]
    p = {k: tuple(v) for k, v in info.profile.items()}
    seq, past = p["seq"], p["past"]
    total = p.get("total", tuple(a + s for a, s in zip(past, seq)))
    mins = dict(x.split(":") for x in o["trt_profile_min_shapes"].split(","))
    maxs = dict(x.split(":") for x in o["trt_profile_max_shapes"].split(","))
    assert set(mins) == {t.name for t in info.inputs}
    assert mins["attention_mask"] == f"{p['batch'][0]}x{seq[0]}x{total[0]}"
    assert maxs["past_key_1"] == "x".join(str(d if isinstance(d, int) else p[d][2]) for d in
                                          next(t.shape for t in info.inputs if t.name == "past_key_1"))


def test_without_explicit_profiles_the_provider_sizes_its_own(tiny_bundle):
    o = prov.trt_options(Bundle.load(tiny_bundle), "backbone_gen", 0, explicit_profiles=False)
    assert not [k for k in o if k.startswith("trt_profile_")] and o["trt_engine_cache_enable"] == "True"


def test_half_precision_bundles_turn_on_fp16(tiny_bundle, tmp_path):
    import dataclasses

    b = Bundle.load(tiny_bundle)
    comps = {k: dataclasses.replace(v, precision="fp16") for k, v in b.manifest.components.items()}
    half = dataclasses.replace(b, manifest=dataclasses.replace(b.manifest, precision="fp16", components=comps))
    assert prov.trt_options(half, "lm_head", 1)["trt_fp16_enable"] == "True"
    assert prov.trt_options(half, "lm_head", 1)["device_id"] == "1"


def test_ortvalue_buffers_bound_by_address_match_numpy_buffers(tiny_bundle):
    """The GPU providers' binding path (KV cache in OrtValues, bound by pointer, row views by pointer
    arithmetic), run in host memory: the same tokens and images as numpy buffers."""
    b = Bundle.load(tiny_bundle)
    ref = Pipeline(b, OrtBackend("cpu"))
    dev = Pipeline(b, OrtBackend("cpu", ortvalue_buffers=True))
    cache = __import__("emma_runtime.kv_cache", fromlist=["KVCache"]).KVCache.allocate(dev.backend, dev.dims, 1, 8)
    assert all(isinstance(k, OrtDeviceArray) for k in cache.keys)
    layer = cache.keys[0].nbytes  # one buffer, a view per layer
    assert [k.ptr - cache.keys[0].ptr for k in cache.keys] == [i * layer for i in range(dev.dims.num_layers)]
    img = np.random.default_rng(0).uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)
    a, d = ref.understand(img, "what?", 6), dev.understand(img, "what?", 6)
    assert a.token_ids == d.token_ids
    g1, g2 = ref.generate("a red circle", seed=1, steps=3), dev.generate("a red circle", seed=1, steps=3)
    np.testing.assert_allclose(g2.latents, g1.latents, rtol=0, atol=1e-5)
    e1, e2 = ref.edit(img, "make it blue", steps=2, seed=4), dev.edit(img, "make it blue", steps=2, seed=4)
    np.testing.assert_allclose(e2.latents, e1.latents, rtol=0, atol=1e-5)


@pytest.mark.parametrize("provider", [prov.CUDA, prov.TRT])
def test_gpu_provider_matches_the_cpu(tiny_bundle_standard, tmp_path, provider):
    reason = _gpu_reason(provider)
    if reason:
        pytest.skip(reason)
    import shutil

    bundle_dir = tmp_path / "b"
    shutil.copytree(tiny_bundle_standard, bundle_dir)  # fp32 GroupQueryAttention is CPU-only in ONNX Runtime
    b = Bundle.load(bundle_dir)
    ref = Pipeline(b, OrtBackend("cpu"))
    gpu = Pipeline(b, OrtBackend(provider))
    assert gpu.backend.device == "cuda:0"
    from emma_runtime.kv_cache import KVCache

    cache = KVCache.allocate(gpu.backend, gpu.dims, 1, 4)
    assert isinstance(cache.keys[0], OrtDeviceArray) and cache.keys[0].device == "cuda"
    img = np.random.default_rng(0).uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)
    assert gpu.understand(img, "what?", 6).token_ids == ref.understand(img, "what?", 6).token_ids
    g1, g2 = ref.generate("a red circle", seed=1, steps=3), gpu.generate("a red circle", seed=1, steps=3)
    # GPU kernels (TF32 on Ampere and later) round differently from the CPU's
    np.testing.assert_allclose(g2.latents, g1.latents, rtol=0, atol=5e-2)
    e1, e2 = ref.edit(img, "make it blue", steps=2, seed=4), gpu.edit(img, "make it blue", steps=2, seed=4)
    np.testing.assert_allclose(e2.latents, e1.latents, rtol=0, atol=5e-2)
    if provider == prov.TRT:
        cached = list((bundle_dir / prov.TRT_CACHE_DIR).iterdir())
        assert any(p.name.startswith("backbone_und") for p in cached), [p.name for p in cached]
        Bundle.load(bundle_dir)  # the cache folder is not in the manifest and does not upset its checks
