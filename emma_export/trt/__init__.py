"""TensorRT engines for a bundle: one builder for TensorRT and TensorRT-RTX, and a parse check."""

from .builder import EngineBuildError, EngineResult, TrtUnavailable, build_engines, trt_module

__all__ = ["EngineBuildError", "EngineResult", "TrtUnavailable", "build_engines", "trt_module"]
