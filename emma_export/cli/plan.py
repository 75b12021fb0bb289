"""`emma-export plan`: memory plans (weights, KV cache, activations) against a target."""

from __future__ import annotations

import json

import click

from emma_runtime.cli_support import Finite  # noqa: F401

from ..config import CONFIGS, get_config  # noqa: F401
from ..targets import PRECISIONS, TargetError, list_targets, load_target  # noqa: F401
from .app import fail as _fail  # noqa: F401
from .app import gib, main  # noqa: F401


def _target_names() -> list[str]:
    return list_targets() + ["auto"]






@main.command()
@click.option("--config", "config_name", type=click.Choice(list(CONFIGS)), default="emma-4b", show_default=True)
@click.option("--precision", type=click.Choice(list(PRECISIONS)), required=True)
@click.option("--target", "target_name", required=True, help=f"One of {', '.join(_target_names())}.")
@click.option("--context", type=click.IntRange(1), default=None, help="Tokens per sequence the KV cache holds (default: the config's max_context).")
@click.option("--image", type=click.IntRange(1), default=None, help="Image side in pixels (default: the config's image size).")
@click.option("--cfg-mode", type=click.Choice(["batch", "sequential"]), default="batch", show_default=True,
              help="How the runtime runs classifier-free guidance (batch keeps a stacked copy of the prefix caches).")
@click.option("--tasks", "tasks", multiple=True, type=click.Choice(["understand", "generate", "edit"]),
              help="Count only the components these tasks use (a task-subset bundle; repeatable).")
@click.option("--kv-cache", "kv_cache", type=click.Choice(["auto", "fp32", "fp16", "int8", "fp8"]), default="auto", show_default=True,
              help="The KV cache's dtype (build --kv-cache). auto: the precision's default (fp32 for fp32, fp8 for fp8, else fp16).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plan(config_name, precision, target_name, context, image, cfg_mode, tasks, kv_cache, as_json):
    """Memory plan: weights per component, KV cache, activations, and the fit on each memory variant."""
    from ..plan import KV_CACHE_BYTES, kv_rows, phase_kv_rows, plan_memory

    try:
        target = load_target(target_name)
        p = plan_memory(get_config(config_name), precision, target, context=context, image=image, cfg_mode=cfg_mode,
                        tasks=tuple(tasks), kv_cache=kv_cache)
    except (TargetError, ValueError) as e:
        _fail(str(e))
    if as_json:
        click.echo(json.dumps(p.to_dict(), indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    only = f" ({', '.join(p.tasks)} only)" if p.tasks else ""
    t = Table(title=f"EMMA {p.config}{only} at {p.precision} on {p.target}: memory (GiB), weights per graph (MB)")
    t.add_column("item")
    t.add_column("parameters", justify="right")
    # the weight bytes by how the policy stores them (weight_bytes.WeightBytes)
    for col in ("weights MB", "quantized", "scales", "high", "kept fp32", "tables", "GiB"):
        t.add_column(col, justify="right")
    mb = lambda n: f"{n / 1e6:,.3f}" if n else "-"
    for k, b in p.weights.items():
        d = p.weights_detail.get(k, {})
        t.add_row(k, f"{p.parameters[k]:,}", mb(b), *(mb(d.get(c, 0)) for c in ("quantized", "scales", "high", "kept_fp32", "tables")), gib(b))
    t.add_row("[bold]weights", f"{sum(p.parameters.values()):,}", f"[bold]{mb(p.weights_total)}", "", "", "", "", "", f"[bold]{gib(p.weights_total)}")
    kv_b = KV_CACHE_BYTES[p.kv_cache_dtype]
    t.add_row(f"KV cache {p.kv_cache_dtype} ({kv_b} B/value, {p.context} tokens, {kv_rows(p.cfg_mode, p.tasks)} rows, "
              f"{p.cfg_mode} guidance)", "", "", "", "", "", "", "", gib(p.kv_cache))
    phase = max(p.activations, key=p.activations.get)
    t.add_row(f"activations (peak: {phase})", "", "", "", "", "", "", "", gib(p.activation_peak))
    rows = phase_kv_rows(p.cfg_mode, p.tasks)[p.peak_phase]
    t.add_row(f"peak phase: {p.peak_phase} (its activations + {rows} KV rows)", "", "", "", "", "", "", "", gib(p.phases[p.peak_phase]))
    t.add_row("[bold]total (weights + peak phase)", "", "", "", "", "", "", "", f"[bold]{gib(p.total)}")
    con = Console(width=max(Console().width, 140))  # the table reads badly wrapped
    con.print(t)
    click.echo(f"policy: {p.policy}")
    saved = f", the tied embedding stored once ({p.stored_once / 1e6:,.1f} MB less)" if p.stored_once else \
        (", the tied embedding twice (the LM head is quantized apart at this precision)" if "lm_head" in p.weights else "")
    click.echo(f"bundle on disk: {gib(p.bundle_weights)} GiB of weights ({p.bundle_weights / 1e9:.3f} GB){saved}")
    for v in p.variants:
        verdict = f"fits ({v.headroom_gb:.1f} GiB spare)" if v.fits else f"does NOT fit: {v.advice}"
        click.echo(f"{v.memory_gb:g} GB ({v.usable_gb:g} usable): {verdict}")
