"""A preallocated, time-major KV cache: ``(max_len, layers, batch, kv_heads, head_dim)``.

``past(P)`` (the first P positions) and ``slot(P, S)`` (where the next S positions go) are views of
one buffer, contiguous for any batch; the backbone graph reads the first as its past input and
writes its new keys/values straight into the second, so a step costs what its attention costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class KVCache:
    backend: object
    keys: object
    values: object
    valid: np.ndarray  # (batch, max_len) bool on the host: which positions are real (not padding)
    length: int = 0  # slots written so far (the same for every batch row; short rows are padded)
    positions: np.ndarray | None = None  # (batch,) RoPE position of each row's next token

    def __post_init__(self):
        if self.positions is None:
            self.positions = np.full(self.batch, self.length, dtype=np.int64)

    @classmethod
    def allocate(cls, backend, dims, batch: int, max_len: int, dtype=np.float32) -> "KVCache":
        shape = (max_len, dims.num_layers, batch, dims.num_kv_heads, dims.head_dim)
        return cls(backend, backend.empty(shape, dtype), backend.empty(shape, dtype), np.zeros((batch, max_len), dtype=bool))

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    def past(self):
        b = self.backend
        return b.rows(self.keys, 0, self.length), b.rows(self.values, 0, self.length)

    def slot(self, n: int):
        if self.length + n > self.capacity:
            raise ValueError(f"context of {self.length + n} tokens exceeds the KV cache ({self.capacity}; the model's max_context)")
        b = self.backend
        return b.rows(self.keys, self.length, self.length + n), b.rows(self.values, self.length, self.length + n)

    def commit(self, n: int, valid: np.ndarray | None = None) -> None:
        self.valid[:, self.length : self.length + n] = True if valid is None else valid
        self.length += n
        self.positions = self.positions + n

    @classmethod
    def stack(cls, caches: list["KVCache"], extra: int) -> "KVCache":
        """Batch several B=1 caches of different lengths into one, right-padded, with room for
        ``extra`` more positions (the denoising target). Copies each prefix once per request."""
        b = caches[0].backend
        host_k = [b.to_host(c.keys)[: c.length] for c in caches]
        host_v = [b.to_host(c.values)[: c.length] for c in caches]
        P = max(c.length for c in caches)
        shape = (P + extra,) + tuple(host_k[0].shape[1:2]) + (len(caches),) + tuple(host_k[0].shape[3:])
        k = np.zeros(shape, dtype=host_k[0].dtype)
        v = np.zeros(shape, dtype=host_v[0].dtype)
        valid = np.zeros((len(caches), P + extra), dtype=bool)
        for i, c in enumerate(caches):
            k[: c.length, :, i] = host_k[i][:, :, 0]
            v[: c.length, :, i] = host_v[i][:, :, 0]
            valid[i, : c.length] = c.valid[0, : c.length]
        lengths = np.array([c.length for c in caches], dtype=np.int64)
        return cls(b, b.from_host(k), b.from_host(v), valid, P, lengths)

    # ---- continuous batching (emma_runtime.serve): rows join and leave between steps -----------------
    def commit_rows(self, valid: np.ndarray) -> None:
        """Commits a right-padded chunk: ``valid`` (batch, n) says which of its slots are real, and each
        row's position advances by its own count of real tokens (``commit`` advances every row by n)."""
        n = valid.shape[1]
        self.valid[:, self.length : self.length + n] = valid
        self.length += n
        self.positions = self.positions + valid.sum(axis=1).astype(np.int64)

    def real_lengths(self) -> np.ndarray:
        return self.valid[:, : self.length].sum(axis=1)

    @classmethod
    def gather(cls, rows: list[tuple["KVCache", int]], extra: int) -> "KVCache":
        """One new cache holding the given (cache, row) pairs in order, each row's real slots moved to
        the front (right-padded to the longest), with room for ``extra`` more slots.

        The decode batch is rebuilt with it when requests join or leave: padding that earlier members
        left (a short prompt next to a long one, a row that stopped) is squeezed out, so the batch's
        length is its longest row's real length and never grows past the model's context. Copies each
        row's keys/values once through the host (a view for numpy arrays)."""
        b = rows[0][0].backend
        hosts = {id(c): (b.to_host(c.keys), b.to_host(c.values)) for c, _ in rows}
        lengths = [int(c.valid[r, : c.length].sum()) for c, r in rows]
        P = max(lengths)
        k0 = hosts[id(rows[0][0])][0]
        shape = (P + extra, k0.shape[1], len(rows)) + tuple(k0.shape[3:])
        k = np.zeros(shape, dtype=k0.dtype)
        v = np.zeros(shape, dtype=k0.dtype)
        valid = np.zeros((len(rows), P + extra), dtype=bool)
        positions = np.zeros(len(rows), dtype=np.int64)
        for i, (c, r) in enumerate(rows):
            ck, cv = hosts[id(c)]
            keep = np.flatnonzero(c.valid[r, : c.length])
            if len(keep) == c.length:  # no padding: one contiguous copy
                k[: c.length, :, i] = ck[: c.length, :, r]
                v[: c.length, :, i] = cv[: c.length, :, r]
            else:
                k[: len(keep), :, i] = ck[keep, :, r]
                v[: len(keep), :, i] = cv[keep, :, r]
            valid[i, : len(keep)] = True
            positions[i] = c.positions[r]
        return cls(b, b.from_host(k), b.from_host(v), valid, P, positions)
