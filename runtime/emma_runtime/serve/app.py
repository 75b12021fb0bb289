"""The FastAPI app: OpenAI's chat completions (understanding), image generations and image edits,
plus /v1/models, /health and /metrics. Every error, a bad request or not, is JSON in OpenAI's error
shape; no traceback leaves the server."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..images import to_uint8
from ..pipelines import Pipeline
from .inputs import ServeLimits, decode_image, edit_jobs, generation_jobs, understand_job
from .scheduler import ImageResult, Scheduler, ServeError, UnderstandResult
from .schemas import ChatRequest, ImageGenerationRequest, error_body

log = logging.getLogger("emma_runtime.serve")


def model_id(p: Pipeline) -> str:
    return f"emma-{p.bundle.manifest.config_name}"


def png_b64(image) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class BodyLimit:
    """413 for a body over the limit, from its Content-Length or, without one, as it arrives."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = ServeError(f"request body over the server's limit of {self.max_bytes} bytes", 413, code="body_too_large")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _send_error(send, too_big)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooBig()
            return msg

        started = False

        async def tracking_send(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited, tracking_send)
        except _TooBig:
            if not started:
                await _send_error(send, too_big)


class _TooBig(Exception):
    pass


async def _send_error(send, e: ServeError) -> None:
    body = json.dumps(error_body(e.message, e.kind, e.param, e.code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in e.headers.items()]
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _error_response(e: ServeError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.kind, e.param, e.code), status_code=e.status, headers=e.headers)


