"""Bundle archives: `emma-export pack` then `emma-run unpack`, and every way a hostile archive is refused."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from emma_runtime.bundle import MANIFEST, Bundle, BundleError
from emma_runtime.pack import PackError, UnpackLimits, bundle_files, pack_bundle, unpack_bundle

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def packed(tiny_bundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "tiny.tar"
    pack_bundle(tiny_bundle, out)
    return out


def _members(path: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(path) as t:
        return [(m, t.extractfile(m).read() if m.isreg() else None) for m in t.getmembers()]


def _write(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        for m, data in members:
            t.addfile(m, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    m = tarfile.TarInfo(name)
    m.size = len(data)
    return m, data


def test_pack_then_unpack_round_trips(tiny_bundle, packed, tmp_path):
    names = [m.name for m, _ in _members(packed)]
    assert names == bundle_files(Bundle.load(tiny_bundle).manifest)  # manifest first, only listed files
    (tiny_bundle / "ort-trt-cache").mkdir(exist_ok=True)  # a machine's provider cache is never packed
    b = unpack_bundle(packed, tmp_path / "b")
    assert b.root == tmp_path / "b"
    for n in names:
        assert (tmp_path / "b" / n).read_bytes() == (tiny_bundle / n).read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_gzip_archive_round_trips(tiny_bundle, tmp_path):
    pack_bundle(tiny_bundle, tmp_path / "t.tar.gz")
    unpack_bundle(tmp_path / "t.tar.gz", tmp_path / "b")
    Bundle.load(tmp_path / "b")


def test_existing_destination_needs_force(packed, tmp_path):
    dest = tmp_path / "b"
    dest.mkdir()
    (dest / "keep").write_text("old")
    with pytest.raises(PackError, match="already exists"):
        unpack_bundle(packed, dest)
    assert (dest / "keep").read_text() == "old"
    unpack_bundle(packed, dest, overwrite=True)
    assert not (dest / "keep").exists() and (dest / MANIFEST).exists()


@pytest.mark.parametrize("case,match", [
    ("absolute", "is absolute"),
    ("dotdot", "not a normalised path"),
    ("unnormalised", "not a normalised path"),
    ("symlink", "symbolic link"),
    ("hardlink", "hard link"),
    ("fifo", "FIFO"),
    ("device", "a device"),
    ("duplicate", "appears twice"),
    ("unlisted", "is not listed in its manifest.json"),
    ("missing", "is not in the archive"),
    ("no_manifest", "no manifest.json"),
])
def test_hostile_members_are_refused_before_anything_is_written(packed, tmp_path, case, match):
    members = _members(packed)
    regular = members[1][0].name  # tokenizer or a graph: a listed file
    if case == "absolute":
        members.append(_file("/etc/evil", b"x"))
    elif case == "dotdot":
        members.append(_file("../evil", b"x"))
    elif case == "unnormalised":
        members.append(_file("a//b", b"x"))
    elif case in ("symlink", "hardlink"):
        m = tarfile.TarInfo("link")
        m.type, m.linkname = (tarfile.SYMTYPE if case == "symlink" else tarfile.LNKTYPE), "/etc/passwd"
        members.append((m, None))
    elif case == "fifo":
        m = tarfile.TarInfo("pipe")
        m.type = tarfile.FIFOTYPE
        members.append((m, None))
    elif case == "device":
        m = tarfile.TarInfo("dev")
        m.type = tarfile.CHRTYPE
        members.append((m, None))
    elif case == "duplicate":
        members.append(_file(regular, b"replacement"))
    elif case == "unlisted":
        members.append(_file("ort-trt-cache/x.engine", b"x"))
    elif case == "missing":
        members = [x for x in members if x[0].name != regular]
    elif case == "no_manifest":
        members = [x for x in members if x[0].name != MANIFEST]
    bad = _write(tmp_path / f"{case}.tar", members)
    with pytest.raises(PackError, match=match):
        unpack_bundle(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == [bad.name]  # nothing extracted anywhere


def test_size_limits(packed, tmp_path):
    with pytest.raises(PackError, match="more than the limit"):
        unpack_bundle(packed, tmp_path / "a", limits=UnpackLimits(max_total_bytes=1000))
    with pytest.raises(PackError, match="more than the limit"):
        unpack_bundle(packed, tmp_path / "a", limits=UnpackLimits(max_member_bytes=1000))
    with pytest.raises(PackError, match="more than 3 members"):
        unpack_bundle(packed, tmp_path / "a", limits=UnpackLimits(max_members=3))
    assert not (tmp_path / "a").exists()


def test_a_member_claiming_terabytes_is_refused_from_its_header(tmp_path):
    """Only the header is written (the archive is a few KB): the check must not read on."""
    huge = tarfile.TarInfo("ae_encoder.onnx")
    huge.size = 4 * 2**40
    bad = tmp_path / "huge.tar"
    bad.write_bytes(huge.tobuf(tarfile.PAX_FORMAT))
    with pytest.raises(PackError, match="more than the limit of 64.0 GiB"):
        unpack_bundle(bad, tmp_path / "out")


def test_tampered_file_fails_its_checksum_and_leaves_nothing(packed, tmp_path):
    members = _members(packed)
    m, data = members[-1]
    members[-1] = _file(m.name, data[:-1] + bytes([data[-1] ^ 1]))
    bad = _write(tmp_path / "tampered.tar", members)
    with pytest.raises(BundleError, match="sha256 mismatch"):
        unpack_bundle(bad, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == [bad.name]


def test_truncated_archive_is_one_clear_error(packed, tmp_path):
    bad = tmp_path / "cut.tar"
    bad.write_bytes(packed.read_bytes()[: packed.stat().st_size // 2])
    with pytest.raises((PackError, BundleError)):
        unpack_bundle(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pack_refuses_a_corrupt_bundle(tiny_bundle, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    (copy / manifest["tokenizer"]["file"]).write_text("{}")
    with pytest.raises(BundleError, match="sha256 mismatch"):
        pack_bundle(copy, tmp_path / "x.tar")
    assert not (tmp_path / "x.tar").exists() and not (tmp_path / "x.tar.partial").exists()


def test_cli_pack_and_unpack(tiny_bundle, tmp_path):
    env_py = [sys.executable, "-c"]
    pack = "import sys; from emma_export.cli import main; sys.argv[0] = 'emma-export'; main()"
    r = subprocess.run(env_py + [pack, "pack", str(tiny_bundle), str(tmp_path / "t.tar"), "--quiet"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "checksums verified" in r.stdout
    run = [sys.executable, "-m", "emma_runtime.cli", "unpack"]
    r = subprocess.run(run + [str(tmp_path / "t.tar"), str(tmp_path / "b"), "--quiet"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(run + [str(tmp_path / "t.tar"), str(tmp_path / "b")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: {tmp_path / 'b'}: already exists (pass --force to replace it)"]
