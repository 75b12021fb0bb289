"""`emma-export info`: parameters per component, from a config on the meta device."""

from __future__ import annotations

import json

import click

from emma_runtime.cli_support import Finite  # noqa: F401

from ..config import CONFIGS, get_config  # noqa: F401
from .app import fail as _fail  # noqa: F401
from .app import main


@main.command()
@click.option("--config", "config_name", type=click.Choice(list(CONFIGS)), default="tiny", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def info(config_name: str, as_json: bool) -> None:
    """Parameters per component and in total (no weights are allocated)."""
    from ..info import model_info

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
