"""A bundle as one file: ``pack`` (on the build machine) and ``unpack`` (on the device).

The archive is a tar (``.tar``, or gzip'd ``.tar.gz``/``.tgz``) holding exactly ``manifest.json``
and the files it lists, named relative to the bundle root. It is untrusted input: ``unpack`` checks
every member's header before writing a byte (only regular files and folders; relative, normalised
names; no links, devices or FIFOs; sizes within limits; nothing the manifest does not list), writes
into a temporary folder beside the destination, loads it with ``Bundle.load`` (the same path and
sha256 rules as a bundle folder) and only then renames it into place. A failed unpack leaves
nothing behind, and an existing folder is replaced only when asked.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .bundle import MANIFEST, MAX_MANIFEST_BYTES, Bundle, BundleError, Manifest
from .paths import UnsafePathError, check_name

GIB = 2**30
_CHUNK = 1 << 22


class PackError(ValueError):
    """A bad archive or destination; the message names the file and the member."""


@dataclass(frozen=True)
class UnpackLimits:
    """What an archive may hold. The defaults fit EMMA-4B at fp32 with engines, with room."""

    max_members: int = 4096
    max_total_bytes: int = 256 * GIB
    max_member_bytes: int = 64 * GIB
    max_manifest_bytes: int = MAX_MANIFEST_BYTES


@dataclass(frozen=True)
class PackReport:
    archive: Path
    files: int
    bytes: int
    seconds: float


def _mode(path: Path, writing: bool) -> str:
    name = path.name.lower()
    if name.endswith((".tar.gz", ".tgz")):
        return "w:gz" if writing else "r:gz"
    if name.endswith(".tar"):
        return "w" if writing else "r:"
    raise PackError(f"{path}: the archive must end in .tar, .tar.gz or .tgz")


class _Progress:
    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)

    def update(self, n: int) -> None:
        if self.bar:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar:
            self.bar.close()


class _CountingReader:
    """A file wrapper that reports bytes read, so a multi-GB graph moves the bar as it goes."""

    def __init__(self, f: BinaryIO, progress: _Progress):
        self.f, self.progress = f, progress

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.progress.update(len(b))
        return b


def bundle_files(manifest: Manifest) -> list[str]:
    """``manifest.json`` first (an unpacker reads it before anything else), then each listed file once."""
    names = [MANIFEST]
    for f, _ in manifest.files():
        if f not in names:
            names.append(f)
    return names


def pack_bundle(src: str | Path, archive: str | Path, progress: bool = False) -> PackReport:
    """Writes the bundle folder ``src`` (checksums verified first) into ``archive``, atomically."""
    t0 = time.perf_counter()
    src, archive = Path(src), Path(archive)
    mode = _mode(archive, writing=True)
    bundle = Bundle.load(src)
    names = bundle_files(bundle.manifest)
    paths = {n: bundle.path(n) if n != MANIFEST else src / MANIFEST for n in names}  # confined, links resolved
    sizes = {n: p.stat().st_size for n, p in paths.items()}
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(archive.name + ".partial")
    bar = _Progress(sum(sizes.values()), f"pack {archive.name}", progress)
    try:
        with tarfile.open(partial, mode, format=tarfile.PAX_FORMAT) as tar:
            for n in names:
                st = paths[n].stat()  # the archive holds the bytes, never a link
                ti = tarfile.TarInfo(n)
                ti.size, ti.mtime, ti.mode = st.st_size, int(st.st_mtime), 0o644
                with open(paths[n], "rb") as f:
                    tar.addfile(ti, _CountingReader(f, bar))
        os.replace(partial, archive)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    return PackReport(archive, len(names), sum(sizes.values()), time.perf_counter() - t0)


# ---- unpack -------------------------------------------------------------------------------------

def member_name(archive: Path, m: tarfile.TarInfo) -> str:
    """The member's name, checked as a manifest's file names are (relative, normalised, inside the
    bundle). A leading ``./`` (what ``tar -C bundle -cf b.tar .`` writes) is dropped; ``""`` is the
    archive's own root folder."""
    raw = m.name
    name = raw[2:] if raw.startswith("./") else raw
    name = name.rstrip("/") if m.isdir() else name
    if m.isdir() and name in ("", "."):
        return ""
    try:
        return check_name(name, f"{archive}: member {raw!r}")
    except UnsafePathError as e:
        raise PackError(str(e)) from None


