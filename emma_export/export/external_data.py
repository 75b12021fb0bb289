"""Graph files with their weights beside them: ONNX protobufs cannot exceed 2 GiB, so past a
threshold a graph's initializers go to one external data file next to it, ``<graph file>.data``,
referenced by its bare name (a path relative to the graph's folder: the runtime hands ONNX Runtime
exactly those names, from verified bytes, and nothing outside the bundle folder).

Every writer of a bundle graph (export, fp16/bf16 conversion, Model Optimizer's output, the weight
folding passes) saves through ``save_graph`` so the rule is applied in one place. A tensor that is
already external (the tied embedding, ``tied_embedding.py``) is left as it is: its file is written
by whoever made it external.

``EMMA_EXTERNAL_DATA_BYTES`` overrides the threshold (tests set it tiny so that small graphs take
the external-data path end to end).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import onnx
from onnx import TensorProto

ENV = "EMMA_EXTERNAL_DATA_BYTES"
# The protobuf limit is 2 GiB (2147483648 bytes) for the whole graph; 1.8e9 bytes of weights leaves
# room for the graph structure and the protobuf framing of each tensor.
DEFAULT_THRESHOLD = 1_800_000_000
PROTOBUF_LIMIT = 2**31 - 1
# Tensors smaller than this stay inline (scalars, shapes, scales): as onnx.save_model's own default.
MIN_EXTERNAL_TENSOR = 1024
SUFFIX = ".data"


def threshold() -> int:
    """Bytes of inline weights past which a graph is written with external data."""
    return bytes_from_env(ENV, DEFAULT_THRESHOLD)


def bytes_from_env(name: str, default: int) -> int:
    """A byte count from the environment variable ``name`` (unset or empty: ``default``)."""
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a number of bytes") from None
    if v < 0:
        raise ValueError(f"{name}={raw!r}: expected a number of bytes >= 0")
    return v


def data_file_name(graph: Path | str) -> str:
    return Path(graph).name + SUFFIX


def inline_bytes(m: onnx.ModelProto) -> int:
    """Bytes of the initializers held inside the protobuf (raw_data and typed fields alike)."""
    return sum(t.ByteSize() for t in m.graph.initializer if t.data_location != TensorProto.EXTERNAL)


def is_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


def location(t: TensorProto) -> str | None:
    return next((e.value for e in t.external_data if e.key == "location"), None) if is_external(t) else None


def referenced_files(m: onnx.ModelProto) -> list[str]:
    """Every external file the graph's tensors (initializers and Constant attributes) name."""
    tensors = list(m.graph.initializer)
    for node in m.graph.node:
        tensors += [a.t for a in node.attribute if a.HasField("t")]
    return sorted({loc for t in tensors if (loc := location(t))})


def set_external(t: TensorProto, file: str, offset: int, length: int) -> None:
    """Mark ``t`` as stored in ``file`` at ``offset`` (its inline data is dropped)."""
    t.ClearField("raw_data")
    for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        t.ClearField(f)
    del t.external_data[:]
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", file), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v


def save_graph(m: onnx.ModelProto, path: str | Path, limit: int | None = None) -> list[str]:
    """Writes ``m`` to ``path``; past ``limit`` bytes of inline weights (default ``threshold()``) every
    initializer of at least MIN_EXTERNAL_TENSOR bytes goes to ``<path>.data``. Tensors already
    external keep their reference. Returns the external files the written graph references.
    ``m`` is modified (its large tensors become references) when the data goes external."""
    path = Path(path)
    limit = threshold() if limit is None else limit
    data = path.parent / data_file_name(path)
    if data.name in referenced_files(m):
        raise ValueError(f"{path.name}: the graph still reads {data.name}: load it with load_graph before saving over it")
    if data.exists():
        data.unlink()  # a stale file from an earlier write must not be taken for this graph's data
    if inline_bytes(m) > limit:
        offset = 0
        with open(data, "wb") as f:
            for t in m.graph.initializer:
                if is_external(t):
                    continue
                if not t.HasField("raw_data"):
                    if t.ByteSize() < MIN_EXTERNAL_TENSOR:
                        continue
                    t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t), t.name))
                raw = t.raw_data
                if len(raw) < MIN_EXTERNAL_TENSOR:
                    continue
                pad = -offset % 64  # aligned, so a reader may map tensors in place
                f.write(b"\0" * pad)
                offset += pad
                f.write(raw)
                set_external(t, data.name, offset, len(raw))
                offset += len(raw)
        if offset == 0:
            data.unlink()  # nothing was large enough to move out
    if m.ByteSize() > PROTOBUF_LIMIT:
        raise ValueError(f"{path.name}: {m.ByteSize()} bytes of graph after moving weights out: over the 2 GiB protobuf limit")
    path.write_bytes(m.SerializeToString())
    return referenced_files(m)


