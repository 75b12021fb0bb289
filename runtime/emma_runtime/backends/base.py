"""The interface every backend implements.

Arrays live where the backend computes ("device arrays": numpy arrays for ONNX Runtime on the CPU,
CUDA buffers for TensorRT). The pipelines only allocate them, take views along their first axis (a
layer of the KV cache), write a chunk's new keys at each row's length, and copy to or from the host
at the edges of a request.
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

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Any: ...

    def from_host(self, a: np.ndarray) -> Any: ...

    def to_host(self, a: Any) -> np.ndarray: ...

    def rows(self, a: Any, start: int, stop: int) -> Any:
        """a[start:stop] along the first axis, as a view."""

    def layer(self, a: Any, i: int) -> Any:
        """a[i] (the first axis dropped), as a view."""

    def write_positions(self, dst: Any, src: Any, starts: np.ndarray, counts: np.ndarray) -> None:
        """dst[b, :, starts[b]:starts[b]+counts[b]] = src[b, :, :counts[b]] for every row b; dst is a
        (batch, heads, capacity, head_dim) cache layer, src a graph's (batch, heads, seq, head_dim)."""

    def describe(self) -> str: ...
