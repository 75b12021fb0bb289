"""What one request may ask of a bundle, as data: checked before any model work.

The CLI, the Python API and the server share these numbers. Image sizes come from the bundle's
optimization profile (what its engines were built for); the rest are fixed ceilings that keep one
request's memory and time bounded whatever it asks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .bundle import Manifest


class RequestError(ValueError):
    """Bad user input (image size, prompt length, options): one clear line."""


@dataclass(frozen=True)
class Limits:
    max_prompt_bytes: int = 16 * 1024
    # decoded pixels an input image may have, read from its header before it is decoded (a 58 KB PNG
    # can declare 4096x4096; decoding it is 50 MB, encoding it at that size tens of GB)
    max_image_pixels: int = 36_000_000
    max_new_tokens: int = 4096
    max_steps: int = 1000
    max_guidance: float = 100.0
    max_temperature: float = 100.0
    max_shift: float = 100.0
    max_seed: int = 2**63 - 1
    # the largest image the model takes (pixels per side); inputs larger are scaled down to fit
    max_height: int = 1024
    max_width: int = 1024
    cell: int = 32
    max_context: int = 4096

    @classmethod
    def for_manifest(cls, m: Manifest, **overrides) -> "Limits":
        prof = m.components["ae_encoder"].profile if "ae_encoder" in m.components else {}
        d = m.model
        side = int(math.isqrt(d.max_context)) * d.cell  # without a profile: a square image filling the context
        h = prof.get("height", (0, 0, side))[2]
        w = prof.get("width", (0, 0, side))[2]
        base = dict(max_height=max(h // d.cell, 1) * d.cell, max_width=max(w // d.cell, 1) * d.cell, cell=d.cell,
                    max_context=d.max_context, max_new_tokens=min(cls.max_new_tokens, d.max_context))
        return cls(**{**base, **overrides})

    # ---- checks -----------------------------------------------------------------------------------
    def prompt(self, text: object, what: str = "prompt") -> str:
        if not isinstance(text, str):
            raise RequestError(f"{what} must be text, got {type(text).__name__}")
        try:
            n = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise RequestError(f"{what} is not valid UTF-8 text") from None
        if n > self.max_prompt_bytes:
            raise RequestError(f"{what} is {n} bytes, more than the limit of {self.max_prompt_bytes}")
        return text

    def image_size(self, height: int, width: int) -> tuple[int, int]:
        """A requested output size: positive multiples of the cell within the profile."""
        for name, v, hi in (("height", height, self.max_height), ("width", width, self.max_width)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % self.cell or v > hi:
                raise RequestError(f"{name} {v!r} must be a positive multiple of {self.cell} of at most {hi} (the bundle's profile)")
        return height, width

    def fit(self, height: int, width: int) -> tuple[int, int]:
        """The model size of an input image: each side to the nearest multiple of the cell, then scaled
        down (aspect kept) to fit the profile."""
        if height <= 0 or width <= 0:
            raise RequestError(f"image size {width}x{height} is empty")
        if height * width > self.max_image_pixels:
            raise RequestError(f"image of {width}x{height} pixels is larger than the limit of {self.max_image_pixels} pixels")
        scale = min(1.0, self.max_height / height, self.max_width / width)
        c = self.cell
        return (min(self.max_height, max(c, int(round(height * scale / c)) * c)),
                min(self.max_width, max(c, int(round(width * scale / c)) * c)))

    def steps(self, v: int) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= self.max_steps:
            raise RequestError(f"steps {v!r} must be an integer from 1 to {self.max_steps}")
        return v

    def new_tokens(self, v: int) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= self.max_new_tokens:
            raise RequestError(f"max_new_tokens {v!r} must be an integer from 1 to {self.max_new_tokens}")
        return v

    def seed(self, v: int) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= self.max_seed:
            raise RequestError(f"seed {v!r} must be an integer from 0 to {self.max_seed}")
        return v

    def number(self, name: str, v: float, lo: float, hi: float, open_lo: bool = False) -> float:
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and lo <= v <= hi and not (open_lo and v == lo)
        if not ok:
            raise RequestError(f"{name} {v!r} must be a finite number {'>' if open_lo else '>='} {lo:g} and <= {hi:g}")
        return float(v)
