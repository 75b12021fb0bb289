"""`emma-export engines`: TensorRT engines for a target, recorded in the manifest."""

from __future__ import annotations

import time

import click

from emma_runtime.cli_support import Finite  # noqa: F401

from ..config import CONFIGS, get_config  # noqa: F401
from ..targets import PRECISIONS, TargetError, list_targets, load_target  # noqa: F401
from .app import fail as _fail  # noqa: F401
from .app import gib, main  # noqa: F401


@main.command()
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--target", "target_name", required=True, help=f"One of {', '.join(list_targets() + ['auto'])}.")
@click.option("--component", "only", multiple=True, help="Build only these components (repeatable).")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True, help="Builder optimization level.")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None,
              help="Timing cache file (full TensorRT only; default: one per target under ~/.cache/emma-deploy).")
@click.option("--workspace-gb", type=Finite(), default=None, help="Builder workspace limit.")
def engines(bundle_dir, target_name, only, opt_level, timing_cache, workspace_gb):
    """Build a TensorRT (or TensorRT-RTX) engine per component of an existing bundle for a target."""
    from emma_runtime.bundle import BundleError

    from ..trt.builder import EngineBuildError, TrtUnavailable, build_engines

    try:
        target = load_target(target_name)
    except TargetError as e:
        _fail(str(e))
    t0 = time.perf_counter()

    def progress(name, r):
        click.echo(f"{name:<14} {r.engine_bytes / 2**20:8.2f} MiB  {r.build_seconds:6.2f} s")

    try:
        results = build_engines(bundle_dir, target, components=list(only) or None, opt_level=opt_level,
                                timing_cache=timing_cache, workspace_gb=workspace_gb, echo=click.echo, progress=progress)
    except (TargetError, TrtUnavailable, EngineBuildError, BundleError) as e:
        _fail(str(e))
    if results:
        total = sum(r.engine_bytes for r in results)
        click.echo(f"built {len(results)} engine(s) for {target.name} ({target.flavour}, compute capability "
                   f"{target.compute_capability}), {total / 2**20:.1f} MiB, in {time.perf_counter() - t0:.1f} s")
