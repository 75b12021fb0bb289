"""scripts/emma4b.sh's commands (--dry-run: printed, not run): the two builds the issue names, from
the init checkpoint or, with --random-weights, from seeded weights with no upstream folders."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _out(tmp_path, monkeypatch):
    # the script resumes from what its output folder holds: each test starts from an empty one, not
    # from whatever a real run left in out/emma4b
    monkeypatch.setenv("EMMA4B_OUT", str(tmp_path / "e4b"))
    return tmp_path / "e4b"


def _dry(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/emma4b.sh", "--dry-run", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False, env=os.environ.copy())


def test_the_two_builds_from_the_init_checkpoint():
    r = _dry()
    assert r.returncode == 0, r.stderr
    builds = [line for line in r.stdout.splitlines() if " build " in line]
    assert len(builds) == 3 and all("--checkpoint" in b and "--config emma-4b" in b for b in builds)
    assert "--precision fp8 --target h100" in builds[0] and "--kv-cache int8" in builds[1]
    assert "--precision fp16 --target h100" in builds[2]  # the table's baseline row
    assert "make_tiny_upstream.py" in r.stdout and " init " in r.stdout
    lines = r.stdout.splitlines()
    init = next(i for i, line in enumerate(lines) if " init " in line)
    # the synthetic folders go once init has read them (~9.5 GB the builds need)
    assert lines[init + 1].startswith("+ rm -rf ") and lines[init + 1].endswith("/emma-4b/upstream")


def test_random_weights_skip_the_upstream_folders_and_the_checkpoint():
    r = _dry("--random-weights")
    assert r.returncode == 0, r.stderr
    assert "--checkpoint" not in r.stdout and "make_tiny_upstream.py" not in r.stdout and " init " not in r.stdout
    assert sum(" build " in line for line in r.stdout.splitlines()) == 3


def test_seeded_and_checkpoint_weights_never_share_a_capture(_out):
    # a capture of seeded weights taken for the checkpoint's would calibrate and verify against the wrong model
    cap = [line for line in _dry().stdout.splitlines() if " calibrate " in line]
    cap_random = [line for line in _dry("--random-weights").stdout.splitlines() if " calibrate " in line]
    assert f"--out {_out}/emma-4b/calib.tmp" in cap[0] and f"--out {_out}/emma-4b-random/calib.tmp" in cap_random[0]


def test_a_finished_step_is_kept_and_the_rest_runs(_out):
    run = _out / "emma-4b"
    (run / "checkpoint").mkdir(parents=True)
    (run / "calib").mkdir()
    (run / "calib" / "backbone_und.npz").write_bytes(b"")
    (run / "fp8-h100" / "bundle").mkdir(parents=True)
    (run / "fp8-h100" / "build.json").write_text("{}")
    (run / "fp8-h100" / "bundle" / "manifest.json").write_text("{}")
    (run / "fp8-h100" / "engines.ok").write_text("")
    r = _dry()
    assert r.returncode == 0, r.stderr
    assert "make_tiny_upstream.py" not in r.stdout and " init " not in r.stdout and " calibrate " not in r.stdout
    builds = [line for line in r.stdout.splitlines() if " build " in line]
    assert len(builds) == 2 and "--precision int4w" in builds[0] and "--precision fp16" in builds[1]
    engines = [line for line in r.stdout.splitlines() if " engines " in line]
    assert len(engines) == 2 and "fp8-h100" not in " ".join(engines)
    assert f"build fp8 h100: {run}/fp8-h100/build.json exists, kept" in r.stdout


def test_builds_picks_which_builds_run_and_the_table_has_their_rows(_out):
    r = _dry("--random-weights", "--builds", "int4w fp8")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    builds = [line for line in lines if " build " in line]
    assert len(builds) == 2 and "--precision int4w" in builds[0] and "--precision fp8" in builds[1]
    table = next(line for line in lines if "scale_table.py" in line)
    assert table.endswith(f"{_out}/emma-4b-random/int4w-jetson-orin {_out}/emma-4b-random/fp8-h100")
    bad = _dry("--builds", "fp8 int2")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --builds: unknown build 'int2' (choose from fp8 int4w fp16)"


def test_an_unknown_argument_is_one_line_and_exit_2():
    r = _dry("--fp9")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--fp9" in r.stderr


def test_each_bundle_gets_tensorrt_rtx_engines_after_the_builds(_out):
    # after every build, not after each: a bundle's engines take as much disk as its weights, and the
    # next build's fp32 export needs ~36 GB while it runs
    lines = _dry("--random-weights").stdout.splitlines()
    builds = [i for i, line in enumerate(lines) if " build " in line]
    engines = [i for i, line in enumerate(lines) if " engines " in line]
    assert len(builds) == len(engines) == 3 and builds[2] < engines[0] < engines[1] < engines[2]
    for i, d in zip(engines, ("fp8-h100", "int4w-jetson-orin", "fp16-h100")):
        assert f"--bundle {_out}/emma-4b-random/{d}/bundle --target rtx-ada" in lines[i] and "time-engines.txt" in lines[i]


def test_the_table_reads_what_the_engines_command_left_in_the_manifest(tmp_path):
    import json
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    from scale_table import engine_summary

    run = tmp_path / "fp8-h100"
    (run / "bundle").mkdir(parents=True)
    eng = {"target": "rtx-ada", "build_seconds": 40.0, "builder_peak_rss": 3 * 2**30}
    comps = {"a": {"engine": eng}, "b": {"engine": {**eng, "builder_peak_rss": 11 * 2**30}},
             "c": {"engine": None, "engine_on_device": "the builder needs about 30 GiB"}}
    (run / "bundle" / "manifest.json").write_text(json.dumps({"components": comps}))
    assert engine_summary(run) == ""  # no engines command was run: the build's own column stands
    (run / "time-engines.txt").write_text("\tMaximum resident set size (kbytes): 12582912\n"
                                          "\tElapsed (wall clock) time (h:mm:ss or m:ss): 2:30.00\n")
    assert engine_summary(run) == ("2 rtx-ada, 80 s building, builder peak 11.00 GiB (command 2.5 min, 12.00 GiB); "
                                   "on the device: c")


def test_the_table_takes_the_build_reports_bytes_when_the_weights_are_gone(tmp_path):
    """emma-4b's three bundles and the fp32 export of the next build do not fit this machine's disk
    together: a finished bundle's weights may be deleted (its manifest and build.json kept) and its
    row keeps the size the build measured."""
    import json
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    from scale_table import row

    run = tmp_path / "fp8-h100"
    (run / "bundle").mkdir(parents=True)
    comps = {"a": {"file": "a.onnx", "data_files": [["a.onnx.data", "x"]]}}
    (run / "bundle" / "manifest.json").write_text(json.dumps({"components": comps}))
    (run / "build.json").write_text(json.dumps({"bundle_bytes": 9_000_000_000, "rows": []}))
    (run / "plan.json").write_text(json.dumps({"bundle_weights": 8_000_000_000}))
    assert "9.00 GB / 8.00 GB (+12.5 %)" in row(run)
    (run / "bundle" / "a.onnx").write_bytes(b"x" * 10)
    (run / "bundle" / "a.onnx.data").write_bytes(b"x" * 30)
    assert "0.00 GB / 8.00 GB (-100.0 %)" in row(run)  # the files, when they are there
