"""`emma-run understand | generate | edit`: EMMA's tasks on a bundle, without torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .bundle import BundleError
from .images import ImageError, save_png


def _fail(msg: str):
    click.echo(f"error: {msg}", err=True)
    sys.exit(2)


def _common(f):
    f = click.option("--quiet", is_flag=True, help="No progress bars.")(f)
    f = click.option("--json", "as_json", is_flag=True, help="Print a JSON result.")(f)
    f = click.option("--seed", type=int, default=0, show_default=True)(f)
    f = click.option("--provider", default=None, help="ONNX Runtime provider: cpu, cuda, tensorrt (default: best available).")(f)
    f = click.option("--backend", type=click.Choice(["ort", "trt"]), default="ort", show_default=True)(f)
    f = click.option("--bundle", required=True, type=click.Path(), help="Bundle directory (emma-export export/build).")(f)
    return f


def _pipeline(bundle, backend, provider, quiet):
    from .pipelines import Pipeline

    try:
        return Pipeline.load(bundle, backend=backend, provider=provider, quiet=quiet)
    except (BundleError, ValueError, ImportError, RuntimeError) as e:
        _fail(str(e))


def _guard(fn):
    from .pipelines import RequestError

    try:
        return fn()
    except (RequestError, ImageError, BundleError) as e:
        _fail(str(e))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Run EMMA bundles: understand images, generate and edit them."""


@main.command()
@_common
@click.option("--image", required=True, type=click.Path(), help="JPEG/PNG/WebP; resized to the nearest multiple of 32 per side.")
@click.option("--prompt", required=True)
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
def understand(bundle, backend, provider, seed, as_json, quiet, image, prompt, max_new_tokens, temperature, top_p):
    """Answer a question about an image."""
    p = _pipeline(bundle, backend, provider, quiet)
    r = _guard(lambda: p.understand(image, prompt, max_new_tokens, temperature, top_p, seed))
    if as_json:
        click.echo(json.dumps({"text": r.text, "token_ids": r.token_ids, "expert": r.expert,
                               "visual_tokens": r.visual_tokens, "timings": r.timings}))
    else:
        # repr when the answer has no printable text (e.g. a random-weight model's bytes).
        click.echo(r.text if r.text.strip() and r.text.isprintable() else f"{r.text!r} (token ids {r.token_ids})")


@main.command()
@_common
@click.option("--prompt", required=True)
@click.option("--out", required=True, type=click.Path(), help="PNG to write.")
@click.option("--height", type=int, default=None)
@click.option("--width", type=int, default=None)
@click.option("--steps", type=int, default=None)
@click.option("--cfg", type=float, default=None, help="Classifier-free guidance scale.")
@click.option("--shift", type=float, default=None)
def generate(bundle, backend, provider, seed, as_json, quiet, prompt, out, height, width, steps, cfg, shift):
    """Text to image."""
    p = _pipeline(bundle, backend, provider, quiet)
    r = _guard(lambda: p.generate(prompt, height, width, steps, cfg, shift, seed))
    save_png(r.image, out)
    _report_image(r, out, as_json)


@main.command()
@_common
@click.option("--image", required=True, type=click.Path())
@click.option("--prompt", required=True, help="The edit instruction.")
@click.option("--out", required=True, type=click.Path())
@click.option("--steps", type=int, default=None)
@click.option("--cfg-text", type=float, default=None)
@click.option("--cfg-image", type=float, default=None)
@click.option("--shift", type=float, default=None)
def edit(bundle, backend, provider, seed, as_json, quiet, image, prompt, out, steps, cfg_text, cfg_image, shift):
    """Edit an image following an instruction."""
    p = _pipeline(bundle, backend, provider, quiet)
    r = _guard(lambda: p.edit(image, prompt, steps, cfg_text, cfg_image, shift, seed))
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

main.add_command(info_command)
main.add_command(unpack_command)

if __name__ == "__main__":
    main()
