"""Throughput and latency of `emma-run serve`, batched against one request at a time, side by side.

    python -m emma_runtime.serve.loadtest --bundle out/bundle-shapes --clients 8 --task understand

Starts the server twice in a child process (``--max-batch N``, then ``--max-batch 1``), sends the same
fixed set of requests from ``--clients`` concurrent clients to each, and prints requests/s, p50 and
p99 latency and the ratio; it also checks that both servers gave every request the same answer.
``--engine-only`` drives the batching scheduler in this process instead (client threads submit jobs
and wait for them; no HTTP), which separates what batching gains from what the HTTP side costs.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import click
import numpy as np

from .server import free_port

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
QUESTIONS = ["how many shapes are there?", "what colour is the shape?", "what shape is it?", "where is the shape?", "describe the image"]
PROMPTS = ["a red circle", "a blue square on the left", "two green triangles", "a yellow circle at the top right",
           "a small blue triangle", "a large red square in the middle"]
EDITS = ["make it blue", "remove the circle", "move the shape to the left", "add a red square", "make it bigger"]


def synthetic_png(i: int, size: int = 64) -> bytes:
    """A deterministic picture of one or two flat shapes (request i's image)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(i)
    im = Image.new("RGB", (size, size), (128, 128, 128))
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(1, 3))):
        c = list(COLOURS.values())[int(rng.integers(len(COLOURS)))]
        x, y, r = (int(v) for v in rng.integers([8, 8, 6], [size - 8, size - 8, 14]))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x - r, y - r, x + r, y + r], fill=c)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Request:
    kind: str
    json: dict | None = None
    files: dict | None = None
    data: dict | None = None

    @property
    def path(self) -> str:
        return {"understand": "/v1/chat/completions", "generate": "/v1/images/generations", "edit": "/v1/images/edits"}[self.kind]


def make_requests(task: str, n: int, max_tokens: int = 16) -> list[Request]:
    out = []
    for i in range(n):
        if task == "understand":
            url = "data:image/png;base64," + base64.b64encode(synthetic_png(i)).decode()
            out.append(Request(task, json={"model": "", "max_tokens": max_tokens, "seed": i, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]}]}))
        elif task == "generate":
            out.append(Request(task, json={"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "response_format": "b64_json"}))
        else:
            out.append(Request(task, files={"image": ("in.png", synthetic_png(i), "image/png")},
                               data={"prompt": EDITS[i % len(EDITS)], "seed": str(i)}))
    return out


def answer_key(kind: str, body: dict):
    """The text, or the image's pixels (uint8, H x W x 3)."""
    if kind == "understand":
        return body["choices"][0]["message"]["content"]
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))).convert("RGB"))


def compare(a, b) -> tuple[bool, int]:
    """(identical, largest pixel-level difference; 0 for texts)."""
    if isinstance(a, str) or isinstance(b, str) or a is None or b is None:
        return a == b, 0
    same = bool(np.array_equal(a, b))
    return same, 0 if same else int(np.abs(a.astype(np.int16) - b).max())


async def _drive(url: str, requests: list[Request], clients: int, timeout: float) -> tuple[list[float], list[str | None], float]:
    import httpx

    latencies: list[float] = [0.0] * len(requests)
    answers: list[str | None] = [None] * len(requests)
    next_i = 0

    async def client(http):
        nonlocal next_i
        while next_i < len(requests):
            i = next_i
            next_i += 1
            r = requests[i]
            t0 = time.perf_counter()
            resp = await http.post(r.path, json=r.json, files=r.files, data=r.data)
            latencies[i] = time.perf_counter() - t0
            if resp.status_code == 200:
                answers[i] = answer_key(r.kind, resp.json())
            else:
                print(f"request {i}: HTTP {resp.status_code} {resp.text[:200]}", file=sys.stderr)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return latencies, answers, wall


