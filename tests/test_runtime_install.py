"""The runtime as a device installs it: ``pip install ./runtime`` into a fresh virtual environment
(no torch may come with it); the shapes bundle packed here, unpacked and reported there
(``emma-run unpack``, ``emma-run info``), then understand, generate and edit with that environment's
``emma-run`` and public API, compared with this (toolchain) environment's results.

Needs a package index for the runtime's dependencies; it is skipped only when the install fails
and PyPI cannot be reached.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
import venv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "checkpoints" / "shapes"
PYPI = "https://pypi.org/simple/onnxruntime/"
QUESTION = "what colour is the circle?"
GEN_PROMPT = "a red circle and a blue square"
EDIT_PROMPT = "make the circle green"


def _pypi_unreachable() -> str:
    try:
        with urllib.request.urlopen(PYPI, timeout=10):
            return ""
    except OSError as e:
        return f"PyPI ({PYPI}) is unreachable ({e}): the fresh environment cannot install the runtime's dependencies"


def _clean_env() -> dict[str, str]:
    """This process's environment minus what would let the fresh venv import the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _pip(env_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "pip", "--python", str(env_dir / "bin" / "python"), *args]


@dataclass(frozen=True)
class DeviceEnv:
    venv: Path  # the fresh environment with only the runtime installed
    bundle: Path  # the shapes bundle, exported by this (toolchain) environment


