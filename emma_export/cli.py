"""`emma-export`: the export-side command line."""

from __future__ import annotations

import json
import sys

import click

from emma_runtime.cli_support import USER_ERRORS, OneLineGroup
from emma_runtime.cli_support import fail as _fail

from .config import CONFIGS, get_config


class _ExportGroup(OneLineGroup):
    # the toolchain's own input errors (checkpoints, upstream folders, targets, output folders, builds)
    # are ValueErrors or BuildError; they end as one line and exit 2 like the runtime's
    @property
    def user_errors(self):
        from .build import BuildError

        return USER_ERRORS + (ValueError, BuildError)


@click.group(cls=_ExportGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Export EMMA from PyTorch to ONNX / TensorRT bundles, verify them, and inspect configs."""


@main.command()
@click.option("--config", "config_name", type=click.Choice(list(CONFIGS)), default="tiny", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def info(config_name: str, as_json: bool) -> None:
    """Parameters per component and in total (no weights are allocated)."""
    from .info import model_info

    mi = model_info(get_config(config_name))
    if as_json:
        click.echo(json.dumps(mi.to_dict(), indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"EMMA {mi.config}: parameters")
    t.add_column("component")
    t.add_column("parameters", justify="right")
    for k, v in mi.parameters.items():
        t.add_row(k, f"{v:,}")
    t.add_row("[bold]total", f"[bold]{mi.total:,}")
    t.add_row("LLM stored", f"{mi.llm_stored:,}")
    t.add_row("LLM active per token", f"{mi.llm_active_per_token:,}")
    Console().print(t)


@main.command("export")
@click.option("--config", "config_name", type=click.Choice(list(CONFIGS)), default=None, help="Model config (default: tiny, or the checkpoint's).")
@click.option("--checkpoint", type=click.Path(exists=True), default=None, help="EMMA checkpoint (.safetensors file or folder); random weights if absent.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--component", "only", multiple=True, help="Export only these components (repeatable).")
@click.option("--tasks", "tasks", multiple=True, type=click.Choice(["understand", "generate", "edit"]),
              help="A task-subset bundle: only the components these tasks use (repeatable; default: every task).")
@click.option("--out", required=True, type=click.Path(), help="Bundle directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace --out even if it is not a bundle written by emma-export.")
@click.option("--quiet", is_flag=True)
def export_cmd(config_name, checkpoint, dtype, seed, only, tasks, out, overwrite, quiet):
    """Export every EMMA component to ONNX and write a bundle with manifest.json."""
    import time
    from pathlib import Path

    from .components import components_for
    from .export.bundle_writer import export_bundle
    from .export.out_dir import check_out
    from .export.source import WeightSource

    check_out(out, "bundle", overwrite)  # before any work
    src = WeightSource.from_args(config_name, checkpoint, seed)
    if only and tasks:
        _fail("--component and --tasks both choose components: give one of them")
    comps = components_for(src.cfg, tasks)
    if only:
        unknown = set(only) - {c.name for c in comps}
        if unknown:
            _fail(f"unknown component(s) {sorted(unknown)}; choose from {[c.name for c in comps]}")
        comps = [c for c in comps if c.name in only]
    t0 = time.perf_counter()
    rep = export_bundle(src, out, dtype=dtype, components=comps, progress=not quiet, overwrite=overwrite, tasks=tuple(tasks))
    click.echo(f"wrote {rep.out} ({len(comps)} components, {dtype}) in {time.perf_counter() - t0:.1f} s")


@main.command()
@click.option("--bundle", "bundle_dir", required=True, type=click.Path())
@click.option("--json", "json_out", type=click.Path(), default=None, help="Write the report as JSON.")
@click.option("--e2e", is_flag=True, help="Also run the three pipelines through the runtime and the reference.")
@click.option("--checkpoint", type=click.Path(exists=True), default=None, help="Reference weights (default: the bundle's source).")
def verify(bundle_dir, json_out, e2e, checkpoint):
    """Compare every component (and with --e2e every pipeline) of a bundle with the PyTorch reference."""
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from .verify import verify_bundle

    rep = verify_bundle(bundle_dir, e2e=e2e, checkpoint=checkpoint)
    t = Table(title=f"parity: {bundle_dir}")
    for col in ("component", "max abs", "rel L2", "tolerance", "pass"):
        t.add_column(col)
    for name, r in rep.components.items():
        t.add_row(name, f"{r.max_abs:.3g}", f"{r.rel_l2:.3g}", f"{r.tolerance:g}", "yes" if r.passed else "[red]NO")
    Console().print(t)
    if rep.trt_parse:
        ok = sum(v == "ok" for v in rep.trt_parse.values())
        click.echo(f"TensorRT parser ({rep.trt_parser}): {ok}/{len(rep.trt_parse)} graphs parse")
    else:
        click.echo(f"TensorRT parser: {rep.trt_parser}")
    for name, p in rep.pipelines.items():
        click.echo(f"pipeline {name}: " + ", ".join(f"{k}={v}" for k, v in p.items() if k != "reason") + ("" if p["passed"] else f"  FAILED: {p['reason']}"))
    if json_out:
        import json

        Path(json_out).write_text(json.dumps(rep.to_dict(), indent=2))
    for f in rep.failures:
        click.echo(f"FAIL {f}", err=True)
    if not rep.passed:
        sys.exit(1)
    click.echo("verify: passed")


from . import cli_upstream  # noqa: E402,F401
from . import cli_build  # noqa: E402,F401
from . import cli_shapes  # noqa: E402,F401
from . import cli_quant  # noqa: E402,F401

if __name__ == "__main__":
    main()
