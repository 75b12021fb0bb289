"""HTTP requests -> checked jobs: images from data: URLs and uploads, sizes, prompt and context limits.

Everything a request could get wrong is refused here, before it reaches a batch, with a 4xx
``ServeError`` naming the field; the scheduler only sees jobs the model can run. The checks the CLI
and the Python API make (``emma_runtime.limits``, the pipeline's) apply here too, with the same
numbers; ``ServeLimits`` adds what only a server needs (body size, pixels as sent, n, time).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass

import numpy as np

from .. import template
from ..images import ImageError, load_image
from ..limits import RequestError
from ..pipelines import Pipeline
from .scheduler import ImageJob, ServeError, UnderstandJob

FORMATS = {"PNG", "JPEG", "WEBP"}


@dataclass(frozen=True)
class ServeLimits:
    max_body_bytes: int = 8 << 20  # the whole request body
    max_pixels: int = 1 << 20  # an input image as sent (read from its header), and an output size
    max_n: int = 4  # images per generation/edit request
    request_timeout_s: float = 60.0


def _checked(fn, *args, param: str, code: str | None = None):
    """A pipeline limit's check; its RequestError becomes a 400 naming the field."""
    try:
        return fn(*args)
    except RequestError as e:
        raise ServeError(f"{param}: {e}", param=param, code=code) from None


def decode_image(p: Pipeline, data: bytes, limits: ServeLimits, param: str) -> np.ndarray:
    """PNG/JPEG/WebP bytes -> (1, 3, H, W) in [-1, 1], read by ``images.load_image`` with the pipeline's
    size rule (the CLI's pixels for the same file). Format and pixel count come from the header,
    before anything is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ServeError(f"{param}: not a readable PNG/JPEG/WebP image ({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                         param=param, code="invalid_image") from None
    if fmt not in FORMATS:
        raise ServeError(f"{param}: image format {fmt} is not accepted (PNG, JPEG or WebP)", param=param, code="invalid_image")

    def fit(h: int, w: int) -> tuple[int, int]:
        if w * h > limits.max_pixels:
            raise ServeError(f"{param}: image of {w}x{h} pixels is over the server's limit of {limits.max_pixels} pixels",
                             param=param, code="image_too_large")
        return p.limits.fit(h, w)

    try:
        return load_image(data, p.dims.cell, fit=fit)
    except (ImageError, RequestError) as e:
        raise ServeError(f"{param}: {e}", param=param, code="invalid_image") from None


_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,(?P<data>.*)$", re.S)


def image_from_url(p: Pipeline, url: str, limits: ServeLimits, param: str) -> np.ndarray:
    if re.match(r"^(https?|ftp|file):", url, re.I):
        raise ServeError(f"{param}: remote image URLs are refused (the server fetches nothing); send the image inline as a "
                         "data: URL with base64 PNG/JPEG/WebP", param=param, code="remote_url_refused")
    m = _DATA_URL.match(url)
    if not m:
        raise ServeError(f"{param}: image_url must be a data: URL (data:image/png;base64,...)", param=param, code="invalid_image_url")
    if not m["b64"]:
        raise ServeError(f"{param}: the data: URL must be base64-encoded", param=param, code="invalid_image_url")
    try:
        data = base64.b64decode(m["data"], validate=True)
    except (binascii.Error, ValueError):
        raise ServeError(f"{param}: the data: URL's base64 does not decode", param=param, code="invalid_image_url") from None
    return decode_image(p, data, limits, param)


def parse_size(p: Pipeline, size: str | None, limits: ServeLimits, param: str = "size") -> tuple[int, int]:
    """OpenAI's "WxH" -> (H, W)."""
    d = p.dims
    if size is None or size == "auto":
        return d.default_image_size, d.default_image_size
    m = re.fullmatch(r"\s*(\d{1,5})\s*x\s*(\d{1,5})\s*", size)
    if not m:
        raise ServeError(f"size must be 'WIDTHxHEIGHT' (e.g. '{d.default_image_size}x{d.default_image_size}'), got {size!r}",
                         param=param, code="invalid_size")
    W, H = int(m[1]), int(m[2])
    if W * H > limits.max_pixels:
        raise ServeError(f"size {size} is over the server's limit of {limits.max_pixels} pixels", param=param, code="image_too_large")
    return _checked(p.limits.image_size, H, W, param=param, code="invalid_size")


def _prompt_ids(p: Pipeline, prompt: str, param: str) -> list[int]:
    # Special tokens in user text are plain text (template.text_ids): a prompt cannot forge the template.
    return template.text_ids(p.tokenizer, _checked(p.limits.prompt, prompt, param=param, code="prompt_too_long"))


def _positions(segments, image_tokens: int) -> int:
    return sum(len(s.ids) if isinstance(s, template.Text) else image_tokens for s in segments)


def _check_context(p: Pipeline, need: int, what: str, param: str) -> None:
    if need > p.dims.max_context:
        raise ServeError(f"{what} needs {need} positions, more than the model's context of {p.dims.max_context}",
                         param=param, code="context_length_exceeded")