@pytest.fixture(scope="module")
def device_env(tmp_path_factory) -> DeviceEnv:
    if not (SHIPPED / "model.safetensors").exists():
        pytest.skip("no shipped checkpoint at checkpoints/shapes")
    from emma_export.export.bundle_writer import export_bundle
    from emma_export.export.source import WeightSource

    tmp = tmp_path_factory.mktemp("runtime-venv")
    # Install from a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
    src = tmp / "src"
    shutil.copytree(ROOT / "runtime", src, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    env_dir = tmp / "venv"
    # No pip inside: this environment's pip installs into it (--python), which skips ensurepip's
    # half a minute; the fresh environment holds only what the runtime brings.
    venv.EnvBuilder(with_pip=False, clear=True).create(env_dir)
    log = tmp / "pip.log"
    with open(log, "w") as out:
        # The install (mostly downloads) runs while this process exports the bundle.
        pip = subprocess.Popen(_pip(env_dir, "install", "-q", "--no-compile", str(src)), stdout=out, stderr=subprocess.STDOUT,
                               env=_clean_env(), cwd=tmp)
        try:
            bundle = tmp_path_factory.mktemp("bundles") / "shapes"
            export_bundle(WeightSource.from_args(None, str(SHIPPED), 0), bundle, progress=False,
                          tokenizer_file=SHIPPED / "tokenizer.json")
            rc = pip.wait(timeout=600)
        finally:
            if pip.poll() is None:
                pip.kill()
    if rc != 0:
        reason = _pypi_unreachable()
        if reason:
            pytest.skip(reason)
        pytest.fail(f"pip install ./runtime failed:\n{log.read_text()[-4000:]}")
    return DeviceEnv(env_dir, bundle)


@pytest.fixture(scope="module")
def scene_png(tmp_path_factory) -> Path:
    from shapes_world.world import Scene, Shape, render

    scene = Scene((Shape("circle", "red", "large", 20, 22), Shape("square", "blue", "small", 46, 44)))
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    Image.fromarray(render(scene)).save(path)
    return path


def _run(venv_dir: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    r = subprocess.run(args, capture_output=True, text=True, env=_clean_env(), cwd=cwd, timeout=300)
    assert r.returncode == 0, f"{' '.join(map(str, args))} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def test_runtime_installs_without_torch(device_env, tmp_path):
    runtime_venv = device_env.venv
    py = runtime_venv / "bin" / "python"
    listing = _run(runtime_venv, _pip(runtime_venv, "list", "--format=json"), tmp_path).stdout
    names = {p["name"].lower() for p in json.loads(listing)}
    assert "emma-runtime" in names
    assert not {n for n in names if n == "torch" or n.startswith("torch-") or n.startswith("nvidia-")}, sorted(names)
    assert names >= {"numpy", "onnxruntime", "tokenizers", "pillow", "click", "tqdm"}
    assert "emma-deploy" not in names
    probe = ("import sys, emma_runtime, emma_runtime.cli, emma_runtime.api; from emma_runtime import Pipeline, Bundle; "
             "print(emma_runtime.__file__); print('torch' in sys.modules)")
    out = _run(runtime_venv, [str(py), "-c", probe], tmp_path).stdout.split()
    assert str(runtime_venv) in out[0], f"emma_runtime imported from {out[0]}, not the fresh environment"
    assert out[1] == "False"
    assert (runtime_venv / "bin" / "emma-run").exists() and not (runtime_venv / "bin" / "emma-export").exists()


def test_installed_runtime_matches_the_toolchain(device_env, scene_png, tmp_path):
    runtime_venv, shapes_bundle = device_env.venv, device_env.bundle
    from emma_runtime import Pipeline

    ref = Pipeline.load(shapes_bundle, providers="cpu")
    want_answer = ref.understand_result(scene_png, QUESTION, max_new_tokens=8)
    want_gen = np.asarray(ref.generate(GEN_PROMPT, 64, 64, seed=3))
    want_edit = np.asarray(ref.edit(scene_png, EDIT_PROMPT, seed=5))

    # The device's way in: one archive, unpacked and checked by the fresh environment, then reported.
    from emma_runtime.pack import pack_bundle

    run = runtime_venv / "bin" / "emma-run"
    pack_bundle(shapes_bundle, tmp_path / "shapes.tar")
    device_bundle = tmp_path / "device" / "shapes"
    _run(runtime_venv, [str(run), "unpack", str(tmp_path / "shapes.tar"), str(device_bundle), "--quiet"], tmp_path)
    info = json.loads(_run(runtime_venv, [str(run), "info", "--bundle", str(device_bundle), "--json"], tmp_path).stdout)
    assert info["bundle"]["checksums"] == "verified" and info["verdicts"][0]["way"] == "ort cpu" and info["verdicts"][0]["runnable"]
    shapes_bundle = device_bundle
    common = ["--bundle", str(shapes_bundle), "--provider", "cpu", "--quiet", "--json"]
    got = json.loads(_run(runtime_venv, [str(run), "understand", *common, "--image", str(scene_png), "--prompt", QUESTION,
                                         "--max-new-tokens", "8"], tmp_path).stdout)
    assert got["token_ids"] == want_answer.token_ids and got["text"] == want_answer.text
    _run(runtime_venv, [str(run), "generate", *common, "--prompt", GEN_PROMPT, "--width", "64", "--height", "64",
                        "--seed", "3", "--out", str(tmp_path / "gen.png")], tmp_path)
    _run(runtime_venv, [str(run), "edit", *common, "--image", str(scene_png), "--prompt", EDIT_PROMPT, "--seed", "5",
                        "--out", str(tmp_path / "edit.png")], tmp_path)
    for name, want in (("gen.png", want_gen), ("edit.png", want_edit)):
        got_img = np.asarray(Image.open(tmp_path / name).convert("RGB"))
        assert got_img.shape == want.shape
        # Same onnxruntime and numpy on both sides gives the same pixels; a different onnxruntime
        # release may move a value across a rounding boundary, never further.
        diff = np.abs(got_img.astype(int) - want.astype(int))
        assert diff.max() <= 2 and diff.mean() < 0.05, f"{name}: max {diff.max()}, mean {diff.mean():.4f}"

    # The public API in the fresh environment: same answer, same image.
    script = (
        "import json, sys, numpy as np\n"
        "from emma_runtime import Pipeline\n"
        f"p = Pipeline.load({str(shapes_bundle)!r}, providers='cpu')\n"
        f"a = p.understand({str(scene_png)!r}, {QUESTION!r}, max_new_tokens=8)\n"
        f"g = np.asarray(p.generate({GEN_PROMPT!r}, 64, 64, seed=3))\n"
        f"np.save({str(tmp_path / 'api_gen.npy')!r}, g)\n"
        "print(json.dumps(a))\n"
    )
    out = _run(runtime_venv, [str(runtime_venv / "bin" / "python"), "-c", script], tmp_path).stdout
    assert json.loads(out.strip().splitlines()[-1]) == want_answer.text
    api_gen = np.load(tmp_path / "api_gen.npy")
    assert np.abs(api_gen.astype(int) - want_gen.astype(int)).max() <= 2
