"""Execution backends behind one small interface (see base.py)."""

from __future__ import annotations

from .base import Backend, Session


def make_backend(name: str = "ort", provider: str | None = None) -> Backend:
    if name == "ort":
        from .ort import OrtBackend

        return OrtBackend(provider)
    if name == "trt":
        from .trt import TrtBackend

        return TrtBackend()
    raise ValueError(f"unknown backend {name!r}: choose 'ort' or 'trt'")


__all__ = ["Backend", "Session", "make_backend"]
