"""Building the server from a bundle and running it on uvicorn, in the foreground (the command) or
on a background thread (tests, the load test)."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field

from ..pipelines import Pipeline
from .inputs import ServeLimits
from .scheduler import Scheduler


@dataclass(frozen=True)
class Settings:
    bundle: str
    backend: str = "ort"
    provider: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    exact_images: bool = False
    limits: ServeLimits = field(default_factory=ServeLimits)


def build(settings: Settings):
    """-> (FastAPI app, started Scheduler). The sessions are opened before the first request."""
    from .app import create_app

    p = Pipeline.load(settings.bundle, backend=settings.backend, provider=settings.provider, quiet=True)
    scheduler = Scheduler(p, settings.max_batch, settings.max_queue, exact_images=settings.exact_images).start()
    return create_app(scheduler, settings.limits), scheduler


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BackgroundServer:
    """uvicorn on a thread, bound to loopback; ``with BackgroundServer(settings) as url: ...``."""

    def __init__(self, settings: Settings, host: str = "127.0.0.1", port: int | None = None):
        import uvicorn

        self.app, self.scheduler = build(settings)
        self.host, self.port = host, port or free_port(host)
        config = uvicorn.Config(self.app, host=self.host, port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.scheduler.stop()

    def __enter__(self) -> str:
        self.start()
        return self.url

    def __exit__(self, *exc) -> None:
        self.stop()
