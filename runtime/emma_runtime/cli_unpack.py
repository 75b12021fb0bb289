"""`emma-run unpack ARCHIVE DEST`: a packed bundle (``emma-export pack``) into a folder, checked.

It lives in the runtime's CLI because unpacking happens on the device, which installs only
emma-runtime.
"""

from __future__ import annotations

import sys

import click

from .bundle import BundleError
from .pack import GIB, PackError, UnpackLimits, unpack_bundle


@click.command("unpack")
@click.argument("archive", type=click.Path(dir_okay=False))
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Replace DEST if it exists (only once the new bundle is fully checked).")
@click.option("--max-gb", type=float, default=UnpackLimits.max_total_bytes / GIB, show_default=True,
              help="Refuse archives holding more than this in all.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def unpack_command(archive, dest, force, max_gb, quiet):
    """Unpack a bundle archive (.tar, .tar.gz) into DEST, checking every member and every sha256."""
    limits = UnpackLimits(max_total_bytes=int(max_gb * GIB), max_member_bytes=min(UnpackLimits.max_member_bytes, int(max_gb * GIB)))
    try:
        bundle = unpack_bundle(archive, dest, overwrite=force, limits=limits, progress=not quiet and sys.stderr.isatty())
    except (PackError, BundleError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    m = bundle.manifest
    click.echo(f"unpacked {archive} -> {dest} ({m.config_name}, {m.precision}, target {m.target}, "
               f"{len(m.files()) + 1} files, checksums verified)")
