"""The interface every backend implements.

Arrays live where the backend computes ("device arrays": numpy arrays for ONNX Runtime on the CPU,
CUDA buffers for TensorRT). The pipelines only allocate them, take row ranges of their first axis
(the KV cache is time-major, so a prefix or the next chunk's slot is one contiguous range), and copy
to or from the host at the edges of a request.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class Session(Protocol):
    name: str
    input_names: list[str]
    output_names: list[str]

    def run(self, inputs: dict[str, Any], outputs: dict[str, Any] | None = None) -> dict[str, Any]:
        """Runs the graph. Outputs named in ``outputs`` are written into those preallocated arrays
        (no copy); the others are returned as new device arrays."""


class Backend(Protocol):
    name: str
    device: str

    def open(self, bundle, component: str) -> Session: ...

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any: ...

    def from_host(self, a: np.ndarray) -> Any: ...

    def to_host(self, a: Any) -> np.ndarray: ...

    def rows(self, a: Any, start: int, stop: int) -> Any:
        """a[start:stop] along the first axis, as a view."""

    def describe(self) -> str: ...