def graph_weight_bytes(path: str | Path) -> int:
    """Bytes of a graph's initializers, from their dims (no data read)."""
    m = onnx.load(str(path), load_external_data=False)
    total = 0
    for t in m.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        total += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize if t.data_type not in (
            TensorProto.INT4, TensorProto.UINT4) else (n + 1) // 2
    return total


def load_graph(path: str | Path) -> onnx.ModelProto:
    """The graph with every external tensor read into memory (from files beside it)."""
    return onnx.load(str(path), load_external_data=True)


def copy_graph(src: str | Path, dst: str | Path, move: bool = False) -> list[str]:
    """Copies a graph and every external file it references (same relative names) to ``dst``'s
    folder; returns those names. The bytes are unchanged. ``move``: renamed instead (the source is
    gone after), for a graph read once in a folder that is the caller's own: no second copy of a
    14.5 GB backbone on disk (a hard link would do as much, but ONNX's checker refuses external data
    with several links)."""
    from emma_runtime.paths import confined

    src, dst = Path(src), Path(dst)
    files = referenced_files(onnx.load(str(src), load_external_data=False))
    # a location is read from the graph file (a source bundle's manifest only hashes it): a plain
    # name inside the graph's folder, or '../x' would be read from beside it and written beside dst
    found = [confined(src.parent, f, f"external data of {src.name}") for f in files]
    put = shutil.move if move else shutil.copyfile
    dst.parent.mkdir(parents=True, exist_ok=True)
    for f, real in zip(files, found):
        (dst.parent / f).parent.mkdir(parents=True, exist_ok=True)
        put(real, dst.parent / f)
    put(src, dst)
    return files


def refs_only(path: str | Path) -> onnx.ModelProto:
    """The graph without its external data read (enough to see which files it references)."""
    return onnx.load(str(path), load_external_data=False)


def has_external(path: str | Path) -> bool:
    return bool(referenced_files(refs_only(path)))


class DataWriter:
    """Appends tensors to one external data file as they come (64-byte aligned, as ``save_graph``
    lays them out) and returns each one's TensorProto referencing it by the file's bare name. Small
    tensors (under MIN_EXTERNAL_TENSOR bytes) stay inline."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.bytes_written = 0
        self._f = None

    def __enter__(self) -> "DataWriter":
        self._f = open(self.path, "wb")
        return self

    def __exit__(self, *exc) -> bool:
        self._f.close()
        return False

    def add(self, name: str, value) -> TensorProto:
        """``value``: a numpy array, or a TensorProto (its bytes as stored: packed INT4 and FP8
        stay packed) renamed to ``name``. The returned proto never held the bytes: protobuf keeps a
        cleared field's memory while the message lives, so a proto made with its data and then
        pointed at the file would keep every weight in memory."""
        import numpy as np

        if isinstance(value, TensorProto):
            if not value.HasField("raw_data"):
                if value.ByteSize() < MIN_EXTERNAL_TENSOR:
                    t = TensorProto()
                    t.CopyFrom(value)
                    t.name = name
                    return t
                value = onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(value), name)
            raw, dtype, dims = value.raw_data, value.data_type, tuple(value.dims)
        else:
            a = np.ascontiguousarray(value)
            if a.nbytes < MIN_EXTERNAL_TENSOR:
                return onnx.numpy_helper.from_array(a, name)
            raw, dtype, dims = memoryview(a).cast("B"), onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape
        if len(raw) < MIN_EXTERNAL_TENSOR:
            return onnx.helper.make_tensor(name, dtype, dims, bytes(raw), raw=True)
        t = TensorProto()
        t.name, t.data_type = name, dtype
        t.dims.extend(dims)
        pad = -self.bytes_written % 64
        self._f.write(b"\0" * pad)
        self.bytes_written += pad
        self._f.write(raw)
        set_external(t, self.path.name, self.bytes_written, len(raw))
        self.bytes_written += len(raw)
        return t
