"""`emma-run serve` (issue 21): the official openai client against a server on a loopback port, bad
requests, back-pressure, failure isolation, and a bounded load test whose every answer must be the
single-request answer."""

import asyncio
import base64
import io
import statistics
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

from shapes_world import world  # noqa: E402
from emma_runtime.images import to_model, to_uint8  # noqa: E402
from emma_runtime.pipelines import Pipeline  # noqa: E402
from emma_runtime.serve.inputs import ServeLimits  # noqa: E402
from emma_runtime.serve.scheduler import ImageJob, Scheduler, ServeError, UnderstandJob  # noqa: E402
from emma_runtime.serve.server import BackgroundServer, Settings  # noqa: E402

MODEL = "emma-shapes"
LIMITS = ServeLimits(max_body_bytes=256 << 10, max_pixels=256 * 256, max_n=3, request_timeout_s=60)


def png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def data_url(b: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(b).decode()


def chat_body(image: bytes, question: str, **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": question}]}], **kw}


def decoded(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


@pytest.fixture(scope="module")
def examples():
    return world.dataset("val", 12, seed=0)


@pytest.fixture(scope="module")
def pipe(serve_bundle):
    """The single-request reference: the same bundle run one request at a time, in process."""
    p = Pipeline.load(serve_bundle)
    return p


@pytest.fixture(scope="module")
def server(serve_bundle):
    srv = BackgroundServer(Settings(str(serve_bundle), max_batch=8, max_queue=64, limits=LIMITS)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


# ---- the three tasks through the official client ---------------------------------------------------
def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["model"] == MODEL and h["max_batch"] == 8
    client.chat.completions.create(**chat_body(png(world.dataset("val", 1, seed=0)[0].image), "how many shapes are there?"))
    m = httpx.get(server.url + "/metrics").text
    for name in ("emma_queue_depth", "emma_batch_size_bucket", "emma_request_latency_seconds_bucket", "emma_generated_tokens_total",
                 "emma_denoising_steps_total", "emma_errors_total", "emma_tokens_per_second"):
        assert name in m
    assert 'emma_requests_total{status="ok",task="understand"}' in m


def test_chat_matches_single_request(client, pipe, examples):
    for ex in examples[:4]:
        q = ex.qas[0].question
        want = pipe.understand(to_model(ex.image), q, 16, seed=0)
        r = client.chat.completions.create(**chat_body(png(ex.image), q), max_tokens=16, seed=0)
        assert r.choices[0].message.content == want.text
        assert r.choices[0].finish_reason == ("length" if len(want.token_ids) == 16 else "stop")
        assert r.usage.completion_tokens == len(want.token_ids)
        assert r.model == MODEL and r.object == "chat.completion"
    # sampling: temperature/top_p/seed give the CLI's tokens for that seed
    ex = examples[5]
    want = pipe.understand(to_model(ex.image), "describe the image", 12, temperature=1.0, top_p=0.9, seed=7)
    r = client.chat.completions.create(**chat_body(png(ex.image), "describe the image"), max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    assert r.choices[0].message.content == want.text


def test_chat_stream(client, pipe, examples):
    ex = examples[1]
    want = pipe.understand(to_model(ex.image), "describe the image", 24)
    chunks = list(client.chat.completions.create(**chat_body(png(ex.image), "describe the image"), max_tokens=24, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop" if len(want.token_ids) < 24 else "length"]
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_generate_matches_single_request(client, pipe, examples):
    prompt = examples[2].caption
    r = client.images.generate(model=MODEL, prompt=prompt, size="64x64", n=2, response_format="b64_json", extra_body={"seed": 11})
    assert len(r.data) == 2
    for i, d in enumerate(r.data):
        assert np.array_equal(decoded(d.b64_json), to_uint8(pipe.generate(prompt, 64, 64, seed=11 + i).image))
    # another size, and the sampler's extension fields
    r = client.images.generate(model=MODEL, prompt=prompt, size="96x64", extra_body={"seed": 3, "steps": 6, "cfg": 2.0})
    got = decoded(r.data[0].b64_json)
    assert got.shape == (64, 96, 3)
    assert np.array_equal(got, to_uint8(pipe.generate(prompt, 64, 96, steps=6, cfg=2.0, seed=3).image))


def test_edit_matches_single_request(client, pipe, examples):
    ex = examples[3]
    instr = ex.edits[0].instruction
    r = client.images.edit(model=MODEL, image=("in.png", png(ex.image), "image/png"), prompt=instr, extra_body={"seed": 5})
    assert np.array_equal(decoded(r.data[0].b64_json), to_uint8(pipe.edit(to_model(ex.image), instr, seed=5).image))


# ---- bad requests: 4xx JSON in OpenAI's error shape, never a traceback ----------------------------
def _big_png(w, h, noise=False):
    rgb = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8) if noise else np.full((h, w, 3), 128, np.uint8)
    return png(rgb)


@pytest.fixture(scope="module")
def shape_png(examples):
    return png(examples[0].image)


BAD = [
    # (name, method, path, kwargs builder(shape_png) -> httpx kwargs, status, code or None)
    ("remote url", "post", "/v1/chat/completions",
     lambda p: {"json": {"model": MODEL, "messages": [{"role": "user", "content": [
         {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}, {"type": "text", "text": "hi"}]}]}}, 400, "remote_url_refused"),
    ("no image", "post", "/v1/chat/completions", lambda p: {"json": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}}, 400,
     "one_image_required"),
    ("two images", "post", "/v1/chat/completions",
     lambda p: {"json": {"model": MODEL, "messages": [{"role": "user", "content": [
         {"type": "image_url", "image_url": {"url": data_url(p)}}, {"type": "image_url", "image_url": {"url": data_url(p)}},
         {"type": "text", "text": "hi"}]}]}}, 400, "one_image_required"),
    ("bad base64", "post", "/v1/chat/completions",
     lambda p: {"json": {"model": MODEL, "messages": [{"role": "user", "content": [
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}, {"type": "text", "text": "hi"}]}]}}, 400, "invalid_image_url"),
    ("not an image", "post", "/v1/chat/completions", lambda p: {"json": chat_body(b"GIF89a not really", "hi")}, 400, "invalid_image"),
    ("too many pixels", "post", "/v1/chat/completions", lambda p: {"json": chat_body(_big_png(300, 300), "hi")}, 400, "image_too_large"),
    ("body too large", "post", "/v1/chat/completions", lambda p: {"json": chat_body(_big_png(320, 320, noise=True), "hi")}, 413,
     "body_too_large"),
    ("prompt too long", "post", "/v1/chat/completions", lambda p: {"json": chat_body(p, "what " * 4000)}, 400, "prompt_too_long"),
    ("context exceeded", "post", "/v1/chat/completions", lambda p: {"json": chat_body(p, "hi", max_tokens=250)}, 400,
     "context_length_exceeded"),
    ("temperature type", "post", "/v1/chat/completions", lambda p: {"json": chat_body(p, "hi", temperature="hot")}, 400, None),
    ("chat n", "post", "/v1/chat/completions", lambda p: {"json": chat_body(p, "hi", n=2)}, 400, "invalid_n"),
    ("malformed json", "post", "/v1/chat/completions", lambda p: {"content": b"{not json", "headers": {"content-type": "application/json"}},
     400, None),
    ("wrong model", "post", "/v1/chat/completions", lambda p: {"json": {**chat_body(p, "hi"), "model": "gpt-4o"}}, 404, "model_not_found"),
    ("negative seed", "post", "/v1/chat/completions", lambda p: {"json": chat_body(p, "hi", seed=-1)}, 400, None),
    ("too many steps", "post", "/v1/images/generations", lambda p: {"json": {"prompt": "a red circle", "steps": 100000}}, 400, None),
    ("n too large", "post", "/v1/images/generations", lambda p: {"json": {"prompt": "a red circle", "n": 4}}, 400, "invalid_n"),
    ("n zero", "post", "/v1/images/generations", lambda p: {"json": {"prompt": "a red circle", "n": 0}}, 400, "invalid_n"),
    ("bad size", "post", "/v1/images/generations", lambda p: {"json": {"prompt": "a red circle", "size": "65x64"}}, 400, "invalid_size"),
    ("size too large", "post", "/v1/images/generations", lambda p: {"json": {"prompt": "a red circle", "size": "512x512"}}, 400,
     "image_too_large"),
    ("url format", "post", "/v1/images/generations", lambda p: {"json": {"prompt": "a red circle", "response_format": "url"}}, 400, None),
    ("empty prompt", "post", "/v1/images/generations", lambda p: {"json": {"prompt": ""}}, 400, None),
    ("edit as json", "post", "/v1/images/edits", lambda p: {"json": {"prompt": "make it blue"}}, 400, None),
    ("edit no image", "post", "/v1/images/edits", lambda p: {"data": {"prompt": "make it blue"}, "files": {"other": ("a", b"x")}}, 400, None),
    ("edit mask", "post", "/v1/images/edits",
     lambda p: {"data": {"prompt": "make it blue"}, "files": {"image": ("i.png", p, "image/png"), "mask": ("m.png", p, "image/png")}}, 400, None),
    ("edit bad seed", "post", "/v1/images/edits",
     lambda p: {"data": {"prompt": "make it blue", "seed": "x"}, "files": {"image": ("i.png", p, "image/png")}}, 400, None),
    ("edit size", "post", "/v1/images/edits",
     lambda p: {"data": {"prompt": "make it blue", "size": "128x128"}, "files": {"image": ("i.png", p, "image/png")}}, 400, "invalid_size"),
    ("unknown route", "get", "/v1/nothing", lambda p: {}, 404, None),
    ("wrong method", "get", "/v1/chat/completions", lambda p: {}, 405, None),
]


@pytest.mark.parametrize("name,method,path,build,status,code", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors(server, shape_png, name, method, path, build, status, code):
    r = getattr(httpx, method)(server.url + path, timeout=30, **build(shape_png))
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and "Traceback" not in r.text
    if code:
        assert err["code"] == code


def test_remote_url_refused_through_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, {"type": "text", "text": "what is it?"}]}])
    assert e.value.code == "remote_url_refused"


def test_queue_full_is_429_with_retry_after(pipe, examples):
    """An engine that is not running never drains its queue: the second queued job is refused."""
    from emma_runtime.serve.app import create_app

    sched = Scheduler(pipe, max_batch=1, max_queue=2)  # not started
    app = create_app(sched, LIMITS)
    transport = httpx.ASGITransport(app=app)

    async def go():
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            r1 = await c.post("/v1/images/generations", json={"prompt": "a red circle", "n": 3})
            sched.submit(UnderstandJob(to_model(examples[0].image), [1], 4), lambda *a: None, 60)
            sched.submit(UnderstandJob(to_model(examples[0].image), [1], 4), lambda *a: None, 60)
            r2 = await c.post("/v1/chat/completions", json=chat_body(png(examples[0].image), "how many shapes are there?"))
            return r1, r2

    for r in asyncio.run(go()):
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error" and r.json()["error"]["code"] == "queue_full"


# ---- the scheduler: batches, isolation, time limits ----------------------------------------------
class _Collect:
    def __init__(self):
        self.events = []
        self.done = threading.Event()

    def __call__(self, kind, payload):
        self.events.append((kind, payload))
        if kind != "token":
            self.done.set()

    @property
    def result(self):
        return self.events[-1]


class _Poisoned:
    """The pipeline, except that a batch holding a poisoned request raises (as a model failure would)."""

    def __init__(self, p, poison_token: int, poison_cfg: float):
        self._p, self.poison_token, self.poison_cfg = p, poison_token, poison_cfg

    def __getattr__(self, name):
        return getattr(self._p, name)

    def prefill_understand_batch(self, images, prompts, extra):
        if any(self.poison_token in ids for ids in prompts):
            raise RuntimeError("poisoned prefill")
        return self._p.prefill_understand_batch(images, prompts, extra)

    def denoise_rows(self, cache, members):
        if any(np.isclose(wk[0], self.poison_cfg) for _, wk, _, _ in members):
            raise RuntimeError("poisoned step")
        return self._p.denoise_rows(cache, members)


def _und_job(p, ex, q, max_tokens=8):
    ids = p.tokenizer.encode(q, add_special_tokens=False).ids
    return UnderstandJob(to_model(ex.image), ids, max_tokens)


def _gen_job(p, prompt, seed, cfg=None):
    d = p.dims
    return ImageJob("generate", prompt, 64, 64, d.steps, d.shift, seed, cfg=d.cfg if cfg is None else cfg)


def test_failure_in_a_batch_fails_only_its_request(pipe, examples):
    poison_tok = pipe.tokenizer.encode("red", add_special_tokens=False).ids[0]
    sched = Scheduler(_Poisoned(pipe, poison_tok, 7.25), max_batch=8, max_queue=64)
    good_q = [ex.qas[0].question for ex in examples[:4]]
    assert not any(poison_tok in pipe.tokenizer.encode(q, add_special_tokens=False).ids for q in good_q)
    und = [(_Collect(), _und_job(pipe, ex, q)) for ex, q in zip(examples[:4], good_q)]
    bad_und = (_Collect(), _und_job(pipe, examples[4], "is there a red shape?"))
    gens = [(_Collect(), _gen_job(pipe, examples[i].caption, i)) for i in range(3)]
    bad_gen = (_Collect(), _gen_job(pipe, examples[3].caption, 3, cfg=7.25))
    for sink, job in und[:2] + [bad_und] + und[2:] + gens[:1] + [bad_gen] + gens[1:]:
        sched.submit(job, sink, 60)  # all queued before the engine starts: they share one batch
    sched.start()
    try:
        for sink, _ in und + [bad_und] + gens + [bad_gen]:
            assert sink.done.wait(60)
    finally:
        sched.stop()
    for (sink, job), ex, q in zip(und, examples[:4], good_q):
        kind, r = sink.result
        assert kind == "done" and r.token_ids == pipe.understand(to_model(ex.image), q, 8).token_ids
    for sink, job in gens:
        kind, r = sink.result
        assert kind == "done"
        assert np.array_equal(to_uint8(r.image), to_uint8(pipe.generate(job.prompt, seed=job.seed).image))
    for sink, _ in (bad_und, bad_gen):
        kind, e = sink.result
        assert kind == "error" and e.status == 500 and e.kind == "server_error"
    assert sched.metrics.registry.get_sample_value("emma_batch_size_sum", {"stage": "denoise"}) > len(gens)


def test_request_past_its_deadline_gets_504(pipe, examples):
    sched = Scheduler(pipe).start()
    try:
        sink = _Collect()
        sched.submit(_und_job(pipe, examples[0], "how many shapes are there?"), sink, timeout=-1.0)
        assert sink.done.wait(30)
        kind, e = sink.result
        assert kind == "error" and isinstance(e, ServeError) and e.status == 504
    finally:
        sched.stop()


def test_batched_images_within_measured_tolerance(pipe):
    """Default batching puts prompts of different lengths in one denoising batch; their attention sums
    run over padding, so latents move slightly. Measured: <= 1e-6 and no pixel more than one level
    off; --exact-images (below, and the load test) is bit-identical."""
    prompts = ["a red circle", "a small blue triangle at the bottom left of the picture", "two green squares", "a yellow circle"]
    for exact in (False, True):
        sched = Scheduler(pipe, max_batch=8, exact_images=exact)
        jobs = [(_Collect(), _gen_job(pipe, pr, i)) for i, pr in enumerate(prompts)]
        for job in jobs:
            job[1].prefix_positions = len(pipe.tokenizer.encode(job[1].prompt, add_special_tokens=False).ids) + 3
        for sink, job in jobs:
            sched.submit(job, sink, 60)
        sched.start()
        try:
            for sink, _ in jobs:
                assert sink.done.wait(60)
        finally:
            sched.stop()
        for sink, job in jobs:
            kind, r = sink.result
            ref = pipe.generate(job.prompt, seed=job.seed)
            if exact:
                assert np.array_equal(r.latents, ref.latents) and np.array_equal(r.image, ref.image)
            else:
                assert np.abs(r.latents - ref.latents).max() <= 1e-5
                assert np.abs(to_uint8(r.image).astype(int) - to_uint8(ref.image)).max() <= 1


# ---- load: every answer is the single-request answer ----------------------------------------------
def test_load_32_clients_every_answer_matches(serve_bundle, pipe, examples):
    """32 concurrent clients, 96 requests (64 understanding, 16 generation, 16 edits), a time limit;
    images bit-identical with --exact-images, tokens identical in any mode."""
    und, gen, edit = [], [], []
    for i in range(64):
        ex = examples[i % len(examples)]
        # short answers and descriptions (up to max_tokens): rows join while others are mid-answer
        q = "describe the image" if i % 3 == 0 else ex.qas[i % len(ex.qas)].question
        temp, seed = (0.0, 0) if i % 4 else (1.0, i)
        und.append((ex, q, temp, seed))
    for i in range(16):
        gen.append((examples[i % len(examples)].caption, 100 + i))
        ex = examples[(i + 5) % len(examples)]
        edit.append((ex, ex.edits[i % len(ex.edits)].instruction, 200 + i))
    want_und = [pipe.understand(to_model(ex.image), q, 8, temperature=t, seed=s).text for ex, q, t, s in und]
    want_gen = [to_uint8(pipe.generate(pr, seed=s).image) for pr, s in gen]
    want_edit = [to_uint8(pipe.edit(to_model(ex.image), ins, seed=s).image) for ex, ins, s in edit]

    reqs = [("/v1/chat/completions", {"json": chat_body(png(ex.image), q, max_tokens=8, temperature=t, seed=s)}) for ex, q, t, s in und]
    reqs += [("/v1/images/generations", {"json": {"prompt": pr, "seed": s}}) for pr, s in gen]
    reqs += [("/v1/images/edits", {"data": {"prompt": ins, "seed": str(s)}, "files": {"image": ("i.png", png(ex.image), "image/png")}})
             for ex, ins, s in edit]
    order = np.random.default_rng(0).permutation(len(reqs))  # tasks interleaved
    results, latency = [None] * len(reqs), [0.0] * len(reqs)

    srv = BackgroundServer(Settings(str(serve_bundle), max_batch=8, max_queue=128, exact_images=True, limits=LIMITS)).start()
    try:
        async def run():
            queue = list(order)

            async def worker(c):
                while queue:
                    i = queue.pop()
                    path, kw = reqs[i]
                    t0 = time.perf_counter()
                    r = await c.post(path, **kw)
                    latency[i] = time.perf_counter() - t0
                    results[i] = (r.status_code, r.json())

            async with httpx.AsyncClient(base_url=srv.url, timeout=120, limits=httpx.Limits(max_connections=32)) as c:
                t0 = time.perf_counter()
                await asyncio.wait_for(asyncio.gather(*(worker(c) for _ in range(32))), 150)
                return time.perf_counter() - t0

        wall = asyncio.run(run())
        reg = srv.scheduler.metrics.registry
        mean_batch = {st: reg.get_sample_value("emma_batch_size_sum", {"stage": st}) / reg.get_sample_value("emma_batch_size_count", {"stage": st})
                      for st in ("prefill", "decode", "denoise")}
    finally:
        srv.stop()
    assert all(r is not None and r[0] == 200 for r in results), [r for r in results if r is None or r[0] != 200][:3]
    for i, (ex, q, t, s) in enumerate(und):
        assert results[i][1]["choices"][0]["message"]["content"] == want_und[i], (i, q)
    for j, want in enumerate(want_gen + want_edit):
        assert np.array_equal(decoded(results[len(und) + j][1]["data"][0]["b64_json"]), want), j
    lat = sorted(latency)
    print(f"\nload: {len(reqs)} requests from 32 clients in {wall:.2f} s = {len(reqs) / wall:.1f} req/s; "
          f"p50 {statistics.median(lat) * 1000:.0f} ms, p99 {lat[int(0.99 * (len(lat) - 1))] * 1000:.0f} ms; "
          f"mean batch " + ", ".join(f"{k} {v:.1f}" for k, v in mean_batch.items()))
    assert mean_batch["decode"] > 1.5 and mean_batch["denoise"] > 1.5  # it did batch
    assert wall < 150


# ---- the command line ------------------------------------------------------------------------------
@pytest.mark.parametrize("args,message", [
    (["--bundle", "/nonexistent/bundle"], "error: "),
    (["--replicas", "2"], "error: --replicas, --max-replicas and --ray-address need --ray"),
    (["--ray", "--replicas", "3", "--max-replicas", "2"], "error: --max-replicas (2) is below --replicas (3)"),
])
def test_serve_command_bad_arguments(serve_bundle, args, message):
    from click.testing import CliRunner

    from emma_runtime.cli import main

    if "--bundle" not in args:
        args = ["--bundle", str(serve_bundle)] + args
    r = CliRunner().invoke(main, ["serve"] + args)
    assert r.exit_code == 2
    assert message in r.output and "Traceback" not in r.output
