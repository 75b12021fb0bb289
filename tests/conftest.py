import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "runtime"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_cfg():
    from emma_export.config import get_config

    return get_config("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg):
    from emma_export.model.emma import build_model

    return build_model(tiny_cfg, seed=0)


@pytest.fixture(scope="session")
def tokenizer(tiny_cfg):
    from emma_export.tokenizer import byte_level_tokenizer

    return byte_level_tokenizer(tiny_cfg.llm.vocab_size)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """The tiny fp32 bundle, exported once per test session (random weights, seed 0), for the cpu
    target: its Und backbone is the gqa flavour (ONNX Runtime's GroupQueryAttention)."""
    from emma_export.export.bundle_writer import export_bundle
    from emma_export.export.source import WeightSource

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export_bundle(WeightSource.from_args("tiny", None, 0), out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_bundle_standard(tmp_path_factory):
    """The same bundle with the standard-operator Und backbone (what TensorRT and other runtimes take)."""
    from emma_export.export.bundle_writer import export_bundle
    from emma_export.export.source import WeightSource

    out = tmp_path_factory.mktemp("bundles") / "tiny-standard"
    export_bundle(WeightSource.from_args("tiny", None, 0), out, progress=False, attention="standard")
    return out


@pytest.fixture(scope="session")
def tiny_reference(tiny_bundle):
    from emma_export.export.source import WeightSource

    return WeightSource.from_args("tiny", None, 0).full_model()


@pytest.fixture(scope="session")
def serve_bundle(tmp_path_factory):
    """The trained shapes bundle (fp32), exported once per test session from checkpoints/shapes."""
    ckpt = ROOT / "checkpoints" / "shapes"
    if not (ckpt / "model.safetensors").exists():
        pytest.skip("no shipped checkpoint at checkpoints/shapes")
    from emma_export.export.bundle_writer import export_bundle
    from emma_export.export.source import WeightSource

    out = tmp_path_factory.mktemp("bundles") / "shapes"
    export_bundle(WeightSource.from_args(None, str(ckpt), 0), out, progress=False, tokenizer_file=ckpt / "tokenizer.json")
    return out
