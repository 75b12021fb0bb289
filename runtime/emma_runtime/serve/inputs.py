"""HTTP requests -> checked jobs: images from data: URLs and uploads, sizes, prompt and context limits.

Everything a request could get wrong is refused here, before it reaches a batch, with a 4xx
``ServeError`` naming the field; the scheduler only sees jobs the model can run.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass

import numpy as np

from .. import template
from ..images import nearest_multiple, to_model
from ..pipelines import Pipeline
from .scheduler import ImageJob, ServeError, UnderstandJob

FORMATS = {"PNG", "JPEG", "WEBP"}


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 8 << 20  # the whole request body
    max_pixels: int = 1 << 20  # an input image as sent, before resizing; also an output size
    max_prompt_chars: int = 8000  # before tokenizing; the context limit applies after
    max_n: int = 4  # images per generation/edit request
    max_steps: int = 200  # denoising steps a request may ask for
    request_timeout_s: float = 60.0


def decode_image(data: bytes, cell: int, limits: Limits, param: str) -> np.ndarray:
    """PNG/JPEG/WebP bytes -> (1, 3, H, W) in [-1, 1], each side resized (bicubic) to the nearest
    multiple of ``cell`` as ``images.load_image`` does for a file, so the server and the CLI see the
    same pixels. The pixel limit is checked on the header, before the image is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in FORMATS:
                raise ServeError(f"{param}: image format {im.format} is not accepted (PNG, JPEG or WebP)", param=param, code="invalid_image")
            w, h = im.size
            if w * h > limits.max_pixels:
                raise ServeError(f"{param}: image of {w}x{h} pixels is over the server's limit of {limits.max_pixels} pixels",
                                 param=param, code="image_too_large")
            im = im.convert("RGB")
            H, W = nearest_multiple(h, cell), nearest_multiple(w, cell)
            if (H, W) != (h, w):
                im = im.resize((W, H), Image.BICUBIC)
            a = np.asarray(im, dtype=np.float32)
    except ServeError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ServeError(f"{param}: not a readable PNG/JPEG/WebP image ({e})", param=param, code="invalid_image") from None
    return to_model(a)


_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,(?P<data>.*)$", re.S)


def image_from_url(url: str, cell: int, limits: Limits, param: str) -> np.ndarray:
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
    return decode_image(data, cell, limits, param)


def parse_size(size: str | None, default: int, cell: int, limits: Limits, param: str = "size") -> tuple[int, int]:
    """OpenAI's "WxH" -> (H, W)."""
    if size is None or size == "auto":
        return default, default
    m = re.fullmatch(r"\s*(\d{1,5})\s*x\s*(\d{1,5})\s*", size)
    if not m:
        raise ServeError(f"size must be 'WIDTHxHEIGHT' (e.g. '{default}x{default}'), got {size!r}", param=param, code="invalid_size")
    W, H = int(m[1]), int(m[2])
    if W <= 0 or H <= 0 or W % cell or H % cell:
        raise ServeError(f"size {size}: width and height must be positive multiples of {cell}", param=param, code="invalid_size")
    if W * H > limits.max_pixels:
        raise ServeError(f"size {size} is over the server's limit of {limits.max_pixels} pixels", param=param, code="image_too_large")
    return H, W


def _prompt_ids(p: Pipeline, prompt: str, limits: Limits, param: str) -> list[int]:
    if len(prompt) > limits.max_prompt_chars:
        raise ServeError(f"{param}: prompt of {len(prompt)} characters is over the server's limit of {limits.max_prompt_chars}",
                         param=param, code="prompt_too_long")
    return p.tokenizer.encode(prompt, add_special_tokens=False).ids


def _positions(segments, image_tokens: int) -> int:
    return sum(len(s.ids) if isinstance(s, template.Text) else image_tokens for s in segments)


def _check_context(p: Pipeline, need: int, what: str, param: str) -> None:
    if need > p.dims.max_context:
        raise ServeError(f"{what} needs {need} positions, more than the model's context of {p.dims.max_context}",
                         param=param, code="context_length_exceeded")


def understand_job(p: Pipeline, messages: list, max_tokens: int | None, temperature: float | None, top_p: float | None,
                   seed: int | None, limits: Limits) -> UnderstandJob:
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
    image = image_from_url(url, p.dims.cell, limits, param)
    ids = _prompt_ids(p, question[0], limits, question[1])
    max_tokens = 32 if max_tokens is None else max_tokens
    prefix = _positions(template.understand(p.special, ids), (image.shape[2] // p.dims.cell) * (image.shape[3] // p.dims.cell))
    _check_context(p, prefix + max_tokens, f"the question, the image and max_tokens={max_tokens}", "max_tokens")
    return UnderstandJob(image, ids, max_tokens, 0.0 if temperature is None else temperature, 1.0 if top_p is None else top_p,
                         0 if seed is None else seed, prefix)


def _check_n_steps(n: int, steps: int | None, limits: Limits) -> None:
    if not 1 <= n <= limits.max_n:
        raise ServeError(f"n must be between 1 and {limits.max_n}, got {n}", param="n", code="invalid_n")
    if steps is not None and not 1 <= steps <= limits.max_steps:
        raise ServeError(f"steps must be between 1 and {limits.max_steps}, got {steps}", param="steps")


def generation_jobs(p: Pipeline, prompt: str, size: str | None, n: int, seed: int | None, steps: int | None, cfg: float | None,
                    limits: Limits) -> list[ImageJob]:
    """n jobs; image i uses seed + i, so n=1 with seed s is the CLI's ``generate --seed s``."""
    d = p.dims
    _check_n_steps(n, steps, limits)
    H, W = parse_size(size, d.default_image_size, d.cell, limits)
    ids = _prompt_ids(p, prompt, limits, "prompt")
    L = (H // d.cell) * (W // d.cell)
    prefix = _positions(template.split_prefix(template.generate(p.special, ids))[0], L)
    _check_context(p, prefix + L, f"the prompt and a {W}x{H} image", "prompt")
    seed = 0 if seed is None else seed
    return [ImageJob("generate", prompt, H, W, steps or d.steps, d.shift, seed + i, cfg=d.cfg if cfg is None else cfg,
                     prefix_positions=prefix) for i in range(n)]


def edit_jobs(p: Pipeline, image: np.ndarray, prompt: str, size: str | None, n: int, seed: int | None, steps: int | None,
              cfg_text: float | None, cfg_image: float | None, limits: Limits) -> list[ImageJob]:
    d = p.dims
    _check_n_steps(n, steps, limits)
    H, W = image.shape[2], image.shape[3]
    if size not in (None, "auto") and parse_size(size, d.default_image_size, d.cell, limits) != (H, W):
        raise ServeError(f"size {size}: an edit keeps the input image's size ({W}x{H} after rounding to multiples of {d.cell})",
                         param="size", code="invalid_size")
    ids = _prompt_ids(p, prompt, limits, "prompt")
    L = (H // d.cell) * (W // d.cell)
    prefix = _positions(template.split_prefix(template.edit(p.special, ids, True, d.reference_branch))[0], L)
    _check_context(p, prefix + L, f"the prompt, a {W}x{H} reference and its {W}x{H} target", "prompt")
    seed = 0 if seed is None else seed
    return [ImageJob("edit", prompt, H, W, steps or d.steps, d.shift, seed + i,
                     cfg_text=d.cfg_text if cfg_text is None else cfg_text, cfg_image=d.cfg_image if cfg_image is None else cfg_image,
                     image=image, prefix_positions=prefix) for i in range(n)]
