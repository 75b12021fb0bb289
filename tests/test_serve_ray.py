"""`emma-run serve --ray`: the same app as a Ray Serve deployment with two replicas on a local Ray
cluster bound to loopback, answering the openai client as the one-process server does."""

import base64
import io
import os
import time

import numpy as np
import pytest

# Ray's single-host mode: its services on 127.0.0.1 (read when ray is first imported).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("ray.serve")

from concurrent.futures import ThreadPoolExecutor  # noqa: E402

from PIL import Image  # noqa: E402

from shapes_world import world  # noqa: E402
from emma_runtime.images import to_model, to_uint8  # noqa: E402
from emma_runtime.pipelines import Pipeline  # noqa: E402
from emma_runtime.serve.server import Settings, free_port  # noqa: E402

MODEL = "emma-shapes"


def png(rgb):
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def decoded(b64):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def chat_kwargs(image, question, **kw):
    url = "data:image/png;base64," + base64.b64encode(png(image)).decode()
    return {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}], **kw}


@pytest.fixture(scope="module")
def ray_url(serve_bundle):
    from emma_runtime.serve import ray_deploy

    port = free_port()
    # Ray Serve's proxy and controller take no CPU; each replica one of the two.
    url = ray_deploy.start(Settings(str(serve_bundle), max_batch=4), "127.0.0.1", port, replicas=2, local_cpus=2)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    yield url
    ray_deploy.stop()


@pytest.fixture(scope="module")
def pipe(serve_bundle):
    return Pipeline.load(serve_bundle)


def test_two_replicas_serve_the_three_tasks(ray_url, pipe):
    from ray import serve

    from emma_runtime.serve.ray_deploy import APP_NAME

    status = serve.status().applications[APP_NAME]
    assert status.status == "RUNNING"
    (dep,) = status.deployments.values()
    assert dep.replica_states.get("RUNNING") == 2

    client = openai.OpenAI(base_url=ray_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == [MODEL]
    exs = world.dataset("val", 8, seed=0)

    def ask(ex):
        q = ex.qas[0].question
        r = client.chat.completions.create(**chat_kwargs(ex.image, q), max_tokens=8)
        return r.choices[0].message.content, pipe.understand(to_model(ex.image), q, 8).text

    with ThreadPoolExecutor(8) as pool:  # enough at once for both replicas to take some
        for got, want in pool.map(ask, exs):
            assert got == want

    ex = exs[0]
    chunks = list(client.chat.completions.create(**chat_kwargs(ex.image, "describe the image"), max_tokens=16, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == pipe.understand(to_model(ex.image), "describe the image", 16).text

    g = client.images.generate(model=MODEL, prompt=ex.caption, extra_body={"seed": 4})
    assert np.array_equal(decoded(g.data[0].b64_json), to_uint8(pipe.generate(ex.caption, seed=4).image))
    instr = ex.edits[0].instruction
    e = client.images.edit(model=MODEL, image=("in.png", png(ex.image), "image/png"), prompt=instr, extra_body={"seed": 2})
    assert np.array_equal(decoded(e.data[0].b64_json), to_uint8(pipe.edit(to_model(ex.image), instr, seed=2).image))

    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}, {"type": "text", "text": "hi"}]}])
    assert err.value.code == "remote_url_refused"
    assert "emma_request_latency_seconds" in httpx.get(ray_url + "/metrics").text


def test_autoscaling_deployment_options(serve_bundle):
    """--replicas 1 --max-replicas 4: Ray Serve autoscales on each replica's ongoing requests, with
    max_batch as the target; without --max-replicas the count is fixed."""
    from emma_runtime.serve.ray_deploy import application

    auto = application(Settings(str(serve_bundle), max_batch=6, max_queue=10), replicas=1, max_replicas=4)
    cfg = auto._bound_deployment._deployment_config
    assert cfg.autoscaling_config.min_replicas == 1 and cfg.autoscaling_config.max_replicas == 4
    assert cfg.autoscaling_config.target_ongoing_requests == 6
    assert cfg.max_ongoing_requests == 16
    fixed = application(Settings(str(serve_bundle)), replicas=3)
    assert fixed._bound_deployment._deployment_config.num_replicas == 3