def _validation_message(errors) -> tuple[str, str | None]:
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x not in ("body",)]
    param = ".".join(loc) or None
    return (f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")), param


def create_app(scheduler: Scheduler, limits: ServeLimits) -> FastAPI:
    p = scheduler.p
    mid = model_id(p)
    metrics = scheduler.metrics
    app = FastAPI(title="EMMA", summary="OpenAI-compatible understanding, generation and editing", docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)

    @app.exception_handler(ServeError)
    async def _serve_error(request, e: ServeError):
        if e.status != 429 and e.code not in ("timeout",):
            metrics.errors.labels("invalid_request" if e.status < 500 else "internal").inc()
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        metrics.errors.labels("invalid_request").inc()
        msg, param = _validation_message(e.errors())
        return _error_response(ServeError(msg, 400, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        metrics.errors.labels("invalid_request" if e.status_code < 500 else "internal").inc()
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error_response(ServeError(f"{request.method} {request.url.path}: {e.detail}", e.status_code, kind))

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        metrics.errors.labels("internal").inc()
        return _error_response(ServeError("internal server error; see the server log", 500, "server_error"))

    def check_model(name: str | None) -> None:
        if name not in (None, "", mid):
            raise ServeError(f"model {name!r} is not served here; this server serves {mid!r}", 404, "not_found_error",
                             param="model", code="model_not_found")

    async def parse(request: Request, model):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ServeError("the request body is not valid JSON") from None
        try:
            return model.model_validate(body)
        except ValidationError as e:
            msg, param = _validation_message(e.errors())
            raise ServeError(msg, param=param) from None

    async def wait_all(jobs) -> list:
        """Submits the jobs (all or none) and waits for their results."""
        loop = asyncio.get_running_loop()
        futures, tickets = [], []

        def sink_for(fut):
            def sink(kind, payload):
                if kind != "token":
                    loop.call_soon_threadsafe(_settle, fut, kind, payload)
            return sink

        try:
            for job in jobs:
                fut = loop.create_future()
                tickets.append(scheduler.submit(job, sink_for(fut), limits.request_timeout_s))
                futures.append(fut)
            # The engine times a request out itself; this wait only guards against a stuck engine.
            done = await asyncio.wait_for(asyncio.gather(*futures), limits.request_timeout_s + 10)
        except asyncio.TimeoutError:
            raise ServeError("the request ran past the server's time limit", 504, "timeout_error", code="timeout") from None
        finally:
            for t in tickets:
                t.cancel()  # no-op for finished requests; drops the rest (another failed, or the client left)
        return done

    @app.get("/health")
    async def health():
        ok = scheduler.alive()
        return JSONResponse({"status": "ok" if ok else "engine stopped", "model": mid, "queue_depth": scheduler.queue_depth(),
                             "max_batch": scheduler.max_batch}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": mid, "object": "model", "created": 0, "owned_by": "emma-deploy"}]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        check_model(name)
        return {"id": mid, "object": "model", "created": 0, "owned_by": "emma-deploy"}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req: ChatRequest = await parse(request, ChatRequest)
        check_model(req.model)
        if req.n not in (None, 1):
            raise ServeError("n must be 1 for chat completions", param="n", code="invalid_n")
        job = understand_job(p, req.messages, req.max_completion_tokens or req.max_tokens, req.temperature, req.top_p, req.seed, limits)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return _stream_chat(scheduler, job, limits, cid, created, mid, usage)
        (r,) = await wait_all([job])
        text = _text(p, r.token_ids)
        return {"id": cid, "object": "chat.completion", "created": created, "model": mid, "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": r.finish_reason}],
                "usage": _usage(job, r)}

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        req: ImageGenerationRequest = await parse(request, ImageGenerationRequest)
        check_model(req.model)
        _check_format(req.response_format)
        jobs = generation_jobs(p, req.prompt, req.size, req.n, req.seed, req.steps, req.cfg, limits)
        return _images(await wait_all(jobs))

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise ServeError("images/edits takes multipart/form-data (an image file and a prompt)", param="image")
        try:
            form = await request.form(max_files=4, max_fields=64, max_part_size=limits.max_body_bytes)
        except Exception as e:  # the multipart parser's errors: a malformed or oversized form
            raise ServeError(f"unreadable multipart form ({e})") from None
        f = _field(form, "model")
        check_model(f)
        if form.get("mask") is not None:
            raise ServeError("masks are not supported: EMMA edits the whole image from the instruction", param="mask")
        uploads = [v for k in ("image", "image[]") for v in form.getlist(k)]
        if len(uploads) != 1 or isinstance(uploads[0], str):
            raise ServeError(f"send exactly one image file in the 'image' field (got {len(uploads)})", param="image")
        prompt = _field(form, "prompt")
        if not prompt:
            raise ServeError("prompt is required", param="prompt")
        _check_format(_field(form, "response_format"))
        image = decode_image(p, await uploads[0].read(), limits, "image")
        jobs = edit_jobs(p, image, prompt, _field(form, "size"), _int(form, "n", 1), _int(form, "seed", None), _int(form, "steps", None),
                         _float(form, "cfg_text"), _float(form, "cfg_image"), limits)
        return _images(await wait_all(jobs))

    return app


def _settle(fut: asyncio.Future, kind: str, payload) -> None:
    if fut.done():
        return
    if kind == "done":
        fut.set_result(payload)
    else:
        fut.set_exception(payload)


def _check_format(fmt: str | None) -> None:
    if fmt not in (None, "b64_json"):
        raise ServeError("this server returns images inline: use response_format 'b64_json'", param="response_format",
                         code="unsupported_response_format")


def _field(form, name: str) -> str | None:
    v = form.get(name)
    if v is not None and not isinstance(v, str):
        raise ServeError(f"{name} must be a form field, not a file", param=name)
    return v


def _int(form, name: str, default):
    v = _field(form, name)
    if v in (None, ""):
        return default
    try:
        return int(v)
    except ValueError:
        raise ServeError(f"{name} must be an integer, got {v!r}", param=name) from None


def _float(form, name: str):
    v = _field(form, name)
    if v in (None, ""):
        return None
    try:
        return float(v)
    except ValueError:
        raise ServeError(f"{name} must be a number, got {v!r}", param=name) from None


def _images(results: list[ImageResult]) -> dict:
    return {"created": int(time.time()), "data": [{"b64_json": png_b64(r.image), "revised_prompt": None} for r in results]}


def _text(p: Pipeline, ids: list[int]) -> str:
    return p.tokenizer.decode(ids).strip()  # as Pipeline.understand: word-merging tokenizers decode with a leading space


def _usage(job, r: UnderstandResult) -> dict:
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": len(r.token_ids), "total_tokens": job.prompt_tokens + len(r.token_ids)}


def _stream_chat(scheduler: Scheduler, job, limits: ServeLimits, cid: str, created: int, mid: str, include_usage: bool) -> StreamingResponse:
    """Server-sent events in OpenAI's chunk format. The job is submitted before the response starts,
    so a full queue is still a 429; an error after that arrives as a last ``data: {"error": ...}``."""
    p = scheduler.p
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    ticket = scheduler.submit(job, lambda kind, payload: loop.call_soon_threadsafe(events.put_nowait, (kind, payload)),
                              limits.request_timeout_s)

    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None, choices: bool = True) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": mid, "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if choices else []}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    async def body():
        ids: list[int] = []
        sent = ""
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                try:
                    kind, payload = await asyncio.wait_for(events.get(), limits.request_timeout_s + 10)
                except asyncio.TimeoutError:
                    payload, kind = ServeError("the request ran past the server's time limit", 504, "timeout_error", code="timeout"), "error"
                if kind == "token":
                    ids.append(payload)
                    # Whitespace at the end and a half-decoded character wait for the next token, so the
                    # deltas add up to the non-streamed answer (which is stripped).
                    text = p.tokenizer.decode(ids).strip().rstrip("\ufffd")
                    if text.startswith(sent) and len(text) > len(sent):
                        yield chunk({"content": text[len(sent):]})
                        sent = text
                elif kind == "done":
                    final = _text(p, payload.token_ids)
                    if final.startswith(sent) and len(final) > len(sent):
                        yield chunk({"content": final[len(sent):]})
                    yield chunk({}, payload.finish_reason)
                    if include_usage:
                        yield chunk({}, usage=_usage(job, payload), choices=False)
                    yield "data: [DONE]\n\n"
                    return
                else:
                    e: ServeError = payload
                    yield f"data: {json.dumps(error_body(e.message, e.kind, e.param, e.code))}\n\n"
                    return
        finally:
            ticket.cancel()

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
