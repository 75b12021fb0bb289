"""`emma-export verify`: a bundle against the PyTorch reference."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from emma_runtime.cli_support import Finite  # noqa: F401

from ..config import CONFIGS, get_config  # noqa: F401
from .app import fail as _fail  # noqa: F401
from .app import main


@main.command()
@click.option("--bundle", "bundle_dir", required=True, type=click.Path())
@click.option("--json", "json_out", type=click.Path(), default=None, help="Write the report as JSON.")
@click.option("--e2e", is_flag=True, help="Also run the bundle's pipelines (a task-subset bundle's own tasks) through the runtime and the reference.")
@click.option("--checkpoint", type=click.Path(exists=True), default=None, help="Reference weights (default: the bundle's source).")
def verify(bundle_dir, json_out, e2e, checkpoint):
    """Compare every component (and with --e2e every pipeline) of a bundle with the PyTorch reference."""

    from rich.console import Console
    from rich.table import Table

    from ..verify import verify_bundle

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
    if rep.pipelines:
        click.echo(f"e2e: checked end to end: {', '.join(rep.pipelines)}")
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
