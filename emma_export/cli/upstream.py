"""`emma-export init` and `emma-export conformance`: EMMA from (and against) Qwen3, SigLIP and DC-AE.

transformers and diffusers (the ``upstream`` extra) are needed by ``conformance`` only; ``init`` reads
the upstream folders' JSON configs and safetensors itself.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import click

from .app import fail as _fail
from .app import gib, main
from ..config import CONFIGS

_DIR = click.Path(exists=True, file_okay=False, dir_okay=True)


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise click.BadParameter(f"{text!r} is not a size like 2GB, 500MB or 123456")
    unit = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2).upper()]
    return int(float(m.group(1)) * unit)


def _choices(fn):
    """EMMA's own choices for upstream folders of a size no named config has (paper defaults)."""
    opts = [
        click.option("--name", default=None, help="Name of a derived config (default: custom)."),
        click.option("--shared-layers", type=click.IntRange(0), default=None, help="Shallow LLM layers with shared Q/K (default: half, as 18 + 18)."),
        click.option("--expert-layers", type=click.IntRange(0), default=None, help="Last ViT layers per MoE expert (default: 3, a third of shallower ViTs)."),
        click.option("--experts", "num_experts", type=click.IntRange(1, 64), default=2, show_default=True, help="Understanding experts (versatile, STEM)."),
        click.option("--reference-branch", type=click.Choice(["gen", "und"]), default="gen", show_default=True, help="Branch of the edit reference image."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _make_choices(name, shared_layers, expert_layers, num_experts, reference_branch):
    from ..weights.upstream import EmmaChoices

    return EmmaChoices(name=name, shared_layers=shared_layers, expert_layers=expert_layers, num_experts=num_experts,
                       reference_branch=reference_branch)


def _describe(cfg) -> str:
    l, v = cfg.llm, cfg.vision
    return (f"LLM {l.hidden_size} wide, {l.shared_layers} shared + {l.decoupled_layers} decoupled layers, "
            f"{l.num_attention_heads}/{l.num_key_value_heads} heads; ViT {v.trunk_layers} trunk + {v.expert_layers} x "
            f"{v.num_experts} expert layers, patch {v.patch_size} x shuffle {v.shuffle}; {cfg.ae.latent_channels} latent "
            f"channels, {cfg.cell} px per token")


@main.command("init")
@click.option("--llm", "llm_dir", required=True, type=_DIR, help="Qwen3 folder: config.json, safetensors (sharded ok), tokenizer.json.")
@click.option("--vision", "vision_dir", required=True, type=_DIR, help="SigLIP folder (SiglipVisionModel or SiglipModel).")
@click.option("--ae", "ae_dir", required=True, type=_DIR, help="DC-AE folder (diffusers AutoencoderDC).")
@click.option("--config", "config_name", type=click.Choice(list(CONFIGS)), default=None, help="EMMA config the upstream must match (default: the named config it matches, else one derived from the upstream).")
@_choices
@click.option("--out", required=True, type=click.Path(), help="EMMA checkpoint folder to write.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True, help="Seed of the fresh tensors (adapters, router, timestep MLP).")
@click.option("--dtype", type=click.Choice(["keep", "fp32", "bf16", "fp16"]), default="keep", show_default=True, help="keep: each upstream tensor's dtype (fresh ones fp32).")
@click.option("--shard-size", default="2GB", show_default=True, help="Largest shard (a bigger tensor gets its own).")
@click.option("--overwrite", is_flag=True, help="Replace an existing, non-empty --out.")
@click.option("--json", "json_out", type=click.Path(), default=None, help="Write the init report as JSON.")
def init_cmd(llm_dir, vision_dir, ae_dir, config_name, name, shared_layers, expert_layers, num_experts, reference_branch,
             out, seed, dtype, shard_size, overwrite, json_out):
    """Write an EMMA checkpoint initialised from upstream Qwen3, SigLIP and DC-AE checkpoints."""
    from ..init_checkpoint import init_checkpoint
    from ..weights.keymap import KeyMapError
    from ..weights.upstream import UpstreamError

    try:
        rep = init_checkpoint(
            llm_dir, vision_dir, ae_dir, config_name, out, seed=seed, shard_bytes=_size(shard_size),
            dtype=None if dtype == "keep" else dtype, overwrite=overwrite,
            progress=lambda msg: click.echo(f"  {msg}", err=True),
            choices=_make_choices(name, shared_layers, expert_layers, num_experts, reference_branch),
        )
    except (UpstreamError, KeyMapError, FileExistsError, OSError, ValueError) as e:
        _fail(str(e))
    p = rep.plan
    from ..weights.checkpoint import read_config

    click.echo(f"config {rep.config} ({_describe(read_config(rep.out))}), written to {Path(rep.out) / 'config.json'}")
    click.echo(f"config {rep.config}: {p['upstream_mapped']} upstream tensors -> {p['emma_from_upstream']} EMMA tensors, "
               f"{p['emma_fresh']} fresh, {p['upstream_dropped']} upstream dropped")
    for reason, n in rep.dropped.items():
        click.echo(f"  dropped {n}: {reason}")
    click.echo(f"  {rep.lm_head}")
    for w in rep.tokenizer_warnings:
        click.echo(f"warning: {w}", err=True)
    click.echo(f"wrote {rep.out}: {rep.tensors} tensors, {gib(rep.bytes)} GiB in {len(rep.shards)} shard(s), "
               f"{rep.seconds:.1f} s, peak RSS {gib(rep.peak_rss_bytes)} GiB")
    if json_out:
        Path(json_out).write_text(json.dumps(rep.to_dict(), indent=2))


@main.command("conformance")
@click.option("--llm", "llm_dir", required=True, type=_DIR, help="Qwen3 folder.")
@click.option("--vision", "vision_dir", required=True, type=_DIR, help="SigLIP folder.")
@click.option("--ae", "ae_dir", required=True, type=_DIR, help="DC-AE folder.")
@click.option("--checkpoint", type=click.Path(exists=True), default=None, help="EMMA checkpoint to check (default: initialise EMMA from the upstream in memory).")
@click.option("--config", "config_name", type=click.Choice(list(CONFIGS)), default=None, help="EMMA config the upstream must match.")
@_choices
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True, help="Seed of the fresh tensors (in-memory init).")
@click.option("--json", "json_out", type=click.Path(), default=None, help="Write the report as JSON.")
def conformance_cmd(llm_dir, vision_dir, ae_dir, checkpoint, config_name, name, shared_layers, expert_layers, num_experts,
                    reference_branch, seed, json_out):
    """Compare EMMA (Und branch + LM head, understanding encoder, autoencoder) with Qwen3, SigLIP and DC-AE."""
    from rich.console import Console
    from rich.table import Table

    from ..conformance import run_conformance
    from ..weights.checkpoint import CheckpointError
    from ..weights.keymap import KeyMapError
    from ..weights.upstream import UpstreamError

    try:
        rep = run_conformance(llm_dir, vision_dir, ae_dir, checkpoint=checkpoint, config_name=config_name, seed=seed,
                              choices=_make_choices(name, shared_layers, expert_layers, num_experts, reference_branch))
    except (UpstreamError, KeyMapError, CheckpointError, ImportError, OSError, ValueError) as e:
        _fail(str(e))
    source = checkpoint or "in-memory init"
    t = Table(title=f"conformance ({rep.config}, {source})")
    for col in ("component", "max abs", "rel L2", "tolerance", "pass"):
        t.add_column(col)
    for r in rep.rows:
        t.add_row(r.component, f"{r.max_abs:.3g}", f"{r.rel_l2:.3g}", f"{r.tolerance:.3g}", "yes" if r.passed else "[red]NO")
    Console().print(t)
    if json_out:
        Path(json_out).write_text(json.dumps(rep.to_dict(), indent=2))
    if not rep.passed:
        for name in rep.failures:
            click.echo(f"FAIL {name}", err=True)
        sys.exit(1)
    click.echo("conformance: passed")
