"""A preallocated KV cache, layer-major: one ``(batch, kv_heads, capacity, head_dim)`` buffer per
layer for the keys and one for the values, each row's positions left-aligned.

Each layer's buffer is bound whole as that layer's ``past_key_i``/``past_value_i`` graph input, so no
step splits, transposes or copies the past. A ``gqa`` graph also gets the buffer as its
``present_key_i`` output and writes the chunk's keys/values at each row's length itself; a standard
graph returns them (``new_key_i``) and ``write`` puts them there (a copy of the new tokens only).

A row's length (``lengths[b]``) is how many positions it holds; they are also the RoPE position of its
next token, and a standard graph's attention mask over the past is ``position < length``.

The buffers hold what the backbone graphs take (their ``past_key_i`` dtype): float32 or float16, or
an 8-bit cache (``int8``, ``float8e4m3fn``) holding ``round(x / scale)`` with one scale per layer for
the keys and one for the values (the manifest's ``kv_cache``). The graphs quantize and dequantize;
the runtime only moves the bytes. numpy has no FP8 type, so an FP8 cache lives in uint8 arrays (the
same bytes) and the backends bind it under its ONNX type.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from . import names

FLOAT8 = "float8e4m3fn"
EIGHT_BIT = ("int8", FLOAT8)
#: the dtypes a bundle's KV cache can have (manifest names, as TensorInfo.dtype spells them)
KV_DTYPES = ("float32", "float16", "int8", FLOAT8)


def storage_dtype(dtype: str) -> np.dtype:
    """The numpy dtype a cache of the manifest dtype ``dtype`` is stored in (FP8 bytes as uint8)."""
    return np.dtype(np.uint8) if dtype == FLOAT8 else np.dtype(dtype)


def _fp8_table() -> np.ndarray:
    """float32 value of every E4M3FN byte (sign, 4 exponent bits with bias 7, 3 mantissa bits; no
    infinities, 0x7f/0xff are NaN): dequantizing needs no FP8 library on a device."""
    b = np.arange(256)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp, man = (b >> 3) & 0xF, b & 0x7
    val = np.where(exp == 0, man / 8.0 * 2.0 ** -6, (1 + man / 8.0) * 2.0 ** (exp - 7.0))
    val = (sign * val).astype(np.float32)
    val[(b & 0x7F) == 0x7F] = np.nan
    return val


_FP8 = _fp8_table()


def dequantize(a: np.ndarray, scale: float, dtype: str) -> np.ndarray:
    """float32 values of cache bytes ``a`` of the manifest dtype ``dtype`` (a float cache as it is)."""
    if dtype == FLOAT8:
        return _FP8[np.asarray(a, np.uint8)] * np.float32(scale)
    if dtype == "int8":
        return np.asarray(a, np.float32) * np.float32(scale)
    return np.asarray(a, np.float32)


@dataclass
class KVCache:
    backend: object
    keys: list  # per layer (batch, kv_heads, capacity, head_dim), views of one buffer
    values: list
    lengths: np.ndarray  # (batch,) int64: positions each row holds

    @classmethod
    def allocate(cls, backend, dims, batch: int, capacity: int, dtype=np.float32) -> "KVCache":
        shape = (dims.num_layers, batch, dims.num_kv_heads, max(int(capacity), 1), dims.head_dim)
        # zeros, not empty: a standard graph reads the whole buffer (masked positions weigh 0, and
        # 0 x garbage could be NaN)
        k, v = backend.zeros(shape, dtype), backend.zeros(shape, dtype)
        n = dims.num_layers
        return cls(backend, [backend.layer(k, i) for i in range(n)], [backend.layer(v, i) for i in range(n)],
                   np.zeros(batch, np.int64))

    @property
    def capacity(self) -> int:
        return int(self.keys[0].shape[2])

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def length(self) -> int:
        """The longest row's length."""
        return int(self.lengths.max()) if len(self.lengths) else 0

    @property
    def positions(self) -> np.ndarray:
        """(batch,) the RoPE position of each row's next token."""
        return self.lengths

    @property
    def valid(self) -> np.ndarray:
        """(batch, capacity) bool: which positions of each row hold a key."""
        return np.arange(self.capacity)[None, :] < self.lengths[:, None]

    def check_room(self, counts: np.ndarray) -> None:
        need = int((self.lengths + counts).max())
        if need > self.capacity:
            raise ValueError(f"context of {need} tokens exceeds the KV cache ({self.capacity}; the model's max_context)")

    def _named(self, pair) -> dict:
        return {n: a for i, kv in enumerate(zip(self.keys, self.values)) for n, a in zip(pair(i), kv)}

    @cached_property
    def feeds(self) -> dict:
        """Every layer's buffer under its ``past_key_i``/``past_value_i`` name (the buffers never move)."""
        return self._named(names.past_kv)

    @cached_property
    def presents(self) -> dict:
        """The same buffers under a ``gqa`` graph's output names: it writes them in place."""
        return self._named(names.present_kv)

    def write(self, new: dict, counts: np.ndarray) -> None:
        """Puts a standard graph's ``new_key_i``/``new_value_i`` (batch, kv_heads, seq, head_dim) at each
        row's length: row b's first ``counts[b]`` tokens (the rest is a right-padded chunk's padding)."""
        starts = self.lengths
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            kn, vn = names.new_kv(i)
            self.backend.write_positions(k, new[kn], starts, counts)
            self.backend.write_positions(v, new[vn], starts, counts)

    def commit(self, counts) -> None:
        """Rows advance by ``counts`` (an int for every row, or one count per row)."""
        self.lengths = self.lengths + np.broadcast_to(np.asarray(counts, np.int64), self.lengths.shape)

    def commit_rows(self, valid: np.ndarray) -> None:
        """Commits a right-padded chunk: ``valid`` (batch, n) says which of its slots are real."""
        self.commit(valid.sum(axis=1).astype(np.int64))

    def real_lengths(self) -> np.ndarray:
        return self.lengths.copy()

    def to_host(self) -> tuple[np.ndarray, np.ndarray]:
        """(layers, batch, kv_heads, capacity, head_dim) keys and values on the host."""
        b = self.backend
        return np.stack([b.to_host(k) for k in self.keys]), np.stack([b.to_host(v) for v in self.values])

    @classmethod
    def from_rows(cls, backend, host_k: list[np.ndarray], host_v: list[np.ndarray], extra: int) -> "KVCache":
        """A cache whose row i holds ``host_k[i]`` (layers, kv_heads, length_i, head_dim), with room for
        ``extra`` more positions past the longest."""
        lengths = np.array([k.shape[2] for k in host_k], np.int64)
        L, Hk, _, hd = host_k[0].shape
        cap = int(lengths.max()) + extra
        k = np.zeros((L, len(host_k), Hk, max(cap, 1), hd), host_k[0].dtype)
        v = np.zeros_like(k)
        for i, (hk, hv) in enumerate(zip(host_k, host_v)):
            k[:, i, :, : hk.shape[2]] = hk
            v[:, i, :, : hv.shape[2]] = hv
        dk, dv = backend.from_host(k), backend.from_host(v)
        return cls(backend, [backend.layer(dk, i) for i in range(L)], [backend.layer(dv, i) for i in range(L)], lengths)

    @classmethod
    def stack(cls, caches: list["KVCache"], extra: int = 0) -> "KVCache":
        """Batch several B=1 caches of different lengths into one (rows left-aligned), with room for
        ``extra`` more positions. Copies each prefix once, through the host."""
        return cls.gather([(c, 0) for c in caches], extra)

    @classmethod
    def gather(cls, rows: list[tuple["KVCache", int]], extra: int) -> "KVCache":
        """One new cache holding the given (cache, row) pairs in order, with room for ``extra`` more
        positions. The decode batch is rebuilt with it when requests join or leave; rows are always
        left-aligned, so the batch's capacity is its longest row's length plus ``extra``. Copies each
        row's keys/values once through the host (a view for numpy arrays)."""
        b = rows[0][0].backend
        hosts = {id(c): c.to_host() for c, _ in rows}
        ks, vs = [], []
        for c, r in rows:
            hk, hv = hosts[id(c)]
            n = int(c.lengths[r])
            ks.append(hk[:, r, :, :n])
            vs.append(hv[:, r, :, :n])
        return cls.from_rows(b, ks, vs, extra)
