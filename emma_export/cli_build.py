"""`emma-export plan` and `emma-export engines`: memory plans and TensorRT engines for a target."""

from __future__ import annotations

import json
import sys
import time

import click

from .cli import main
from .config import CONFIGS, get_config
from .targets import PRECISIONS, TargetError, list_targets, load_target


def _fail(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(2)


def _target_names() -> list[str]:
    return list_targets() + ["auto"]


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


@main.command()
@click.option("--config", "config_name", type=click.Choice(list(CONFIGS)), default="emma-4b", show_default=True)
@click.option("--precision", type=click.Choice(list(PRECISIONS)), required=True)
@click.option("--target", "target_name", required=True, help=f"One of {', '.join(_target_names())}.")
@click.option("--context", type=int, default=None, help="Tokens per sequence the KV cache holds (default: the config's max_context).")
@click.option("--image", type=int, default=None, help="Image side in pixels (default: the config's image size).")
@click.option("--cfg-mode", type=click.Choice(["batch", "sequential"]), default="batch", show_default=True,
              help="How the runtime runs classifier-free guidance (batch keeps a stacked copy of the prefix caches).")
@click.option("--tasks", "tasks", multiple=True, type=click.Choice(["understand", "generate", "edit"]),
              help="Count only the components these tasks use (a task-subset bundle; repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plan(config_name, precision, target_name, context, image, cfg_mode, tasks, as_json):
    """Memory plan: weights per component, KV cache, activations, and the fit on each memory variant."""
    from .plan import kv_rows, plan_memory

    try:
        target = load_target(target_name)
        p = plan_memory(get_config(config_name), precision, target, context=context, image=image, cfg_mode=cfg_mode, tasks=tuple(tasks))
    except (TargetError, ValueError) as e:
        _fail(str(e))
    if as_json:
        click.echo(json.dumps(p.to_dict(), indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    only = f" ({', '.join(p.tasks)} only)" if p.tasks else ""
    t = Table(title=f"EMMA {p.config}{only} at {p.precision} on {p.target}: memory (GiB)")
    t.add_column("item")
    t.add_column("parameters", justify="right")
    t.add_column("GiB", justify="right")
    for k, b in p.weights.items():
        t.add_row(k, f"{p.parameters[k]:,}", _gib(b))
    t.add_row("[bold]weights", f"{sum(p.parameters.values()):,}", f"[bold]{_gib(p.weights_total)}")
    t.add_row(f"KV cache ({p.context} tokens, {kv_rows(p.cfg_mode, p.tasks)} rows, {p.cfg_mode} guidance)", "", _gib(p.kv_cache))
    phase = max(p.activations, key=p.activations.get)
    t.add_row(f"activations (peak: {phase})", "", _gib(p.activation_peak))
    t.add_row("[bold]total", "", f"[bold]{_gib(p.total)}")
    con = Console()
    con.print(t)
    click.echo(f"policy: {p.policy}")
    saved = f", the tied embedding stored once ({p.stored_once / 1e6:,.1f} MB less)" if p.stored_once else \
        (", the tied embedding twice (the LM head is quantized apart at this precision)" if "lm_head" in p.weights else "")
    click.echo(f"bundle on disk: {_gib(p.bundle_weights)} GiB of weights ({p.bundle_weights / 1e9:.3f} GB){saved}")
    for v in p.variants:
        verdict = f"fits ({v.headroom_gb:.1f} GiB spare)" if v.fits else f"does NOT fit: {v.advice}"
        click.echo(f"{v.memory_gb:g} GB ({v.usable_gb:g} usable): {verdict}")


@main.command()
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--target", "target_name", required=True, help=f"One of {', '.join(_target_names())}.")
@click.option("--component", "only", multiple=True, help="Build only these components (repeatable).")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True, help="Builder optimization level.")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None,
              help="Timing cache file (full TensorRT only; default: one per target under ~/.cache/emma-deploy).")
@click.option("--workspace-gb", type=float, default=None, help="Builder workspace limit.")
def engines(bundle_dir, target_name, only, opt_level, timing_cache, workspace_gb):
    """Build a TensorRT (or TensorRT-RTX) engine per component of an existing bundle for a target."""
    from emma_runtime.bundle import BundleError

    from .trt.builder import EngineBuildError, TrtUnavailable, build_engines

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
