"""`emma-export build | quantize | calibrate`: the quantization side of the command line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from .app import fail as _fail
from .app import main
from ..config import CONFIGS
from ..quantize.policy import PRECISIONS

_precision = click.option("--precision", type=click.Choice(list(PRECISIONS)), default="fp8", show_default=True)
_target = click.option("--target", "target", default="cpu", show_default=True, help="Deployment target (engines/targets/*.json, or auto).")
_recipe = click.option("--recipe", type=click.Choice(["full", "quick", "scale"]), default="full", show_default=True,
                       help="How much of calibration/ to run through the reference pipelines.")
_calib = click.option("--calibration", type=click.Path(exists=True, file_okay=False), default=None,
                      help="Folder of calibration .npz (emma-export calibrate) instead of capturing now.")
_samples = click.option("--calib-samples", type=click.IntRange(1, 100_000), default=64, show_default=True, help="Calibration feeds per component (at most).")
_kv_cache = click.option(
    "--kv-cache", "kv_cache", type=click.Choice(["auto", "fp32", "fp16", "int8", "fp8"]), default="auto", show_default=True,
    help="The backbones' KV cache. auto: float32 as exported; int8/fp8: 1 byte per value, one scale per layer for keys "
         "and values from calibration (the graphs quantize and dequantize). fp8 uses the standard Und graph on the cpu.")
_overwrite = click.option("--overwrite", is_flag=True, help="Replace --out even if it is not a bundle written by emma-export.")


_only = click.option(
    "--component", "only", multiple=True,
    help="Quantize only this component (repeatable); the others stay at the target's high precision. "
         "One at a time is how a precision's task loss is traced to a component.")
_task_eval = click.option(
    "--task-eval-n", "task_eval_n", type=click.IntRange(min=0), default=50, show_default=True,
    help="shapes-world models: held-out scenes for the task figures in the report (0: skip).")


def _run_build(**kw) -> None:
    from ..build import BuildError, build, print_report
    from ..targets import TargetError

    t0 = time.perf_counter()
    json_out = kw.pop("json_out", None)
    try:
        rep = build(echo=click.echo, **kw)
    except TargetError as e:
        _fail(str(e))
    except BuildError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    print_report(rep)
    if json_out:
        Path(json_out).write_text(json.dumps(rep.to_dict(), indent=2))
    for f in rep.failures:
        click.echo(f"FAIL {f}", err=True)
    click.echo(f"wrote {rep.out} ({rep.precision}, {rep.target}) in {time.perf_counter() - t0:.1f} s" + ("" if rep.passed else " (FORCED: verify failed)"))


@main.command()
@click.option("--config", "config_name", type=click.Choice(list(CONFIGS)), default=None, help="Model config (default: tiny, or the checkpoint's).")
@click.option("--checkpoint", type=click.Path(exists=True), default=None, help="EMMA checkpoint; random weights if absent.")
@_precision
@_target
@click.option("--out", required=True, type=click.Path(), help="Bundle directory to write.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True, help="Seed of the random weights.")
@_recipe
@_calib
@_samples
@click.option("--no-verify", "no_verify", is_flag=True, help="Skip parity checks (the bundle is not verified).")
@click.option("--no-e2e", "no_e2e", is_flag=True, help="Skip the end-to-end comparison with the fp32 pipeline.")
@click.option("--no-engines", "no_engines", is_flag=True, help="Do not build TensorRT engines even if the target has them.")
@click.option("--force", is_flag=True, help="Write the bundle even if verify fails.")
@click.option("--json", "json_out", type=click.Path(), default=None, help="Write the build report as JSON.")
@_task_eval
@_only
@click.option("--tasks", "tasks", multiple=True, type=click.Choice(["understand", "generate", "edit"]),
              help="A task-subset bundle: only the components these tasks use (repeatable; default: every task).")
@_overwrite
@click.option("--attention", type=click.Choice(["auto", "standard", "gqa"]), default="auto", show_default=True,
              help="The Und backbone's graph. auto: ONNX Runtime's fused GroupQueryAttention on an ONNX Runtime target "
                   "(the cpu), standard ONNX operators elsewhere (TensorRT parses only those).")
@_kv_cache
@click.option("--quiet", is_flag=True)
def build(config_name, checkpoint, precision, target, out, seed, recipe, calibration, calib_samples, no_verify, no_e2e, no_engines, force, json_out, task_eval_n, only, tasks, overwrite, attention, kv_cache, quiet):
    """Export -> calibrate -> quantize -> engines -> verify, into one bundle (atomic)."""
    _run_build(config_name=config_name, checkpoint=checkpoint, precision=precision, target=target, out=out, seed=seed,
               recipe=recipe, calibration=calibration, calib_samples=calib_samples, verify=not no_verify, e2e=not no_e2e,
               engines=not no_engines, force=force, json_out=json_out, progress=not quiet, task_eval_n=task_eval_n, only=only,
               tasks=tuple(tasks), overwrite=overwrite, attention=None if attention == "auto" else attention, kv_cache=kv_cache)


@main.command()
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(exists=True, file_okay=False), help="An fp32 bundle (emma-export export).")
@_precision
@_target
@click.option("--out", required=True, type=click.Path(), help="Bundle directory to write.")
@click.option("--checkpoint", type=click.Path(exists=True), default=None, help="Reference weights (default: the bundle's source).")
@_recipe
@_calib
@_samples
@click.option("--no-verify", "no_verify", is_flag=True)
@click.option("--no-e2e", "no_e2e", is_flag=True)
@click.option("--no-engines", "no_engines", is_flag=True)
@click.option("--force", is_flag=True, help="Write the bundle even if verify fails.")
@click.option("--json", "json_out", type=click.Path(), default=None)
@_task_eval
@_only
@_overwrite
@_kv_cache
def quantize(bundle_dir, precision, target, out, checkpoint, recipe, calibration, calib_samples, no_verify, no_e2e, no_engines, force, json_out, task_eval_n, only, overwrite, kv_cache):
    """Quantize an existing fp32 bundle into a new bundle (calibrate -> quantize -> engines -> verify)."""
    _run_build(source_bundle=bundle_dir, checkpoint=checkpoint, precision=precision, target=target, out=out,
               recipe=recipe, calibration=calibration, calib_samples=calib_samples, verify=not no_verify, e2e=not no_e2e,
               engines=not no_engines, force=force, json_out=json_out, task_eval_n=task_eval_n, only=only, overwrite=overwrite,
               kv_cache=kv_cache)


@main.command()
@click.option("--config", "config_name", type=click.Choice(list(CONFIGS)), default=None)
@click.option("--checkpoint", type=click.Path(exists=True), default=None)
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True)
@_recipe
@click.option("--out", required=True, type=click.Path(), help="Folder for <component>.npz calibration feeds.")
def calibrate(config_name, checkpoint, seed, recipe, out):
    """Run the reference pipelines on calibration/ (prompts, scikit-image photographs) and save every
    component's inputs, in its graph's IO layout, as <component>.npz."""
    from ..export.source import WeightSource
    from ..quantize.calibrate import capture, check_complete, save
    from ..tokenizer import byte_level_tokenizer

    try:
        src = WeightSource.from_args(config_name, checkpoint, seed)
    except (ValueError, OSError) as e:
        _fail(str(e))
    t0 = time.perf_counter()
    model = src.full_model()
    if src.tokenizer_file is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(src.tokenizer_file))
    else:
        tok = byte_level_tokenizer(src.cfg.llm.vocab_size)
    from ..worlds import load as load_world

    feeds = capture(model, tok, recipe, world=load_world(src.world))
    check_complete(src.cfg, feeds)
    files = save(feeds, out)
    for name, f in files.items():
        click.echo(f"{name:14s} {len(feeds[name]):4d} feeds  {f}")
    click.echo(f"calibration written to {out} in {time.perf_counter() - t0:.1f} s")
