"""The batching scheduler: one engine thread owns the pipeline and, step after step, runs

- one decode step for every understanding request in flight, as one batch on the backbone graph
  (continuous batching: a request joins after its prefill and leaves after its last token, between
  any two steps; each row keeps its own positions and attention mask in the shared KV cache), and
- one denoising step for every generation/edit request of the same latent size, as one batch whose
  rows are every request's guidance prefixes (requests join and leave between steps; each keeps its
  own timestep schedule, so a late joiner runs its first step next to another's last).

New understanding requests of one image size are prefilled together (vision trunk, encoder, adapter
and backbone chunks as one batch). A failure while a batch runs is retried request by request, so
it fails only the request that causes it.

Measured with the shapes bundle on the 2-core CPU: tokens are the single-request tokens; latents of a
request batched next to longer prompts differ from its single-request latents by <= 1e-6 (the padded
attention sums in another order) and its PNG bytes are the same (docs/serving.md, tests/test_serve.py).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np

from ..images import ImageError
from ..kv_cache import KVCache
from ..limits import RequestError
from ..pipelines import Pipeline
from ..sampling import initial_noise, sample_token, timesteps
from .metrics import Metrics

log = logging.getLogger("emma_runtime.serve")


class ServeError(Exception):
    """An error that goes back to the client in OpenAI's error shape."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.kind = kind
        self.param = param
        self.code = code
        self.headers = headers or {}


def queue_full(depth: int, retry_after: int) -> ServeError:
    return ServeError(f"the server's queue is full ({depth} requests waiting); retry after {retry_after} s", 429,
                      "rate_limit_error", code="queue_full", headers={"Retry-After": str(retry_after)})


@dataclass
class UnderstandJob:
    image: np.ndarray  # (1, 3, H, W) in [-1, 1]
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    prompt_tokens: int = 0  # positions of the prefix (text and image tokens), for usage
    task: Literal["understand"] = "understand"


@dataclass
class ImageJob:
    task: Literal["generate", "edit"]
    prompt: str
    height: int
    width: int
    steps: int
    shift: float
    seed: int
    cfg: float = 1.0  # generate
    cfg_text: float = 1.0  # edit
    cfg_image: float = 1.0  # edit
    image: np.ndarray | None = None  # edit: the reference, (1, 3, H, W)
    prefix_positions: int = 0  # its longest guidance prefix (the exact mode batches equal ones only)


@dataclass
class UnderstandResult:
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    expert: int


@dataclass
class ImageResult:
    image: np.ndarray  # (1, 3, H, W) in [-1, 1]
    latents: np.ndarray
    visual_tokens: int


Sink = Callable[[str, object], None]  # ("token", id) | ("done", result) | ("error", ServeError); called on the engine thread


@dataclass
class Ticket:
    job: UnderstandJob | ImageJob
    sink: Sink
    deadline: float  # time.monotonic()
    created: float = field(default_factory=time.monotonic)
    cancelled: bool = False

    def cancel(self) -> None:
        """The client went away or stopped waiting: the engine drops the request before its next step."""
        self.cancelled = True


@dataclass
class _Row:
    """An understanding request in the decode batch; ``src`` is (cache, row) holding its keys/values."""

    ticket: Ticket
    src: tuple[KVCache, int]
    logits: np.ndarray | None  # the next token's, until it is sampled
    rng: np.random.Generator
    expert: int
    out: list[int] = field(default_factory=list)

    @property
    def remaining(self) -> int:
        return self.ticket.job.max_tokens - len(self.out)


@dataclass
class _Member:
    """A generation/edit request in a denoising group."""

    ticket: Ticket
    prefixes: list[KVCache]
    weights: np.ndarray  # (K,) float32, one per prefix
    x: np.ndarray
    ts: np.ndarray
    visual_tokens: int
    i: int = 0


@dataclass
class _Group:
    members: list[_Member] = field(default_factory=list)
    cache: KVCache | None = None  # every member's prefixes stacked; None after a member joins or leaves


def _emit(t: Ticket, kind: str, payload) -> None:
    try:
        t.sink(kind, payload)
    except Exception:  # the receiving side is gone (its event loop closed): nothing to tell
        log.debug("dropped a %s event for a request whose receiver is gone", kind)


