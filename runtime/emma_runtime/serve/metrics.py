"""Prometheus metrics of one server (its own registry, so tests can run several in one process)."""

from __future__ import annotations

import time
from collections import deque


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.queue_depth = Gauge("emma_queue_depth", "Requests waiting to join a batch", registry=r)
        self.active = Gauge("emma_active_requests", "Requests in a running batch", ["task"], registry=r)
        self.batch_size = Histogram("emma_batch_size", "Requests per batched step", ["stage"], registry=r,
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64))
        self.latency = Histogram("emma_request_latency_seconds", "Time from arrival to the full answer", ["task"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.first_token = Histogram("emma_time_to_first_token_seconds", "Understanding: arrival to first token", registry=r,
                                     buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.requests = Counter("emma_requests", "Finished requests", ["task", "status"], registry=r)
        self.errors = Counter("emma_errors", "Refused or failed requests by kind", ["kind"], registry=r)
        self.tokens = Counter("emma_generated_tokens", "Understanding tokens generated", registry=r)
        self.steps = Counter("emma_denoising_steps", "Denoising steps run (one per image per step)", registry=r)
        self.tokens_rate = Gauge("emma_tokens_per_second", "Generated tokens per second over the last 10 s", registry=r)
        self.steps_rate = Gauge("emma_denoising_steps_per_second", "Denoising steps per second over the last 10 s", registry=r)
        self._tok = _Rate()
        self._stp = _Rate()

    def add_tokens(self, n: int) -> None:
        self.tokens.inc(n)
        self.tokens_rate.set(self._tok.add(n))

    def add_steps(self, n: int) -> None:
        self.steps.inc(n)
        self.steps_rate.set(self._stp.add(n))

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        self.tokens_rate.set(self._tok.add(0))
        self.steps_rate.set(self._stp.add(0))
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Rate:
    """Events per second over a sliding window (a gauge next to the counter, for dashboards
    without PromQL's rate())."""

    def __init__(self, window: float = 10.0):
        self.window = window
        self.events: deque[tuple[float, int]] = deque()
        self.total = 0

    def add(self, n: int) -> float:
        now = time.monotonic()
        if n:
            self.events.append((now, n))
            self.total += n
        while self.events and self.events[0][0] < now - self.window:
            self.total -= self.events.popleft()[1]
        return self.total / self.window
