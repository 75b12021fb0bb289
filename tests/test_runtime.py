"""The torch-free runtime: end-to-end parity with the reference, the KV cache, bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from emma_runtime.bundle import BundleError
from emma_runtime.pipelines import Pipeline, RequestError

ROOT = Path(__file__).resolve().parents[1]


def test_runtime_imports_with_torch_blocked():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import emma_runtime, emma_runtime.pipelines, emma_runtime.cli, emma_runtime.backends.ort, emma_runtime.bundle\n"
        "from emma_runtime.pipelines import Pipeline\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT / "runtime"), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_pipelines_match_the_reference(tiny_bundle, tiny_reference):
    from emma_export.verify_e2e import E2E_MIN, verify_pipelines
    from emma_runtime.bundle import Bundle

    res = verify_pipelines(Bundle.load(tiny_bundle), tiny_reference)
    floor = E2E_MIN["fp32"]
    assert floor["psnr_db"] >= 100 and floor["logits_rel_l2"] <= 1e-4  # fp32 floors set from what fp32 achieves
    assert res["understand"]["passed"], res["understand"]
    assert res["understand"]["token_agreement"] == 1.0
    # every decode step compared: the prefill's logits and one per decoded token
    assert res["understand"]["logits_steps"] == res["understand"]["tokens"] + 1
    assert res["generate"]["passed"] and res["generate"]["psnr_db"] >= floor["psnr_db"], res["generate"]
    assert res["edit"]["passed"] and res["edit"]["psnr_db"] >= floor["psnr_db"], res["edit"]
    assert res["generate"]["velocity_steps"] == res["edit"]["velocity_steps"] == tiny_reference.cfg.sampler.steps
    # Channel-wise concatenation adds no tokens: (H/32)(W/32) per image.
    assert res["generate"]["visual_tokens"] == 4 and res["edit"]["visual_tokens"] == 8


def test_non_square_pipelines_match_the_reference(tiny_bundle, tiny_reference):
    from emma_export.verify_e2e import verify_pipelines
    from emma_runtime.bundle import Bundle

    res = verify_pipelines(Bundle.load(tiny_bundle), tiny_reference, 128, 96, max_new_tokens=4)
    for task, r in res.items():
        assert r["passed"], (task, r)
    assert res["generate"]["visual_tokens"] == 12 and res["edit"]["visual_tokens"] == 24


def test_batched_and_sequential_cfg_agree(tiny_bundle):
    from emma_runtime.sampling import initial_noise

    noise = initial_noise(0, 8, 2, 2)
    a = Pipeline.load(tiny_bundle, cfg_mode="batch").generate("a cat", noise=noise)
    b = Pipeline.load(tiny_bundle, cfg_mode="sequential").generate("a cat", noise=noise)
    np.testing.assert_allclose(a.latents, b.latents, atol=1e-5)
    assert Pipeline.load(tiny_bundle).cfg_mode == "batch"  # the measured-faster default (emma-bench)
    with pytest.raises(ValueError, match="cfg_mode"):
        Pipeline.load(tiny_bundle, cfg_mode="both")


@pytest.mark.parametrize("flavour", ["gqa", "standard"])
def test_decode_writes_into_the_preallocated_cache(flavour, tiny_bundle, tiny_bundle_standard):
    from emma_runtime.kv_cache import KVCache

    p = Pipeline.load(tiny_bundle if flavour == "gqa" else tiny_bundle_standard)
    assert p.attention["backbone_und"] == flavour
    cache = KVCache.allocate(p.backend, p.dims, 1, 16, p.kv_dtype)
    bufs = list(cache.keys) + list(cache.values)
    p.run_chunk(cache, p.embed([1, 2, 3]), "und", True)
    p.run_chunk(cache, p.embed([4]), "und", True)
    assert cache.length == 4 and all(a is b for a, b in zip(bufs, list(cache.keys) + list(cache.values)))
    for buf in bufs:  # every layer's buffer: the 4 positions written in place, nothing past them
        assert np.abs(buf[:, :, :4]).sum() > 0 and np.abs(buf[:, :, 4:]).sum() == 0
    # both flavours hold the same keys/values for the same tokens
    other = Pipeline.load(tiny_bundle_standard if flavour == "gqa" else tiny_bundle)
    c2 = KVCache.allocate(other.backend, other.dims, 1, 16, other.kv_dtype)
    other.run_chunk(c2, other.embed([1, 2, 3]), "und", True)
    other.run_chunk(c2, other.embed([4]), "und", True)
    for a, b in zip(list(cache.keys) + list(cache.values), list(c2.keys) + list(c2.values)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_sampling_with_a_seed_is_reproducible(tiny_bundle):
    p = Pipeline.load(tiny_bundle)
    img = np.zeros((1, 3, 64, 64), np.float32)
    a = p.understand(img, "hi", max_new_tokens=6, temperature=1.0, top_p=0.9, seed=5)
    b = p.understand(img, "hi", max_new_tokens=6, temperature=1.0, top_p=0.9, seed=5)
    assert a.token_ids == b.token_ids


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "emma_runtime.cli", *args], capture_output=True, text=True, cwd=ROOT)


def test_cli_generate_writes_a_png(tmp_path, tiny_bundle):
    out = tmp_path / "g.png"
    r = _cli("generate", "--bundle", str(tiny_bundle), "--prompt", "a red circle", "--out", str(out), "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert out.exists() and info["visual_tokens"] == 4


def test_bad_inputs_get_one_clear_line(tmp_path, tiny_bundle):
    # missing bundle
    r = _cli("generate", "--bundle", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path / "o.png"))
    assert r.returncode != 0 and "no such bundle directory" in r.stderr and "Traceback" not in r.stderr
    # unreadable image
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    r = _cli("understand", "--bundle", str(tiny_bundle), "--image", str(bad), "--prompt", "x")
    assert r.returncode != 0 and "bad.png: unreadable image" in r.stderr and "Traceback" not in r.stderr
    # missing image
    r = _cli("edit", "--bundle", str(tiny_bundle), "--image", str(tmp_path / "none.png"), "--prompt", "x", "--out", str(tmp_path / "o.png"))
    assert r.returncode != 0 and "no such image file" in r.stderr
    # size not a multiple of 32
    r = _cli("generate", "--bundle", str(tiny_bundle), "--prompt", "x", "--height", "50", "--out", str(tmp_path / "o.png"))
    assert r.returncode == 2 and "must be a positive multiple of 32" in r.stderr
    # corrupt bundle
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle, broken)
    (broken / "gen_head.onnx").write_bytes(b"garbage")
    r = _cli("generate", "--bundle", str(broken), "--prompt", "x", "--out", str(tmp_path / "o.png"))
    assert r.returncode != 0 and "gen_head.onnx: sha256 mismatch" in r.stderr


def test_prompt_longer_than_the_context_is_refused(tiny_bundle):
    p = Pipeline.load(tiny_bundle)
    with pytest.raises(RequestError, match="more than the model's context"):
        p.generate("x" * 2000)


def test_mismatched_format_version_is_refused(tmp_path, tiny_bundle):
    b = tmp_path / "old"
    shutil.copytree(tiny_bundle, b)
    m = json.loads((b / "manifest.json").read_text())
    m["format_version"] = 999
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="format_version 999"):
        Pipeline.load(b)


def test_images_resize_to_the_nearest_multiple_of_32(tmp_path):
    from PIL import Image

    from emma_runtime.images import load_image

    p = tmp_path / "odd.webp"
    Image.new("RGB", (100, 70), (255, 0, 0)).save(p)
    a = load_image(p, 32)
    assert a.shape == (1, 3, 64, 96)
    assert np.allclose(a[0, 0], 1.0, atol=1e-2) and np.allclose(a[0, 1], -1.0, atol=1e-2)
