"""The memory-bandwidth floor of one decode step: bytes it must read over this machine's read bandwidth.

A decode step of one token reads every weight of the Und path once (the layers, the final norm and the
LM head, which is the tied embedding: all ``vocab x hidden`` of it) plus the whole KV cache of the
context (keys and values, every layer). Nothing can decode faster than reading those bytes once from
memory, so time / floor says how much of a step is not spent streaming memory. Quantization scales,
activations and the embedding row of the input token are left out: the floor stays a lower bound.
"""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..config import EMMAConfig

# Bytes per weight of the matrices at each precision (norms stay fp32). int4w: half a byte, its block
# scales not counted (a lower bound); int8/fp8: one byte.
WEIGHT_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "fp8": 1.0, "int4w": 0.5}

# 256 MiB: eight times this machine's 32 MiB L3, so every pass streams from DRAM.
BANDWIDTH_BUFFER_MIB = 256


@dataclass(frozen=True)
class DecodeBytes:
    """Bytes one decode step reads: the weights once, plus ``kv_per_token`` for every cached token."""

    weights: int
    kv_per_token: int
    precision: str

    @classmethod
    def of(cls, cfg: EMMAConfig, precision: str, kv_itemsize: int = 4) -> "DecodeBytes":
        if precision not in WEIGHT_BYTES:
            raise ValueError(f"no weight size for precision {precision!r}; known: {', '.join(WEIGHT_BYTES)}")
        l = cfg.llm
        h, hd = l.hidden_size, l.head_dim
        q, kv = l.num_attention_heads * hd, l.num_key_value_heads * hd
        per_layer = h * q + 2 * h * kv + q * h + 3 * h * l.intermediate_size
        matrices = l.num_hidden_layers * per_layer + l.vocab_size * h  # the LM head reads the whole embedding
        norms = l.num_hidden_layers * (2 * h + 2 * hd) + h
        weights = int(matrices * WEIGHT_BYTES[precision]) + 4 * norms
        return cls(weights, 2 * l.num_hidden_layers * kv * kv_itemsize, precision)

    def at(self, ctx: int) -> int:
        return self.weights + ctx * self.kv_per_token

    def floor_s(self, ctx: int, bandwidth: float) -> float:
        """Seconds to read a step's bytes at ``bandwidth`` bytes/s."""
        return self.at(ctx) / bandwidth


@dataclass(frozen=True)
class Bandwidth:
    """Read bandwidth in bytes/s, single-threaded and over ``threads`` threads (median of repeats)."""

    single: float
    threads: int
    multi: float

    @property
    def best(self) -> float:
        # the floor takes the best this machine reaches: a decoder may use every core
        return max(self.single, self.multi)

    def to_dict(self) -> dict:
        return {"single_gbs": self.single / 1e9, "threads": self.threads, "multi_gbs": self.multi / 1e9, "floor_uses_gbs": self.best / 1e9}


def _read_rate(buf: np.ndarray, threads: int, repeat: int) -> float:
    parts = np.array_split(buf, threads)
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    try:
        def once():
            # max, not sum: numpy's float32 sum is pairwise and tops out at ~20 GB/s even in cache
            # here, below DRAM's rate; max runs at ~43 GB/s in cache, so it is bound by the memory.
            # numpy releases the GIL inside the reduction, so the parts are read in parallel.
            if pool is None:
                return float(buf.max())
            return max(pool.map(lambda p: float(p.max()), parts))

        once()  # warm: pages touched, threads up
        ts = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            once()
            ts.append(time.perf_counter() - t0)
    finally:
        if pool is not None:
            pool.shutdown()
    return buf.nbytes / statistics.median(ts)


def measure_bandwidth(threads: int | None = None, mib: int = BANDWIDTH_BUFFER_MIB, repeat: int = 7) -> Bandwidth:
    """Reduce a float32 buffer far larger than the last-level cache; ``threads`` defaults to every core
    (what ONNX Runtime's intra-op pool uses by default)."""
    threads = threads or os.cpu_count() or 1
    buf = np.ones(mib * (1 << 20) // 4, dtype=np.float32)
    single = _read_rate(buf, 1, repeat)
    multi = _read_rate(buf, threads, repeat) if threads > 1 else single
    return Bandwidth(single, threads, multi)


__all__ = ["WEIGHT_BYTES", "DecodeBytes", "Bandwidth", "measure_bandwidth"]
