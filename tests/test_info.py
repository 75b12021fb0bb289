"""`emma-run info`: the bundle, the machine, and the verdict per way of running."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

from emma_runtime.info import GIB, KV_ROWS, ComponentRow, EngineRow, Gpu, Machine, summarize_bundle, verdicts

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "emma_runtime.cli", "info", *args], capture_output=True, text=True, cwd=ROOT)


def test_info_reports_the_bundle_and_the_machine(tiny_bundle):
    r = _cli("--bundle", str(tiny_bundle))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for text in ("config     tiny", "precision  fp32", "checksums  verified", "backbone_und", "und_expert_1", "machine",
                 "onnxruntime", "can run here"):
        assert text in out, text
    assert any(line.split()[:3] == ["ort", "cpu", "yes"] for line in out.splitlines())

    d = json.loads(_cli("--bundle", str(tiny_bundle), "--json").stdout)
    b = d["bundle"]
    assert b["checksums"] == "verified" and b["config_name"] == "tiny"
    sizes = {c["name"]: c["bytes"] for c in b["components"]}
    assert sizes["backbone_und"] == (tiny_bundle / "backbone_und.onnx").stat().st_size
    m = b["model"]
    assert b["kv_cache_bytes"] == 2 * m["num_layers"] * m["num_kv_heads"] * m["head_dim"] * 4 * m["max_context"] * KV_ROWS
    assert [v["way"] for v in d["verdicts"]] == ["ort cpu", "ort cuda", "ort tensorrt", "trt engines"]
    assert "CPUExecutionProvider" in d["machine"]["providers"]


def test_info_on_a_tampered_bundle_reports_and_fails(tiny_bundle, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle, broken)
    (broken / "gen_head.onnx").write_bytes(b"garbage")
    (broken / "ort-trt-cache").mkdir(exist_ok=True)
    for old in (broken / "ort-trt-cache").iterdir():
        old.unlink()
    (broken / "ort-trt-cache" / "lm_head_1.engine").write_bytes(b"0" * 2048)
    r = _cli("--bundle", str(broken))
    assert r.returncode == 2
    assert "checksums  FAILED" in r.stdout and "TensorRT provider cache: 1 files, 0.00 MiB" in r.stdout
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "gen_head.onnx: sha256 mismatch" in r.stderr
    r = _cli("--bundle", str(tmp_path / "nope"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "no such bundle directory" in r.stderr


def _with_engines(summary, cc: str, flavour: str = "tensorrt", engine_bytes: int = 100 * 2**20):
    rows = [dataclasses.replace(c, engine=EngineRow(f"{c.name}.engine", engine_bytes, "rtx-ada", cc, flavour))
            for c in summary.components]
    return dataclasses.replace(summary, components=rows)


def _machine(cc: str | None, free_gb: float = 20.0) -> Machine:
    gpus = [Gpu(0, "Test GPU", cc, int(24 * GIB), int(free_gb * GIB))] if cc else []
    return Machine("1.32.0", {"onnxruntime-gpu": "1.32.0"}, ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                   "CPUExecutionProvider"], {"tensorrt": "10.9"}, "12.8", gpus, "test", 64 * GIB, 32 * GIB)


def test_engine_verdicts_compare_compute_capability_and_memory(tiny_bundle):
    s = summarize_bundle(tiny_bundle)
    by_way = lambda vs: {v.way: v for v in vs}
    v = by_way(verdicts(s, _machine("8.6")))
    assert v["ort cpu"].runnable and v["ort cuda"].runnable and v["ort tensorrt"].runnable
    assert not v["trt engines"].runnable and "no engines" in v["trt engines"].reason

    v = by_way(verdicts(_with_engines(s, "8.9"), _machine("8.6")))["trt engines"]
    assert not v.runnable and "compute capability 8.9" in v.reason and "is 8.6" in v.reason
    v = by_way(verdicts(_with_engines(s, "8.9"), _machine("8.9")))["trt engines"]
    assert v.runnable and v.needs_bytes == len(s.components) * 100 * 2**20 + s.kv_cache_bytes
    v = by_way(verdicts(_with_engines(s, "8.9", engine_bytes=2 * GIB), _machine("8.9", free_gb=10)))["trt engines"]
    assert not v.runnable and "needs" in v.reason
    v = by_way(verdicts(_with_engines(s, "8.9", flavour="tensorrt-rtx"), _machine("8.9")))["trt engines"]
    assert not v.runnable and "tensorrt-rtx" in v.reason and "emma-runtime[trt-rtx]" in v.reason
    v = by_way(verdicts(dataclasses.replace(s, precision="fp8"), _machine("8.6")))
    assert v["ort cuda"].runnable and not v["ort tensorrt"].runnable and "FP8 tensor cores" in v["ort tensorrt"].reason
    assert by_way(verdicts(dataclasses.replace(s, precision="fp8"), _machine("9.0")))["ort tensorrt"].runnable
    v = by_way(verdicts(s, _machine(None)))
    assert v["ort cpu"].runnable and not v["ort cuda"].runnable and "no GPU" in v["ort cuda"].reason
    assert isinstance(s.components[0], ComponentRow)