def start_server(bundle: str, max_batch: int, max_queue: int, backend: str, provider: str | None,
                 exact_images: bool = False) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "emma_runtime.cli", "serve", "--bundle", bundle, "--port", str(port), "--max-batch", str(max_batch),
           "--max-queue", str(max_queue), "--backend", backend, "--log-level", "warning"]
    if provider:
        cmd += ["--provider", provider]
    if exact_images:
        cmd += ["--exact-images"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("the server did not come up within 120 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _engine_jobs(p, task: str, n: int, max_tokens: int) -> list:
    from types import SimpleNamespace

    from .inputs import ServeLimits, decode_image, edit_jobs, generation_jobs, understand_job

    lim = ServeLimits()
    jobs = []
    for i in range(n):
        if task == "understand":
            url = "data:image/png;base64," + base64.b64encode(synthetic_png(i)).decode()
            msg = SimpleNamespace(role="user", content=[{"type": "image_url", "image_url": {"url": url}},
                                                        {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}])
            jobs.append(understand_job(p, [msg], max_tokens, None, None, i, lim))
        elif task == "generate":
            jobs.extend(generation_jobs(p, PROMPTS[i % len(PROMPTS)], None, 1, i, None, None, lim))
        else:
            img = decode_image(p, synthetic_png(i), lim, "image")
            jobs.extend(edit_jobs(p, img, EDITS[i % len(EDITS)], None, 1, i, None, None, None, lim))
    return jobs


def run_engine(p, jobs: list, max_batch: int, clients: int, exact_images: bool) -> tuple[list[float], list, float]:
    """Closed loop without HTTP: each client thread submits its next job and waits for the answer."""
    import threading

    from ..images import to_uint8
    from .scheduler import Scheduler

    sched = Scheduler(p, max_batch, max_queue=len(jobs) + clients, exact_images=exact_images).start()
    latencies: list[float] = [0.0] * len(jobs)
    answers: list = [None] * len(jobs)
    lock = threading.Lock()
    next_i = [0]

    def client():
        while True:
            with lock:
                i = next_i[0]
                next_i[0] += 1
            if i >= len(jobs):
                return
            done, box = threading.Event(), []

            def sink(kind, payload):
                if kind != "token":
                    box.append((kind, payload))
                    done.set()

            t0 = time.perf_counter()
            sched.submit(jobs[i], sink, 300)
            done.wait(300)
            latencies[i] = time.perf_counter() - t0
            if box and box[0][0] == "done":
                r = box[0][1]
                answers[i] = p.tokenizer.decode(r.token_ids).strip() if hasattr(r, "token_ids") else to_uint8(r.image)

    try:
        threads = [threading.Thread(target=client) for _ in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        sched.stop()
    return latencies, answers, wall


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


@click.command()
@click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--task", type=click.Choice(["understand", "generate", "edit"]), default="understand", show_default=True)
@click.option("--clients", type=click.IntRange(1, 256), default=8, show_default=True)
@click.option("--requests", "n", type=click.IntRange(1, 100000), default=None, help="Requests per mode (default: 16 per client).")
@click.option("--max-batch", type=click.IntRange(2, 256), default=None, help="The batched server's --max-batch (default: --clients).")
@click.option("--max-tokens", type=click.IntRange(1, 4096), default=16, show_default=True)
@click.option("--repeat", type=click.IntRange(1, 10), default=1, show_default=True, help="Run both modes this many times, alternating.")
@click.option("--exact-images", is_flag=True, help="Run the batched server with --exact-images.")
@click.option("--engine-only", is_flag=True, help="Drive the scheduler in this process, without HTTP.")
@click.option("--backend", type=click.Choice(["ort", "trt"]), default="ort", show_default=True)
@click.option("--provider", default=None)
def main(bundle, task, clients, n, max_batch, max_tokens, repeat, exact_images, engine_only, backend, provider):
    n = n or 16 * clients
    max_batch = max_batch or clients
    rows = []
    keys: dict[str, list] = {}
    load0 = os.getloadavg()
    if engine_only:
        from ..pipelines import Pipeline

        pipe = Pipeline.load(bundle, backend=backend, provider=provider)
        jobs = _engine_jobs(pipe, task, n, max_tokens)
        run_engine(pipe, jobs[: min(4, n)], 1, 1, False)  # warm-up
    else:
        requests = make_requests(task, n, max_tokens)
    for rep in range(repeat):
        for label, mb in ((f"batched (max-batch {max_batch})", max_batch), ("one at a time (max-batch 1)", 1)):
            if engine_only:
                lat, answers, wall = run_engine(pipe, jobs, mb, clients, exact_images and mb > 1)
            else:
                proc, url = start_server(bundle, mb, max(64, n), backend, provider, exact_images and mb > 1)
                try:
                    asyncio.run(_drive(url, requests[: min(4, n)], 1, 120))  # warm-up: first-run allocations
                    lat, answers, wall = asyncio.run(_drive(url, requests, clients, 300))
                finally:
                    stop_server(proc)
            ok = sum(a is not None for a in answers)
            rows.append((label, ok, n / wall, pct(lat, 0.5), pct(lat, 0.99)))
            keys.setdefault(label, []).append(answers)
            click.echo(f"[{rep + 1}/{repeat}] {label}: {ok}/{n} answered in {wall:.2f} s", err=True)
    load1 = os.getloadavg()
    click.echo(f"\n{task}{' (engine only, no HTTP)' if engine_only else ''}: {clients} clients, {n} requests per run, bundle {bundle}, {os.cpu_count()} CPUs, "
               f"EMMA_ORT_THREADS={os.environ.get('EMMA_ORT_THREADS', 'unset')}{', --exact-images' if exact_images else ''}, "
               f"load average {load0[0]:.2f} before / {load1[0]:.2f} after")
    click.echo(f"{'server':<32} {'ok':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for label, ok, rps, p50, p99 in rows:
        click.echo(f"{label:<32} {ok:>4}/{n:<4} {rps:>8.1f} {p50 * 1000:>8.1f} {p99 * 1000:>8.1f}")
    labels = list(keys)
    tput = {lab: statistics.median(r[2] for r in rows if r[0] == lab) for lab in labels}
    click.echo(f"throughput ratio batched / one at a time: {tput[labels[0]] / tput[labels[1]]:.2f}x (median of {repeat})")
    ref = keys[labels[1]][0]  # one at a time: each request alone in its batch, the single-request answer
    complete = all(a is not None for runs in keys.values() for answers in runs for a in answers)
    checks = [compare(a, b) for runs in keys.values() for answers in runs for a, b in zip(answers, ref)]
    differing = sum(not same for same, _ in checks)
    worst = max(level for _, level in checks)
    click.echo(f"every request answered: {'yes' if complete else 'NO'}; answers identical to one at a time: "
               f"{len(checks) - differing}/{len(checks)}" + (f" (the others: pixels within {worst} level)" if differing else ""))
    # Texts must be identical; images within one level (bit-identical with --exact-images).
    if not complete or any(not same and (isinstance(a, str) or level > 1 or exact_images)
                           for (same, level), a in zip(checks, [a for runs in keys.values() for ans in runs for a in ans])):
        sys.exit(1)


if __name__ == "__main__":
    main()
