"""`emma-run serve`: the OpenAI-compatible server, in one process or as a Ray Serve deployment."""

from __future__ import annotations

import click

from ..cli_support import fail as _fail


@click.command()
@click.option("--bundle", required=True, type=click.Path(), help="Bundle directory (emma-export export/build).")
@click.option("--backend", type=click.Choice(["ort", "trt"]), default="ort", show_default=True)
@click.option("--provider", default=None, help="ONNX Runtime provider: cpu, cuda, tensorrt (default: best available).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; 0.0.0.0 serves other machines.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--max-batch", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Requests batched per step (understanding decode rows; images of one size). 1 = one at a time.")
@click.option("--max-queue", type=click.IntRange(0, 100000), default=64, show_default=True,
              help="Requests waiting for a batch before new ones get 429 with Retry-After.")
@click.option("--exact-images", is_flag=True,
              help="Batch only images whose prompts have one length, so every image is bit-identical to a one-request run "
                   "(default: any prompts batch; pixels then match to within one level).")
@click.option("--request-timeout", type=click.FloatRange(0.1, 3600), default=60.0, show_default=True, help="Seconds per request.")
@click.option("--max-body-mb", type=click.FloatRange(0.01, 1024), default=8.0, show_default=True)
@click.option("--max-pixels", type=click.IntRange(1024, 1 << 30), default=1 << 20, show_default=True,
              help="Largest input image (as sent) and output size, in pixels.")
@click.option("--max-n", type=click.IntRange(1, 64), default=4, show_default=True, help="Images per generation/edit request.")
@click.option("--ray", "use_ray", is_flag=True, help="Deploy on Ray Serve (replicas across a Ray cluster).")
@click.option("--replicas", type=click.IntRange(1, 4096), default=1, show_default=True, help="Ray Serve replicas (--ray).")
@click.option("--max-replicas", type=click.IntRange(1, 4096), default=None,
              help="With --ray: autoscale between --replicas and this, on each replica's queue depth.")
@click.option("--ray-address", default=None, help="With --ray: the cluster to join (default: RAY_ADDRESS, else a local one).")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info", show_default=True)
def serve(bundle, backend, provider, host, port, max_batch, max_queue, exact_images, request_timeout, max_body_mb, max_pixels, max_n,
          use_ray, replicas, max_replicas, ray_address, log_level):
    """Serve a bundle over OpenAI's HTTP API: /v1/chat/completions (understanding),
    /v1/images/generations, /v1/images/edits, /v1/models, /health, /metrics."""
    from ..bundle import Bundle, BundleError
    from .inputs import ServeLimits
    from .server import Settings

    if not use_ray and (replicas != 1 or max_replicas is not None or ray_address):
        _fail("--replicas, --max-replicas and --ray-address need --ray")
    if max_replicas is not None and max_replicas < replicas:
        _fail(f"--max-replicas ({max_replicas}) is below --replicas ({replicas})")
    try:
        Bundle.load(bundle, check_files=False)  # a bad path is one error line here, not a traceback on a replica
    except (BundleError, ValueError, OSError) as e:
        _fail(str(e))
    limits = ServeLimits(max_body_bytes=int(max_body_mb * (1 << 20)), max_pixels=max_pixels, max_n=max_n, request_timeout_s=request_timeout)
    settings = Settings(bundle, backend, provider, max_batch, max_queue, exact_images, limits)
    try:
        if use_ray:
            from .ray_deploy import run

            run(settings, host, port, replicas, max_replicas, ray_address)
        else:
            _run_uvicorn(settings, host, port, log_level)
    except ImportError as e:
        _fail(f"{e}; install the server's extra: pip install 'emma-runtime[serve]' (./runtime[serve] from a checkout)")
    except (BundleError, ValueError, RuntimeError) as e:
        _fail(str(e))


def _run_uvicorn(settings, host: str, port: int, log_level: str) -> None:
    import uvicorn

    from .app import model_id
    from .server import build

    app, scheduler = build(settings)
    click.echo(f"serving {model_id(scheduler.p)} from {settings.bundle} on http://{host}:{port} "
               f"({scheduler.p.backend.describe()}, max batch {settings.max_batch})", err=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, lifespan="off")
    finally:
        scheduler.stop()
