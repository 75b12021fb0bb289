"""`emma-run understand | generate | edit`: EMMA's tasks on a bundle, without torch."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .cli_support import Finite, OneLineGroup, fail
from .images import check_input, check_output, save_png
from .limits import Limits

_L = Limits()


def _common(f):
    f = click.option("--quiet", is_flag=True, help="No progress bars.")(f)
    f = click.option("--json", "as_json", is_flag=True, help="Print a JSON result.")(f)
    f = click.option("--seed", type=click.IntRange(0, _L.max_seed), default=0, show_default=True)(f)
    f = click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"], case_sensitive=False), default=None,
                     help="ONNX Runtime provider (default: best available).")(f)
    f = click.option("--backend", type=click.Choice(["ort", "trt"]), default="ort", show_default=True)(f)
    f = click.option("--bundle", required=True, type=click.Path(), help="Bundle directory (emma-export export/build).")(f)
    return f


def _image_out(f):
    f = click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")(f)
    f = click.option("--steps", type=click.IntRange(1, _L.max_steps), default=None, help="Denoising steps (default: the bundle's).")(f)
    f = click.option("--shift", type=Finite(0.0, _L.max_shift, open_lo=True), default=None, help="Timestep shift (default: the bundle's).")(f)
    return f


def _pipeline(bundle, backend, provider, quiet):
    """The public API's Pipeline: the CLI is a thin layer over what a Python user calls."""
    from .api import Pipeline

    try:
        return Pipeline.load(bundle, backend=backend, providers=provider, progress=not quiet)
    except (ValueError, ImportError, RuntimeError) as e:  # BundleError is a ValueError; a missing backend
        fail(str(e))


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Run EMMA bundles: understand images, generate and edit them."""


@main.command()
@_common
@click.option("--image", required=True, type=click.Path(),
              help="JPEG/PNG/WebP; each side to the nearest multiple of 32, scaled down to the bundle's largest size.")
@click.option("--prompt", required=True)
@click.option("--max-new-tokens", type=click.IntRange(1, _L.max_new_tokens), default=32, show_default=True)
@click.option("--temperature", type=Finite(0.0, _L.max_temperature), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=Finite(0.0, 1.0, open_lo=True), default=1.0, show_default=True)
def understand(bundle, backend, provider, seed, as_json, quiet, image, prompt, max_new_tokens, temperature, top_p):
    """Answer a question about an image."""
    _L.prompt(prompt)
    check_input(image)
    p = _pipeline(bundle, backend, provider, quiet)
    r = p.understand_result(image, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    if as_json:
        click.echo(json.dumps({"text": r.text, "token_ids": r.token_ids, "expert": r.expert,
                               "visual_tokens": r.visual_tokens, "timings": r.timings}))
    else:
        # repr when the answer has no printable text (e.g. a random-weight model's bytes).
        click.echo(r.text if r.text.strip() and r.text.isprintable() else f"{r.text!r} (token ids {r.token_ids})")


@main.command()
@_common
@_image_out
@click.option("--prompt", required=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG to write.")
@click.option("--height", type=click.IntRange(1), default=None, help="Multiple of 32 (default: the bundle's size).")
@click.option("--width", type=click.IntRange(1), default=None, help="Multiple of 32 (default: the bundle's size).")
@click.option("--cfg", type=Finite(-_L.max_guidance, _L.max_guidance), default=None, help="Classifier-free guidance scale.")
def generate(bundle, backend, provider, seed, as_json, quiet, prompt, out, height, width, steps, cfg, shift, overwrite):
    """Text to image."""
    _L.prompt(prompt)
    check_output(out, overwrite)  # before the work, not after it
    p = _pipeline(bundle, backend, provider, quiet)
    r = p.generate_result(prompt, width, height, seed, steps=steps, cfg=cfg, shift=shift)
    save_png(r.image, out)
    _report_image(r, out, as_json)


@main.command()
@_common
@_image_out
@click.option("--image", required=True, type=click.Path())
@click.option("--prompt", required=True, help="The edit instruction.")
@click.option("--out", required=True, type=click.Path(dir_okay=False))
@click.option("--cfg-text", type=Finite(-_L.max_guidance, _L.max_guidance), default=None)
@click.option("--cfg-image", type=Finite(-_L.max_guidance, _L.max_guidance), default=None)
def edit(bundle, backend, provider, seed, as_json, quiet, image, prompt, out, steps, cfg_text, cfg_image, shift, overwrite):
    """Edit an image following an instruction."""
    _L.prompt(prompt)
    check_input(image)
    check_output(out, overwrite)
    p = _pipeline(bundle, backend, provider, quiet)
    r = p.edit_result(image, prompt, seed, steps=steps, cfg_text=cfg_text, cfg_image=cfg_image, shift=shift)
    save_png(r.image, out)
    _report_image(r, out, as_json)


def _report_image(r, out, as_json):
    if as_json:
        click.echo(json.dumps({"out": str(Path(out)), "visual_tokens": r.visual_tokens, "timings": r.timings,
                               "height": int(r.image.shape[2]), "width": int(r.image.shape[3])}))
    else:
        click.echo(f"wrote {out} ({r.image.shape[3]}x{r.image.shape[2]}, {r.visual_tokens} visual tokens)")


from .cli_unpack import unpack_command  # noqa: E402  (device-side commands, one module each)
from .info import info_command  # noqa: E402
from .serve.command import serve  # noqa: E402  (FastAPI, uvicorn and Ray load only when it runs)

main.add_command(info_command)
main.add_command(unpack_command)
main.add_command(serve)

if __name__ == "__main__":
    main()
