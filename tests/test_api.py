"""The public API, ``from emma_runtime import Pipeline, Bundle``: the facade gives the engine's results
for every kind of image input, and ``import emma_runtime.bundle`` stays light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from emma_runtime.images import to_uint8

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    from emma_runtime import Pipeline

    return Pipeline.load(tiny_bundle, providers="cpu")


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("img") / "in.png"
    Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(path)
    return path


def test_public_names_import_lazily():
    code = (
        "import sys, emma_runtime.bundle\n"
        "heavy = [m for m in ('onnxruntime', 'tokenizers', 'PIL', 'emma_runtime.pipelines') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from emma_runtime import Pipeline, Bundle\n"
        "from emma_runtime.api import Pipeline as P\n"
        "from emma_runtime.bundle import Bundle as B\n"
        "assert Pipeline is P and Bundle is B and 'torch' not in sys.modules\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT / "runtime"), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_every_public_name_resolves():
    import emma_runtime

    assert sorted(emma_runtime.__all__) == sorted(emma_runtime._LAZY)
    for name in emma_runtime.__all__:
        assert getattr(emma_runtime, name) is not None


def test_facade_returns_the_engines_results(pipe, picture):
    engine = pipe.engine
    want = engine.understand(str(picture), "what is this?", 6)
    assert pipe.understand(picture, "what is this?", max_new_tokens=6) == want.text
    assert pipe.understand_result(str(picture), "what is this?", max_new_tokens=6).token_ids == want.token_ids

    img = pipe.generate("a red circle", width=96, height=64, seed=2)
    assert isinstance(img, Image.Image) and img.size == (96, 64) and img.mode == "RGB"
    ref = engine.generate("a red circle", 64, 96, seed=2)
    assert np.array_equal(np.asarray(img), to_uint8(ref.image))
    r = pipe.generate_result("a red circle", width=96, height=64, seed=2)
    assert np.array_equal(r.image, ref.image) and set(r.timings) >= {"prefill_s", "denoise_s", "decode_s"}

    edited = pipe.edit(picture, "make it blue", seed=1, steps=3)
    assert edited.size == (96, 64)
    assert np.array_equal(np.asarray(edited), to_uint8(engine.edit(str(picture), "make it blue", steps=3, seed=1).image))


def test_every_image_input_form_gives_the_same_answer(pipe, picture):
    pil = Image.open(picture)
    model = pipe.image_array(picture)
    forms = [picture, str(picture), pil, np.asarray(pil.convert("RGB")), model, model[0]]
    arrays = [pipe.image_array(f) for f in forms]
    for a in arrays:
        assert a.shape == (1, 3, 64, 96) and a.dtype == np.float32
        assert np.array_equal(a, arrays[0])
    answers = {pipe.understand(f, "what colour?", max_new_tokens=4) for f in forms}
    assert len(answers) == 1


def test_bad_inputs_raise_one_line_value_errors(pipe, tmp_path):
    from emma_runtime import RequestError

    with pytest.raises(RequestError, match=r"image array of shape \(4, 4\)"):
        pipe.understand(np.zeros((4, 4)), "x")
    with pytest.raises(RequestError, match="positive multiple of 32"):
        pipe.understand(np.zeros((1, 3, 50, 64), np.float32), "x")
    with pytest.raises(RequestError, match="must be a path, a PIL image or a numpy array"):
        pipe.edit(42, "x")
    with pytest.raises(ValueError, match="no such image file"):
        pipe.understand(tmp_path / "none.png", "x")
    with pytest.raises(ValueError, match="providers apply to the ort backend"):
        type(pipe).load(pipe.bundle.root, backend="trt", providers="cuda")
