"""Image I/O: read JPEG/PNG/WebP as RGB, resize to a multiple of the token cell, write PNG."""

from __future__ import annotations

import io
import math
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .limits import RequestError


class ImageError(ValueError):
    pass


def nearest_multiple(x: int, m: int) -> int:
    return max(m, int(round(x / m)) * m)


def load_image(path, cell: int, size: tuple[int, int] | None = None, fit=None) -> np.ndarray:
    """-> (1, 3, H, W) float32 in [-1, 1]. ``path``: a file path, bytes or a binary file object.
    Each side is resized (bicubic) to the nearest multiple of ``cell`` (32), or to ``size`` = (H, W)
    when given, or to ``fit(h, w)`` -> (H, W) (the request limits), which sees the size the image
    declares in its header before a pixel is decoded and may refuse it."""
    name = f"{len(path)}-byte image" if isinstance(path, (bytes, bytearray)) else str(getattr(path, "name", path))
    src = io.BytesIO(path) if isinstance(path, (bytes, bytearray)) else path
    try:
        if isinstance(src, (str, Path)) and Path(src).is_dir():
            raise ImageError(f"{name}: is a folder, not an image file")
        with Image.open(src) as im:
            return from_pil(im, cell, size, fit)
    except FileNotFoundError:
        raise ImageError(f"{name}: no such image file") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: refused, {e}") from None
    except (ImageError, RequestError):
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:  # what PIL raises for broken files
        raise ImageError(f"{name}: unreadable image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def from_pil(im: Image.Image, cell: int, size: tuple[int, int] | None = None, fit=None) -> np.ndarray:
    """A PIL image -> (1, 3, H, W) float32 in [-1, 1], sized as ``load_image`` says. An image opened
    from a file is decoded only here, after ``fit`` has seen the size its header declares."""
    w, h = im.size  # the header's claim: nothing is decoded yet
    if size:
        H, W = size
    elif fit is not None:
        H, W = fit(h, w)
    else:
        H, W = nearest_multiple(h, cell), nearest_multiple(w, cell)
    im.draft("RGB", (W, H))  # JPEG decodes at a reduced scale when it can
    im = im.convert("RGB")
    if im.size != (W, H):
        im = im.resize((W, H), Image.BICUBIC)
    return to_model(np.asarray(im, dtype=np.float32))


def to_model(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8-range -> (1, 3, H, W) in [-1, 1]."""
    return (np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0).transpose(2, 0, 1)[None].copy()


def to_uint8(image: np.ndarray) -> np.ndarray:
    """(1, 3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    x = np.clip((image[0].transpose(1, 2, 0) + 1.0) * 127.5, 0, 255)
    return np.round(x).astype(np.uint8)


def to_pil(image: np.ndarray) -> Image.Image:
    """(1, 3, H, W) in [-1, 1] -> an RGB PIL image."""
    return Image.fromarray(to_uint8(image))


def psnr_from_mse(mse: float, peak: float = 255.0, cap: float | None = None) -> float:
    """PSNR in dB of a mean squared error on a scale whose maximum is ``peak``; identical images give
    ``cap`` when one is set (a figure to average), else infinity."""
    if mse <= 0:
        return float("inf") if cap is None else float(cap)
    v = 10.0 * math.log10(peak * peak / mse)
    return v if cap is None else min(v, float(cap))


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0, mask: np.ndarray | None = None, cap: float | None = None) -> float:
    """PSNR in dB of two images on a scale whose maximum is ``peak`` (255 for uint8, 1 for [0, 1]),
    optionally over a (H, W) boolean ``mask``."""
    d = a.astype(np.float64) - b.astype(np.float64)
    if mask is not None:
        d = d[mask]
    return psnr_from_mse(float(np.mean(d * d)) if d.size else 0.0, peak, cap)


def check_input(path: str | Path) -> Path:
    """An input image path that exists and is a regular file (checked before the bundle is loaded)."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such image file")
    if not path.is_file():
        raise ImageError(f"{path}: not a regular file (an image is read from a file)")
    return path


def check_output(path: str | Path, overwrite: bool = False) -> Path:
    """Refuses, before any work, an output path that cannot be written or would replace a file unasked."""
    path = Path(path)
    if path.is_dir():
        raise ImageError(f"{path}: is a folder; --out names the PNG file to write")
    if path.exists() and not overwrite:
        raise ImageError(f"{path}: exists; pass --overwrite to replace it")
    if path.exists() and not path.is_file():
        raise ImageError(f"{path}: not a regular file")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ImageError(f"{path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK):
        raise ImageError(f"{path}: folder {parent} is not writable")
    return path


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Writes through a temporary file renamed into place: a failure never leaves half a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(to_uint8(image)).save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_size(h: int, w: int, cell: int) -> None:
    if h <= 0 or w <= 0 or h % cell or w % cell:
        raise ImageError(f"image size {h}x{w} is not a positive multiple of {cell}")
