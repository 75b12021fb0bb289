"""ONNX Runtime GenAI as the decode peer: its model builder run on the Und branch's Qwen3 folder, and
one decode step timed through its Generator API (what a user of ONNX Runtime would deploy instead).
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

# bundle precision -> the builder's -p; a precision the builder has no like-for-like form of is skipped
BUILDER_PRECISION = {"fp32": "fp32", "int4w": "int4"}


class PeerError(RuntimeError):
    """The peer could not be built or loaded; the message names the step and the log."""


@dataclass(frozen=True)
class PeerBuild:
    path: Path
    precision: str  # the builder's name for it
    seconds: float
    command: tuple[str, ...]


def builder_precision(bundle_precision: str) -> str | None:
    return BUILDER_PRECISION.get(bundle_precision)


def skip_reason(bundle_precision: str) -> str | None:
    """Why no peer is built for a bundle at this precision, or None when one is."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return "onnxruntime-genai is not installed (pip install 'emma-deploy[bench]')"
    if builder_precision(bundle_precision) is None:
        return (f"ONNX Runtime GenAI's builder has no {bundle_precision} form for the cpu provider "
                f"(a like-for-like peer exists for {', '.join(BUILDER_PRECISION)})")
    return None


def build(qwen3_dir: str | Path, out_dir: str | Path, bundle_precision: str, execution_provider: str = "cpu") -> PeerBuild:
    """``python -m onnxruntime_genai.models.builder -i DIR -o OUT -p P -e cpu``; its output goes to
    ``OUT/builder.log`` (it prints a line per tensor)."""
    p = builder_precision(bundle_precision)
    if p is None:
        raise PeerError(skip_reason(bundle_precision) or f"no builder precision for {bundle_precision}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cmd = (sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(qwen3_dir), "-o", str(out),
           "-p", p, "-e", execution_provider, "-c", str(out / "cache"))
    log = out / "builder.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0 or not (out / "genai_config.json").is_file():
        tail = [l for l in log.read_text(errors="replace").splitlines() if l.strip()][-1:] or ["no output"]
        raise PeerError(f"ONNX Runtime GenAI's builder failed (exit {rc}) on {qwen3_dir}: {tail[0][:200]} (log: {log})")
    return PeerBuild(out, p, time.perf_counter() - t0, cmd)


class OrtGenaiDecoder:
    """A built model, timed one decode step at a time after a prefill of ``ctx`` tokens."""

    def __init__(self, model_dir: str | Path):
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(model_dir))

    def decode_step_at(self, ctx: int, steps: int, vocab: int = 256) -> Callable[[], None]:
        """Prefill ``ctx`` token ids, then return one decode step (the model on the last token, then a
        greedy pick), good for ``steps`` calls. The first call only picks from the prefill's logits, so
        callers warm up with at least one call. The KV buffer is sized to the run (``ctx + steps + 1``),
        as a deployment sizes it to its longest reply."""
        og = self.og
        params = og.GeneratorParams(self.model)
        n = ctx + steps + 1
        # min_length: an end-of-sequence token picked by chance must not end the timed run
        params.set_search_options(max_length=n, min_length=n, do_sample=False)
        gen = og.Generator(self.model, params)
        gen.append_tokens(np.random.default_rng(0).integers(0, vocab, ctx).astype(np.int32))
        return gen.generate_next_token


@dataclass
class OrtGenaiPeer:
    decoder: OrtGenaiDecoder
    build: PeerBuild
    weight_bytes: int  # of the Qwen3 folder it was built from


PEER_MARKER = ".emma-bench-peer"


def _claim(work: Path) -> Path:
    """``--peer-dir`` is rewritten on every run: it must be new, empty, or one this command made (its
    marker file); anything else is a user's folder and is refused, not written into."""
    if work.exists() and (not work.is_dir() or (any(work.iterdir()) and not (work / PEER_MARKER).is_file())):
        raise PeerError(f"{work}: exists and is not a peer folder emma-bench made (no {PEER_MARKER}): give a new or empty --peer-dir")
    work.mkdir(parents=True, exist_ok=True)
    (work / PEER_MARKER).write_text("written by emma-bench --peer; rewritten on every run\n")
    return work


def prepare(bundle_dir: str | Path, work_dir: str | Path, model=None) -> OrtGenaiPeer:
    """The bundle's Und branch as a Qwen3 folder (``work_dir/qwen3``), built at the bundle's precision
    (``work_dir/ort-genai-<p>``) and loaded. ``model``: the bundle's reference model when the caller
    has it already (else read from the bundle's checkpoint or seed). Raises PeerError with the reason
    when no peer can be built."""
    from emma_runtime.bundle import Bundle

    from .qwen3_folder import write_bundle_qwen3

    bundle = Bundle.load(bundle_dir)
    precision = bundle.manifest.precision
    reason = skip_reason(precision)
    if reason:
        raise PeerError(reason)
    work = _claim(Path(work_dir))
    folder = write_bundle_qwen3(bundle, work / "qwen3", model=model)
    built = build(folder.path, work / f"ort-genai-{builder_precision(precision)}", precision)
    return OrtGenaiPeer(OrtGenaiDecoder(built.path), built, folder.weight_bytes)


__all__ = ["OrtGenaiPeer", "prepare", "BUILDER_PRECISION", "PeerError", "PeerBuild", "builder_precision", "skip_reason", "build", "OrtGenaiDecoder"]
