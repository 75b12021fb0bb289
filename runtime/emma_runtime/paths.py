"""Files named by untrusted folders (a bundle's manifest, a checkpoint's index): confined and verified.

A name is accepted only if it is a plain relative path (no absolute path, drive, backslash, ``.`` or
``..`` part, NUL) that resolves, symlinks followed, to a regular file inside the folder. Contents are
read once through one descriptor that is checked to be a regular file before anything is read (a FIFO
or device would block or never end), hashed from the same bytes, and those bytes are what the caller
uses: nothing can change between the check and the use.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import stat
from pathlib import Path


class UnsafePathError(ValueError):
    """A path that escapes its folder, is not a regular file, or is too large; the message names it."""


def check_name(name: object, what: str) -> str:
    """``name`` as a normalised relative POSIX path, or UnsafePathError naming ``what``."""
    if not isinstance(name, str) or not name:
        raise UnsafePathError(f"{what}: file name must be a non-empty string, got {name!r}")
    if "\x00" in name or "\\" in name:
        raise UnsafePathError(f"{what}: file name {name!r} contains a NUL or backslash")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafePathError(f"{what}: file name {name!r} is absolute; bundle paths are relative to the bundle folder")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts) or posixpath.normpath(name) != name:
        raise UnsafePathError(f"{what}: file name {name!r} is not a normalised path inside the folder (no '.', '..' or empty parts)")
    return name


def confined(root: Path, name: object, what: str, max_bytes: int | None = None) -> Path:
    """The resolved path of ``name`` under ``root``, checked: inside ``root`` after following symlinks,
    a regular file, at most ``max_bytes`` long."""
    name = check_name(name, what)
    base = Path(root).resolve()
    target = base / name
    try:
        real = target.resolve(strict=True)
    except FileNotFoundError:
        raise UnsafePathError(f"{target}: missing file ({what})") from None
    except (OSError, RuntimeError) as e:  # symlink loops, permissions
        raise UnsafePathError(f"{target}: cannot resolve ({what}): {e}") from None
    if real != base and base not in real.parents:
        raise UnsafePathError(f"{target}: resolves to {real}, outside {base} ({what}); a folder's files must stay inside it")
    st = os.stat(real)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(f"{target}: not a regular file ({what})")
    if max_bytes is not None and st.st_size > max_bytes:
        raise UnsafePathError(f"{target}: {st.st_size} bytes, more than the limit of {max_bytes} ({what})")
    return real


@contextlib.contextmanager
def _regular_fd(path: Path, what: str, max_bytes: int | None):
    """One descriptor on ``path``, checked to be a regular file within ``max_bytes`` before anything is
    read (O_NONBLOCK: opening a FIFO swapped in after a check must not block); yields (fd, size)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise UnsafePathError(f"{path}: cannot open ({what}): {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(f"{path}: not a regular file ({what})")
        if max_bytes is not None and st.st_size > max_bytes:
            raise UnsafePathError(f"{path}: {st.st_size} bytes, more than the limit of {max_bytes} ({what})")
        yield fd, st.st_size
    finally:
        os.close(fd)


def read_regular(path: Path, what: str, max_bytes: int | None = None) -> bytearray:
    """The bytes of a regular file, through one checked descriptor. A bytearray, not bytes: no second
    copy of a large weight file."""
    with _regular_fd(path, what, max_bytes) as (fd, size):
        buf = bytearray(size)
        view, got = memoryview(buf), 0
        while got < len(buf):
            n = os.readv(fd, [view[got:]])
            if n == 0:
                raise UnsafePathError(f"{path}: shrank while being read ({what})")
            got += n
        if os.read(fd, 1):
            raise UnsafePathError(f"{path}: grew while being read ({what})")
        return buf


def sha256_regular(path: Path, what: str, max_bytes: int | None = None, chunk: int = 1 << 24) -> str:
    """The sha256 of a regular file, read through one checked descriptor in chunks: checking a bundle
    must not hold its largest file (an emma-4b backbone's 14.5 GB of weights) in memory. For bytes that
    will be used, ``read_regular`` and hash those."""
    with _regular_fd(path, what, max_bytes) as (fd, size):
        h, got = hashlib.sha256(), 0
        while block := os.read(fd, chunk):
            h.update(block)
            got += len(block)
            if got > size:
                raise UnsafePathError(f"{path}: grew while being read ({what})")
        if got < size:
            raise UnsafePathError(f"{path}: shrank while being read ({what})")
        return h.hexdigest()


def sha256_bytes(data) -> str:
    return hashlib.sha256(data).hexdigest()