class Scheduler:
    def __init__(self, pipeline: Pipeline, max_batch: int = 8, max_queue: int = 64, metrics: Metrics | None = None,
                 exact_images: bool = False):
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.p = pipeline
        # Batched with longer prefixes, a request's attention sums run over padding in another order:
        # its latents move by ~1e-6 and a pixel can round to the next level. exact_images batches only
        # requests whose prefixes have one length, so every image is bit-identical to its single run.
        self.exact_images = exact_images
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self._cv = threading.Condition()
        self._und_inbox: deque[Ticket] = deque()
        self._img_inbox: deque[Ticket] = deque()
        self._rows: list[_Row] = []
        self._cache: KVCache | None = None  # the decode batch; None when it must be rebuilt from the rows' src
        self._groups: dict[tuple[int, ...], _Group] = {}
        self._mean_latency = 1.0
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="emma-engine", daemon=True)

    # ---- the client side (any thread) -----------------------------------------------------------
    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, job: UnderstandJob | ImageJob, sink: Sink, timeout: float) -> Ticket:
        with self._cv:
            if self._stopping:
                raise ServeError("the server is shutting down", 503, "server_error", code="shutting_down")
            depth = len(self._und_inbox) + len(self._img_inbox)
            if depth >= self.max_queue:  # requests whose clients left do not hold places
                self._und_inbox = deque(t for t in self._und_inbox if not t.cancelled)
                self._img_inbox = deque(t for t in self._img_inbox if not t.cancelled)
                depth = len(self._und_inbox) + len(self._img_inbox)
            if depth >= self.max_queue:
                self.metrics.errors.labels("queue_full").inc()
                raise queue_full(depth, self.retry_after(depth))
            t = Ticket(job, sink, time.monotonic() + timeout)
            (self._und_inbox if job.task == "understand" else self._img_inbox).append(t)
            self.metrics.queue_depth.set(depth + 1)
            self._cv.notify()
        return t

    def queue_depth(self) -> int:
        return len(self._und_inbox) + len(self._img_inbox)

    def retry_after(self, depth: int) -> int:
        # The queue drains a batch at a time: roughly depth / max_batch request latencies.
        return int(min(60, max(1, math.ceil(depth / self.max_batch * self._mean_latency))))

    def alive(self) -> bool:
        return self._thread.is_alive()

    # ---- the engine thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            try:
                # Rows whose answer is complete leave first: their clients are answered before the new
                # requests' prefill runs, and their places go to those requests.
                self._drop_expired()
                self._sample_rows()
            except Exception:
                log.exception("engine step failed")
            with self._cv:
                while not self._stopping and not (self._und_inbox or self._img_inbox or self._rows or self._groups):
                    self._cv.wait()
                if self._stopping:
                    break
                new_und = [self._und_inbox.popleft() for _ in range(min(len(self._und_inbox), self.max_batch - len(self._rows)))]
                new_img = self._take_images()
                self.metrics.queue_depth.set(len(self._und_inbox) + len(self._img_inbox))
            try:
                if new_und:
                    self._admit_understand(new_und)
                for t in new_img:
                    self._admit_image(t)
                if self._rows:
                    self._decode_step()
                for key in list(self._groups):
                    self._denoise_step(key)
            except Exception as e:  # a bug in the scheduler itself: fail what is in flight, keep serving
                log.exception("engine step failed")
                for r in self._rows:
                    self._fail_request(r.ticket, e)
                for g in self._groups.values():
                    for m in g.members:
                        self._fail_request(m.ticket, e)
                self._rows, self._cache, self._groups = [], None, {}
        err = ServeError("the server is shutting down", 503, "server_error", code="shutting_down")
        for t in list(self._und_inbox) + list(self._img_inbox):
            _emit(t, "error", err)
        for r in self._rows:
            r.ticke_emit(t, "error", err)
        for g in self._groups.values():
            for m in g.members:
                m.ticke_emit(t, "error", err)

    def _take_images(self) -> list[Ticket]:
        """Image requests whose size group has room, in arrival order (a full group does not hold
        back requests of other sizes)."""
        taken, kept = [], deque()
        room: dict[tuple[int, ...], int] = {}
        for t in self._img_inbox:
            key = self._key(t.job)
            if key not in room:
                room[key] = self.max_batch - len(self._groups[key].members) if key in self._groups else self.max_batch
            if room[key] > 0:
                room[key] -= 1
                taken.append(t)
            else:
                kept.append(t)
        self._img_inbox = kept
        return taken

    def _key(self, job: ImageJob) -> tuple[int, ...]:
        size = (job.height // self.p.dims.cell, job.width // self.p.dims.cell)
        return size + (job.prefix_positions,) if self.exact_images else size

    def _expired(self, t: Ticket) -> bool:
        if t.cancelled:
            return True
        if time.monotonic() > t.deadline:
            self.metrics.errors.labels("timeout").inc()
            self._fail_request(t, ServeError("the request ran past the server's time limit", 504, "timeout_error", code="timeout"), count=False)
            t.cancelled = True
            return True
        return False

    def _drop_expired(self) -> None:
        keep = [r for r in self._rows if not self._expired(r.ticket)]
        if len(keep) != len(self._rows):
            self._rows, self._cache = keep, None
        for key, g in list(self._groups.items()):
            keep = [m for m in g.members if not self._expired(m.ticket)]
            if len(keep) != len(g.members):
                g.members, g.cache = keep, None
            if not g.members:
                del self._groups[key]

    def _finish(self, t: Ticket, result) -> None:
        lat = time.monotonic() - t.created
        self._mean_latency = 0.9 * self._mean_latency + 0.1 * lat
        self.metrics.latency.labels(t.job.task).observe(lat)
        self.metrics.requests.labels(t.job.task, "ok").inc()
        _emit(t, "done", result)

    def _fail_request(self, t: Ticket, e: Exception, count: bool = True) -> None:
        if isinstance(e, ServeError):
            err = e
        elif isinstance(e, (RequestError, ImageError)):
            err = ServeError(str(e))
        else:
            log.error("request failed: %s: %s", type(e).__name__, e, exc_info=e)
            err = ServeError(f"the model failed on this request ({type(e).__name__}); see the server log", 500, "server_error")
        if count:
            self.metrics.errors.labels("invalid_request" if err.status < 500 else "internal").inc()
        self.metrics.requests.labels(t.job.task, "error").inc()
        _emit(t, "error", err)

    # ---- understanding ------------------------------------------------------------------------
    def _admit_understand(self, tickets: list[Ticket]) -> None:
        by_size: dict[tuple[int, ...], list[Ticket]] = {}
        for t in tickets:
            if not self._expired(t):
                by_size.setdefault(t.job.image.shape, []).append(t)
        for group in by_size.values():
            self._prefill(group)

    def _prefill(self, group: list[Ticket]) -> None:
        jobs = [t.job for t in group]
        try:
            images = np.concatenate([j.image for j in jobs], axis=0)
            cache, hidden, experts = self.p.prefill_understand_batch(images, [j.prompt_ids for j in jobs], [j.max_tokens for j in jobs])
            logits = self.p.logits_rows(hidden)
        except Exception as e:
            if len(group) == 1:
                self._fail_request(group[0], e)
                return
            for t in group:  # one bad request must not fail the others: each on its own
                self._prefill([t])
            return
        self.metrics.batch_size.labels("prefill").observe(len(group))
        self._sample_rows([_Row(t, (cache, i), logits[i], np.random.default_rng(t.job.seed), experts[i]) for i, t in enumerate(group)])

    def _sample_rows(self, rows: list[_Row] | None = None) -> None:
        """Samples the next token of each row that has fresh logits, as ``Pipeline.understand`` does;
        finished rows leave the batch."""
        rows = self._rows if rows is None else rows
        keep, emitted = [], 0
        for r in rows:
            if r.logits is None:
                keep.append(r)
                continue
            job = r.ticket.job
            tok = sample_token(r.logits, job.temperature, job.top_p, r.rng)
            r.logits = None
            if tok == self.p.special.im_end:
                self._finish(r.ticket, UnderstandResult(r.out, "stop", r.expert))
                continue
            if not r.out:
                self.metrics.first_token.observe(time.monotonic() - r.ticket.created)
            r.out.append(tok)
            emitted += 1
            _emit(r.ticket, "token", tok)
            if r.remaining <= 0:
                self._finish(r.ticket, UnderstandResult(r.out, "length", r.expert))
                continue
            keep.append(r)
        self.metrics.add_tokens(emitted)
        if rows is self._rows:
            if len(keep) != len(self._rows):
                self._cache = None
            self._rows = keep
        else:
            self._rows.extend(keep)
            self._cache = None

    def _decode_step(self) -> None:
        """One decode step for every row, as one batch: appends each row's last token."""
        keep = self._rows
        self.metrics.active.labels("understand").set(len(keep))
        if self._cache is None:
            self._cache = KVCache.gather([r.src for r in keep], extra=max(r.remaining for r in keep))
            for i, r in enumerate(keep):
                r.src = (self._cache, i)
        self.metrics.batch_size.labels("decode").observe(len(keep))
        try:
            logits = self.p.decode_rows(self._cache, [r.out[-1] for r in keep])
        except Exception as e:
            self._cache = None
            if len(keep) == 1:
                self._fail_request(keep[0].ticket, e)
                self._rows = []
                return
            survivors = []
            for r in keep:  # each row on its own, so only the one that fails is lost
                try:
                    c = KVCache.gather([r.src], extra=r.remaining)
                    r.logits = self.p.decode_rows(c, [r.out[-1]])[0]
                    r.src = (c, 0)
                    survivors.append(r)
                except Exception as e1:
                    self._fail_request(r.ticket, e1)
            self._rows = survivors
            return
        for r, l in zip(keep, logits):
            r.logits = l

    # ---- generation and editing ---------------------------------------------------------------
    def _admit_image(self, t: Ticket) -> None:
        if self._expired(t):
            return
        job: ImageJob = t.job
        d = self.p.dims
        h, w = self._key(job)[:2]
        try:
            if job.task == "generate":
                prefixes, visual = self.p.generate_prefixes(job.prompt, h, w, job.cfg), h * w
            else:
                prefixes, ref = self.p.edit_prefixes(job.image, job.prompt, job.cfg_text, job.cfg_image)
                visual = ref + h * w
        except Exception as e:
            self._fail_request(t, e)
            return
        noise = initial_noise(job.seed, d.latent_channels, h, w)
        m = _Member(t, [c for c, _ in prefixes], np.array([wk for _, wk in prefixes], np.float32), noise,
                    timesteps(job.steps, job.shift), visual)
        g = self._groups.setdefault(self._key(job), _Group())
        g.members.append(m)
        g.cache = None

    def _denoise_step(self, key: tuple[int, ...]) -> None:
        g = self._groups[key]
        if g.cache is None:  # the targets are never committed: the stacked prefixes need no room
            g.cache = KVCache.stack([c for m in g.members for c in m.prefixes])
        self.metrics.batch_size.labels("denoise").observe(len(g.members))
        step = lambda ms, cache: self.p.denoise_rows(cache, [(m.x, m.weights, float(m.ts[m.i]), float(m.ts[m.i + 1])) for m in ms])
        try:
            xs = step(g.members, g.cache)
            ok = list(zip(g.members, xs))
        except Exception as e:
            g.cache = None
            if len(g.members) == 1:
                self._fail_request(g.members[0].ticket, e)
                ok = []
            else:
                ok = []
                for m in g.members:  # each on its own, so only the one that fails is lost
                    try:
                        ok.append((m, step([m], KVCache.stack(m.prefixes))[0]))
                    except Exception as e1:
                        self._fail_request(m.ticket, e1)
        for m, x in ok:
            m.x = x
            m.i += 1
        self.metrics.add_steps(len(ok))
        done = [m for m, _ in ok if m.i >= len(m.ts) - 1]
        members = [m for m, _ in ok if m.i < len(m.ts) - 1]
        if len(members) != len(g.members):
            g.cache = None
        g.members = members
        if done:
            self._decode_images(done)
        if not g.members:
            del self._groups[key]
        self.metrics.active.labels("image").set(sum(len(x.members) for x in self._groups.values()))

    def _decode_images(self, done: list[_Member]) -> None:
        # One at a time: the decoder's convolutions give other float sums in a batch (measured ~1e-5),
        # and they cost the same per image batched or not (compute-bound on the CPU).
        for m in done:
            try:
                image = self.p.decode(m.x)
            except Exception as e:
                self._fail_request(m.ticket, e)
                continue
            self._finish(m.ticket, ImageResult(image, m.x, m.visual_tokens))
