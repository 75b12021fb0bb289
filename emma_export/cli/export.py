"""`emma-export export`: every component to ONNX, one bundle."""

from __future__ import annotations

import time

import click

from emma_runtime.cli_support import Finite  # noqa: F401

from ..config import CONFIGS, get_config  # noqa: F401
from .app import fail as _fail  # noqa: F401
from .app import main


@main.command("export")
@click.option("--config", "config_name", type=click.Choice(list(CONFIGS)), default=None, help="Model config (default: tiny, or the checkpoint's).")
@click.option("--checkpoint", type=click.Path(exists=True), default=None, help="EMMA checkpoint (.safetensors file or folder); random weights if absent.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True, help="Seed of the random weights.")
@click.option("--component", "only", multiple=True, help="Export only these components (repeatable).")
@click.option("--tasks", "tasks", multiple=True, type=click.Choice(["understand", "generate", "edit"]),
              help="A task-subset bundle: only the components these tasks use (repeatable; default: every task).")
@click.option("--attention", type=click.Choice(["standard", "gqa"]), default="standard", show_default=True,
              help="The Und backbone's graph: standard ONNX operators (every runtime and TensorRT) or ONNX Runtime's "
                   "fused GroupQueryAttention (faster decode on ONNX Runtime; build --target cpu picks it).")
@click.option("--out", required=True, type=click.Path(), help="Bundle directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace --out even if it is not a bundle written by emma-export.")
@click.option("--quiet", is_flag=True)
def export_cmd(config_name, checkpoint, dtype, seed, only, tasks, attention, out, overwrite, quiet):
    """Export every EMMA component to ONNX and write a bundle with manifest.json."""

    from ..components import components_for
    from ..export.bundle_writer import export_bundle
    from ..export.out_dir import check_out
    from ..export.source import WeightSource

    check_out(out, "bundle", overwrite)  # before any work
    src = WeightSource.from_args(config_name, checkpoint, seed)
    if only and tasks:
        _fail("--component and --tasks both choose components: give one of them")
    try:
        comps = components_for(src.cfg, tasks, attention)
    except ValueError as e:
        _fail(str(e))
    if only:
        unknown = set(only) - {c.name for c in comps}
        if unknown:
            _fail(f"unknown component(s) {sorted(unknown)}; choose from {[c.name for c in comps]}")
        comps = [c for c in comps if c.name in only]
    t0 = time.perf_counter()
    rep = export_bundle(src, out, dtype=dtype, components=comps, progress=not quiet, overwrite=overwrite, tasks=tuple(tasks),
                        attention=attention)
    click.echo(f"wrote {rep.out} ({len(comps)} components, {dtype}) in {time.perf_counter() - t0:.1f} s")
