"""The same app as a Ray Serve deployment: each replica loads the bundle and runs its own batching
scheduler; Ray's proxy spreads requests over the replicas and its autoscaler adds replicas when each
one's ongoing requests (its queue plus its batch) pass ``max_batch``. A user grows from one device to
a cluster by starting Ray on more machines (``ray start --address HEAD:6379``); the bundle must be
at the same path on every node. With GPUs in the cluster each replica takes one."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

from .server import Settings

APP_NAME = "emma"


def _runtime_env() -> dict:
    # Replicas import emma_runtime by name: hand them this process's import path for it, for a
    # checkout that is not pip-installed (a path missing on another node is simply skipped).
    here = str(Path(__file__).resolve().parents[2])
    paths = [here] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != here]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}}


def application(settings: Settings, replicas: int = 1, max_replicas: int | None = None, gpus: float = 0.0, cpus: float = 1.0):
    """-> a bound Ray Serve application serving ``settings`` (pass it to ``serve.run``)."""
    from ray import serve

    settings = replace(settings, bundle=str(Path(settings.bundle).resolve()))
    options: dict = {
        "name": "EmmaServer",
        "ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus, "runtime_env": _runtime_env()},
        # Ray queues at its proxy beyond this; the replica's own queue answers 429 past max_queue.
        "max_ongoing_requests": settings.max_batch + settings.max_queue,
        "health_check_period_s": 5,
    }
    if max_replicas is not None and max_replicas > replicas:
        options["autoscaling_config"] = {"min_replicas": replicas, "max_replicas": max_replicas,
                                         "target_ongoing_requests": settings.max_batch, "upscale_delay_s": 5, "downscale_delay_s": 60}
    else:
        options["num_replicas"] = replicas

    @serve.deployment(**options)
    @serve.ingress()
    class EmmaServer:
        def __init__(self, s: Settings):
            from .server import build

            self._asgi, self.scheduler = build(s)

        def __serve_build_asgi_app__(self):
            return self._asgi

        def check_health(self):
            if not self.scheduler.alive():
                raise RuntimeError("the engine thread stopped")

        def __del__(self):
            sched = getattr(self, "scheduler", None)
            if sched is not None:
                sched.stop(1.0)

    return EmmaServer.bind(settings)


def start(settings: Settings, host: str, port: int, replicas: int = 1, max_replicas: int | None = None,
          address: str | None = None, local_cpus: int | None = None) -> str:
    """Connects to (or starts) a Ray cluster, deploys, and returns the HTTP URL once every replica is up."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address and host in ("127.0.0.1", "localhost"):
        # A one-machine cluster for a loopback server: Ray's single-host mode puts its own services on
        # 127.0.0.1 too (read when ray is first imported). Ray Serve's replicas still open their
        # inter-deployment gRPC port on [::] (hard-coded in ray.serve._private.replica).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    if not ray.is_initialized():
        if address:
            ray.init(address=address, logging_level="warning")
        else:  # a one-machine cluster on loopback
            ray.init(num_cpus=local_cpus, include_dashboard=False, logging_level="warning", _node_ip_address="127.0.0.1")
    gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    cpus = 0.0 if gpus else 1.0
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(settings, replicas, max_replicas, gpus, cpus), name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{host}:{port}"


def stop() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def run(settings: Settings, host: str, port: int, replicas: int, max_replicas: int | None, address: str | None) -> None:
    import click

    url = start(settings, host, port, replicas, max_replicas, address)
    click.echo(f"serving {settings.bundle} on {url} with Ray Serve ({replicas}{'-' + str(max_replicas) if max_replicas else ''} replicas); Ctrl-C stops", err=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop()