def check_members(archive: Path, members: Iterable[tarfile.TarInfo], limits: UnpackLimits
                  ) -> tuple[list[tarfile.TarInfo], dict[str, tarfile.TarInfo]]:
    """Every member's header checked as it is read, so a hostile archive stops at its first bad
    header (a member claiming terabytes is refused before the reader skips over its data).
    Returns the members in archive order and {name: member} of the regular files."""
    seen: list[tarfile.TarInfo] = []
    files: dict[str, tarfile.TarInfo] = {}
    dirs: set[str] = set()
    total = 0
    it = iter(members)
    while True:
        try:
            m = next(it)
        except StopIteration:
            break
        except (tarfile.TarError, OSError, EOFError) as e:
            raise PackError(f"{archive}: corrupt tar archive ({e})") from None
        seen.append(m)
        if len(seen) > limits.max_members:
            raise PackError(f"{archive}: more than {limits.max_members} members, the limit")
        name = member_name(archive, m)
        where = f"{archive}: member {m.name!r}"
        if m.isdir():
            if name in files:
                raise PackError(f"{where}: is both a file and a folder")
            dirs.add(name)
            continue
        if not m.isreg() or m.issparse():
            kind = ("a symbolic link" if m.issym() else "a hard link" if m.islnk() else "a device" if m.ischr() or m.isblk()
                    else "a FIFO" if m.isfifo() else "a sparse file" if m.issparse() else f"type {m.type!r}")
            raise PackError(f"{where}: {kind}; a bundle archive holds only regular files and folders")
        if name in files or name in dirs:
            raise PackError(f"{where}: appears twice")
        if m.size > limits.max_member_bytes:
            raise PackError(f"{where}: {m.size / GIB:.1f} GiB, more than the limit of {limits.max_member_bytes / GIB:.1f} GiB")
        total += m.size
        if total > limits.max_total_bytes:
            raise PackError(f"{archive}: more than the limit of {limits.max_total_bytes / GIB:.1f} GiB in all")
        files[name] = m
    return seen, files


def _read_manifest(archive: Path, tar: tarfile.TarFile, files: dict[str, tarfile.TarInfo], limits: UnpackLimits) -> Manifest:
    m = files.get(MANIFEST)
    if m is None:
        raise PackError(f"{archive}: no {MANIFEST} at the archive's root (not a packed EMMA bundle)")
    if m.size > limits.max_manifest_bytes:
        raise PackError(f"{archive}: {MANIFEST} is {m.size} bytes, more than the limit of {limits.max_manifest_bytes}")
    f = tar.extractfile(m)
    try:
        text = f.read().decode("utf-8")
    except UnicodeDecodeError:
        raise PackError(f"{archive}: {MANIFEST} is not UTF-8 text") from None
    return Manifest.from_json(text, f"{archive}:{MANIFEST}")


def _extract(tar: tarfile.TarFile, m: tarfile.TarInfo, root: Path, name: str, bar: _Progress) -> None:
    target = root / name
    if root.resolve() not in target.resolve().parents:  # the name checks already ensure it; cheap to re-check
        raise PackError(f"member {m.name!r} resolves outside the destination")
    target.parent.mkdir(parents=True, exist_ok=True)
    src = tar.extractfile(m)
    left = m.size
    with open(target, "xb") as dst:  # "x": never through an existing file or link
        while left:
            block = src.read(min(_CHUNK, left))
            if not block:
                raise PackError(f"member {m.name!r}: the archive ends inside it (truncated)")
            dst.write(block)
            left -= len(block)
            bar.update(len(block))
    os.chmod(target, 0o644)


def unpack_bundle(archive: str | Path, dest: str | Path, overwrite: bool = False, limits: UnpackLimits = UnpackLimits(),
                  progress: bool = False) -> Bundle:
    """Unpacks ``archive`` into the folder ``dest`` (which must not exist unless ``overwrite``) and
    returns the loaded bundle. Raises ``PackError`` or ``BundleError`` with one line; on any failure
    nothing is left at ``dest`` (or the old folder is left as it was)."""
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise PackError(f"{archive}: no such archive file")
    if (dest.exists() or dest.is_symlink()) and not overwrite:
        raise PackError(f"{dest}: already exists (pass --force to replace it)")
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise PackError(f"{dest}: exists and is not a folder; refusing to replace it")
    try:
        tar = tarfile.open(archive, _mode(archive, writing=False))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise PackError(f"{archive}: not a readable tar archive ({e})") from None
    with tar:
        members, files = check_members(archive, tar, limits)
        manifest = _read_manifest(archive, tar, files, limits)
        listed = bundle_files(manifest)
        extra = sorted(set(files) - set(listed))
        if extra:
            raise PackError(f"{archive}: member {extra[0]!r} is not listed in its {MANIFEST} (a bundle archive holds only those files)")
        missing = [n for n in listed if n not in files]
        if missing:
            raise PackError(f"{archive}: {missing[0]!r}, listed in its {MANIFEST}, is not in the archive")
        dest.parent.mkdir(parents=True, exist_ok=True)
        need = sum(m.size for m in files.values())
        free = shutil.disk_usage(dest.parent).free
        if need > free:
            raise PackError(f"{dest.parent}: {need / GIB:.2f} GiB needed, {free / GIB:.2f} GiB free")
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.unpack-", dir=dest.parent))
        bar = _Progress(need, f"unpack {archive.name}", progress)
        try:
            for m in members:  # archive order: one pass over a gzip stream
                name = member_name(archive, m)
                if name in files:
                    _extract(tar, m, tmp, name, bar)
            Bundle.load(tmp)  # the folder rules: confinement and every sha256
            os.chmod(tmp, 0o755)  # mkdtemp's folder is private; the bundle is not
            if dest.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
                os.replace(dest, old / dest.name)
                os.replace(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, dest)
        except BundleError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise BundleError(f"{archive}: {str(e).replace(str(tmp), '<archive>')}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            bar.close()
    return Bundle.load(dest, check_files=False)  # every file was checked in the temporary folder
