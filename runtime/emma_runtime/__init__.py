"""emma-deploy runtime: runs an EMMA bundle on ONNX Runtime or TensorRT. Never imports torch.

    from emma_runtime import Pipeline, Bundle

The names below load on first use, so ``import emma_runtime.bundle`` (the exporter writes bundles
through it) does not pull in onnxruntime, tokenizers or Pillow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "Pipeline": ("api", "Pipeline"),
    "ImageInput": ("api", "ImageInput"),
    "Bundle": ("bundle", "Bundle"),
    "BundleError": ("bundle", "BundleError"),
    "RequestError": ("limits", "RequestError"),
    "Limits": ("limits", "Limits"),
    "UnderstandOutput": ("pipelines", "UnderstandOutput"),
    "ImageOutput": ("pipelines", "ImageOutput"),
    "ImageError": ("images", "ImageError"),
}

__all__ = ["Bundle", "BundleError", "ImageError", "ImageInput", "ImageOutput", "Limits", "Pipeline", "RequestError",
           "UnderstandOutput"]

if TYPE_CHECKING:
    from .api import ImageInput, Pipeline
    from .bundle import Bundle, BundleError
    from .images import ImageError
    from .limits import Limits, RequestError
    from .pipelines import ImageOutput, UnderstandOutput


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'emma_runtime' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
