"""`emma-export pack`: a bundle folder into one archive for a device (`emma-run unpack` there)."""

from __future__ import annotations

import sys

import click

from emma_runtime.cli_support import Finite  # noqa: F401

from ..config import CONFIGS, get_config  # noqa: F401
from ..targets import PRECISIONS, TargetError, list_targets, load_target  # noqa: F401
from .app import fail as _fail  # noqa: F401
from .app import gib, main  # noqa: F401


@main.command()
@click.argument("bundle_dir", metavar="BUNDLE", type=click.Path(file_okay=False))
@click.argument("archive", type=click.Path(dir_okay=False))
@click.option("--quiet", is_flag=True, help="No progress bar.")
def pack(bundle_dir, archive, quiet):
    """Pack a bundle folder into one file (.tar, or .tar.gz) for a device: `emma-run unpack` there."""
    from emma_runtime.bundle import BundleError
    from emma_runtime.pack import PackError, pack_bundle

    try:
        r = pack_bundle(bundle_dir, archive, progress=not quiet and sys.stderr.isatty())
    except (BundleError, PackError) as e:
        _fail(str(e))
    click.echo(f"packed {bundle_dir} -> {r.archive} ({r.files} files, {r.bytes / 2**20:.1f} MiB, checksums verified, "
               f"{r.seconds:.1f} s)")
