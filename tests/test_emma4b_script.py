"""scripts/emma4b.sh's commands (--dry-run: printed, not run): the two builds the issue names, from
the init checkpoint or, with --random-weights, from seeded weights with no upstream folders."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _dry(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/emma4b.sh", "--dry-run", *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def test_the_two_builds_from_the_init_checkpoint():
    r = _dry()
    assert r.returncode == 0, r.stderr
    builds = [line for line in r.stdout.splitlines() if " build " in line]
    assert len(builds) == 2 and all("--checkpoint" in b and "--config emma-4b" in b for b in builds)
    assert "--precision fp8 --target h100" in builds[0] and "--kv-cache int8" in builds[1]
    assert "make_tiny_upstream.py" in r.stdout and " init " in r.stdout


def test_random_weights_skip_the_upstream_folders_and_the_checkpoint():
    r = _dry("--random-weights")
    assert r.returncode == 0, r.stderr
    assert "--checkpoint" not in r.stdout and "make_tiny_upstream.py" not in r.stdout and " init " not in r.stdout
    assert sum(" build " in line for line in r.stdout.splitlines()) == 2


def test_an_unknown_argument_is_one_line_and_exit_2():
    r = _dry("--fp9")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--fp9" in r.stderr