def understand_job(p: Pipeline, messages: list, max_tokens: int | None, temperature: float | None, top_p: float | None,
                   seed: int | None, limits: ServeLimits) -> UnderstandJob:
    """Chat messages -> one understanding job. The model answers one question about one image: the
    image is the one image_url part in the messages, the question the text of the last user message
    (earlier turns and system text are not part of EMMA's understanding template)."""
    images, question = [], None
    for i, msg in enumerate(messages):
        content = msg.content
        parts = [] if content is None else ([{"type": "text", "text": content}] if isinstance(content, str) else content)
        texts = []
        for j, part in enumerate(parts):
            part = part if isinstance(part, dict) else part.model_dump()
            if part.get("type") == "text":
                texts.append(part.get("text") or "")
            elif part.get("type") == "image_url":
                url = (part.get("image_url") or {}).get("url")
                if not isinstance(url, str):
                    raise ServeError(f"messages[{i}].content[{j}].image_url.url is missing", param=f"messages[{i}].content[{j}]")
                images.append((url, f"messages[{i}].content[{j}].image_url"))
            else:
                raise ServeError(f"messages[{i}].content[{j}]: part type {part.get('type')!r} is not supported (text, image_url)",
                                 param=f"messages[{i}].content[{j}]")
        if msg.role == "user":
            question = (" ".join(t.strip() for t in texts if t.strip()), f"messages[{i}].content")
    if len(images) != 1:
        raise ServeError(f"the messages must hold exactly one image (an image_url part), found {len(images)}", param="messages",
                         code="one_image_required")
    if question is None or not question[0]:
        raise ServeError("the last user message must ask a question in a text part", param="messages")
    url, param = images[0]
    L = p.limits
    max_tokens = _checked(L.new_tokens, 32 if max_tokens is None else max_tokens, param="max_tokens")
    temperature = _checked(L.number, "temperature", 0.0 if temperature is None else temperature, 0.0, L.max_temperature, param="temperature")
    top_p = _checked(L.number, "top_p", 1.0 if top_p is None else top_p, 0.0, 1.0, True, param="top_p")
    seed = _checked(L.seed, 0 if seed is None else seed, param="seed")
    image = image_from_url(p, url, limits, param)
    ids = _prompt_ids(p, question[0], question[1])
    prefix = _positions(template.understand(p.special, ids), (image.shape[2] // p.dims.cell) * (image.shape[3] // p.dims.cell))
    _check_context(p, prefix + max_tokens, f"the question, the image and max_tokens={max_tokens}", "max_tokens")
    return UnderstandJob(image, ids, max_tokens, temperature, top_p, seed, prefix)


def _sampler(p: Pipeline, n: int, steps: int | None, seed: int | None, limits: ServeLimits) -> tuple[int, int]:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limits.max_n:
        raise ServeError(f"n must be between 1 and {limits.max_n}, got {n}", param="n", code="invalid_n")
    steps = _checked(p.limits.steps, p.dims.steps if steps is None else steps, param="steps")
    seed = _checked(p.limits.seed, 0 if seed is None else seed, param="seed")
    _checked(p.limits.seed, seed + n - 1, param="seed")  # image i takes seed + i
    return steps, seed


def _guidance(p: Pipeline, name: str, v: float | None, default: float) -> float:
    L = p.limits
    return _checked(L.number, name, default if v is None else v, -L.max_guidance, L.max_guidance, param=name)


def generation_jobs(p: Pipeline, prompt: str, size: str | None, n: int, seed: int | None, steps: int | None, cfg: float | None,
                    limits: ServeLimits) -> list[ImageJob]:
    """n jobs; image i uses seed + i, so n=1 with seed s is the CLI's ``generate --seed s``."""
    d = p.dims
    steps, seed = _sampler(p, n, steps, seed, limits)
    cfg = _guidance(p, "cfg", cfg, d.cfg)
    H, W = parse_size(p, size, limits)
    ids = _prompt_ids(p, prompt, "prompt")
    L = (H // d.cell) * (W // d.cell)
    prefix = _positions(template.split_prefix(template.generate(p.special, ids))[0], L)
    _check_context(p, prefix + L, f"the prompt and a {W}x{H} image", "prompt")
    return [ImageJob("generate", prompt, H, W, steps, d.shift, seed + i, cfg=cfg, prefix_positions=prefix) for i in range(n)]


def edit_jobs(p: Pipeline, image: np.ndarray, prompt: str, size: str | None, n: int, seed: int | None, steps: int | None,
              cfg_text: float | None, cfg_image: float | None, limits: ServeLimits) -> list[ImageJob]:
    d = p.dims
    steps, seed = _sampler(p, n, steps, seed, limits)
    s_txt, s_img = _guidance(p, "cfg_text", cfg_text, d.cfg_text), _guidance(p, "cfg_image", cfg_image, d.cfg_image)
    H, W = image.shape[2], image.shape[3]
    if size not in (None, "auto") and parse_size(p, size, limits) != (H, W):
        raise ServeError(f"size {size}: an edit keeps the input image's size ({W}x{H} after rounding to multiples of {d.cell})",
                         param="size", code="invalid_size")
    ids = _prompt_ids(p, prompt, "prompt")
    L = (H // d.cell) * (W // d.cell)
    prefix = _positions(template.split_prefix(template.edit(p.special, ids, True, d.reference_branch))[0], L)
    _check_context(p, prefix + L, f"the prompt, a {W}x{H} reference and its {W}x{H} target", "prompt")
    return [ImageJob("edit", prompt, H, W, steps, d.shift, seed + i, cfg_text=s_txt, cfg_image=s_img, image=image,
                     prefix_positions=prefix) for i in range(n)]
