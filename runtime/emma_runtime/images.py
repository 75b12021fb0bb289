"""Image I/O: read JPEG/PNG/WebP as RGB, resize to a multiple of the token cell, write PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


class ImageError(ValueError):
    pass


def nearest_multiple(x: int, m: int) -> int:
    return max(m, int(round(x / m)) * m)


def load_image(path: str | Path, cell: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """-> (1, 3, H, W) float32 in [-1, 1]. Each side is resized (bicubic) to the nearest multiple
    of ``cell`` (32), or to ``size`` = (H, W) when given."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            return from_pil(im, cell, size)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such image file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ImageError(f"{path}: unreadable image ({e})") from None


def from_pil(im: Image.Image, cell: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """A PIL image -> (1, 3, H, W) float32 in [-1, 1], resized as ``load_image`` does."""
    im = im.convert("RGB")
    w, h = im.size
    H, W = size if size else (nearest_multiple(h, cell), nearest_multiple(w, cell))
    if (H, W) != (h, w):
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


def save_png(image: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(image)).save(path, format="PNG")
    return path


def check_size(h: int, w: int, cell: int) -> None:
    if h <= 0 or w <= 0 or h % cell or w % cell:
        raise ImageError(f"image size {h}x{w} is not a positive multiple of {cell}")
