"""Execution backends behind one small interface (see base.py)."""

from __future__ import annotations

from .base import Backend, Session


def make_backend(name: str = "ort", provider: str | list[str] | tuple[str, ...] | None = None) -> Backend:
    """``provider``: ONNX Runtime provider(s) for the ort backend, by short name (cpu, cuda, cuda:1,
    tensorrt) or full name, in order of preference; None takes the best available."""
    if name == "ort":
        from .ort import OrtBackend

        return OrtBackend(provider)
    if name == "trt":
        if provider:
            raise ValueError("--provider applies to the ort backend; the trt backend runs the bundle's engines")
        from .trt import TrtBackend

        return TrtBackend()
    raise ValueError(f"unknown backend {name!r}: choose 'ort' or 'trt'")


__all__ = ["Backend", "Session", "make_backend"]
