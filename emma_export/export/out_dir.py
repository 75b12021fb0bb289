"""Output folders: a user's folder is theirs; a bundle is replaced only by a complete new one.

Every writer (export, build, quantize, init) builds its result in a hidden temporary sibling of
``--out`` and calls ``replace_dir`` at the end. ``check_out`` runs before any work and refuses a
destination whose contents this tool did not write, unless the user passed ``--overwrite``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

# What marks a folder as this tool's own, rebuildable output. Only bundles have one: a checkpoint may
# hold hours of training, so an existing one is replaced only with --overwrite.
MARKERS = {"bundle": ("manifest.json", "created_by", "emma-export")}


class OutDirError(FileExistsError):
    """The destination cannot be written without losing something; the message says what to do."""


def _ours(path: Path, kind: str) -> bool:
    if kind not in MARKERS:
        return False
    file, key, value = MARKERS[kind]
    f = path / file
    if not f.is_file() or f.is_symlink():
        return False
    try:
        return json.loads(f.read_text()).get(key) == value
    except (OSError, ValueError, AttributeError):
        return False


def check_out(out: str | Path, kind: str = "bundle", overwrite: bool = False) -> Path:
    """The absolute destination, after refusing what would lose a user's files (before any work)."""
    out = Path(os.path.abspath(out))
    cwd = Path.cwd().resolve()
    real = out.resolve()
    if real == cwd or real in cwd.parents or real == Path(real.anchor):
        raise OutDirError(f"{out}: is the current folder or one above it; name a new folder for the {kind}")
    if out.is_symlink():
        raise OutDirError(f"{out}: is a symbolic link; name a real folder for the {kind}")
    if out.exists():
        if not out.is_dir():
            raise OutDirError(f"{out}: exists and is not a folder; name a new folder for the {kind}")
        if any(out.iterdir()) and not _ours(out, kind) and not overwrite:
            raise OutDirError(f"{out}: exists and is not a {kind} written by emma-export; "
                              f"pass --overwrite to replace it (its contents are deleted) or name a new folder")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise OutDirError(f"{out}: cannot create it ({parent} is not a writable folder)")
    return out


def temp_sibling(out: Path, tag: str) -> Path:
    """A hidden temporary folder beside ``out`` (same file system, so the final rename is atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{tag}-", dir=out.parent))


@contextmanager
def _signals_held():
    """SIGINT/SIGTERM wait until the swap is done: no moment leaves neither the old nor the new folder."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    except (AttributeError, ValueError):  # not the main thread's business, or no such call here
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def replace_dir(src: Path, dst: Path) -> None:
    """Moves the finished folder ``src`` to ``dst``; an existing ``dst`` (checked by ``check_out``) is
    removed only once the new one is in place."""
    with _signals_held():
        if dst.exists() or dst.is_symlink():
            old = dst.with_name(f".{dst.name}.old-{int(time.time() * 1000)}")
            dst.rename(old)
            src.rename(dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            src.rename(dst)
