"""ONNX Runtime backend with IOBinding: inputs and outputs are bound to existing buffers, so the
KV cache is read and written in place instead of being copied through Python every step.

On the CPU provider the buffers are numpy arrays. On the CUDA and TensorRT providers the KV cache
lives on the GPU: ``empty`` allocates an OrtValue in device memory and ``rows``/``layer`` are pointer
arithmetic on its first axis (a layer of the cache is one contiguous block), bound with
``bind_input``/``bind_output`` by address. Everything else a graph returns comes back to
the host, because the pipelines read it there (router argmax, the last position's hidden state,
guidance sums): those are a few KB per step, the cache is what grows with the context.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
from typing import Any

import numpy as np
import onnxruntime as ort

from ..bundle import Bundle, BundleError, Graph
from ..kv_cache import FLOAT8, storage_dtype
from . import ort_providers as prov

_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "bool": np.bool_, "int32": np.int32,
       "int8": np.int8, "uint8": np.uint8, FLOAT8: storage_dtype(FLOAT8).type}
# ONNX's FLOAT8E4M3FN: an FP8 cache is uint8 bytes here and is bound under this element type
_ONNX_FP8 = 17


class OrtDeviceArray:
    """A C-contiguous range of rows of an OrtValue: ``ptr``, ``shape``, ``dtype``, and where it lives
    (``device`` "cuda" or "cpu", ``device_id``).

    Holds the OrtValue it views, so the allocation lives as long as any view of it. Reading it as a
    numpy array (``np.asarray``, indexing) copies to the host.
    """

    __slots__ = ("value", "offset", "shape", "dtype", "device", "device_id")

    def __init__(self, value: ort.OrtValue, offset: int, shape: tuple[int, ...], dtype, device: str, device_id: int):
        self.value = value
        self.offset = int(offset)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.device = device
        self.device_id = device_id

    @property
    def ptr(self) -> int:
        return self.value.data_ptr() + self.offset

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def numpy(self) -> np.ndarray:
        whole = self.value.numpy()  # the OrtValue's full buffer, copied to the host
        row = math.prod(whole.shape[1:]) * self.dtype.itemsize
        start = self.offset // row if row else 0
        return np.ascontiguousarray(whole[start : start + self.shape[0]].reshape(self.shape))

    def __array__(self, dtype=None, copy=None):
        a = self.numpy()
        return a if dtype is None else a.astype(dtype, copy=False)

    def __getitem__(self, index):
        return self.numpy()[index]

    def __repr__(self) -> str:
        return f"OrtDeviceArray(shape={self.shape}, dtype={self.dtype}, {self.device}:{self.device_id})"


def _host_view(a: OrtDeviceArray) -> np.ndarray:
    """A numpy view of a CPU OrtDeviceArray's memory (no copy)."""
    import ctypes

    return np.frombuffer((ctypes.c_byte * a.nbytes).from_address(a.ptr), dtype=a.dtype).reshape(a.shape)


def _copy_rows_to_cuda(dst: OrtDeviceArray, src: np.ndarray, starts, counts) -> None:
    """Host rows into a CUDA cache layer: per row one 2-D copy (heads x new positions), with
    cuda-python (ONNX Runtime's Python API has no strided device copy)."""
    from .trt import _Cuda, _import_cudart

    cuda = _Cuda(_import_cudart())
    cuda.rows_2d(dst.ptr, dst.shape, src.ctypes.data, src.shape[2], dst.dtype.itemsize, starts, counts,
                 cuda.rt.cudaMemcpyKind.cudaMemcpyHostToDevice)


_NO_FILES: str | None = None


def _no_files_dir() -> str:
    """An empty folder given to ONNX Runtime as the place of external data: a graph loaded from bytes
    would otherwise read an unlisted external file from the working directory."""
    global _NO_FILES
    if _NO_FILES is None:
        _NO_FILES = tempfile.mkdtemp(prefix="emma-no-external-")
    return _NO_FILES


def session_options(graph: Graph, graph_optimizations: bool = True) -> "ort.SessionOptions":
    """Options that make ONNX Runtime take a graph's weights only from the verified bytes given."""
    so = ort.SessionOptions()
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", _no_files_dir())
    if graph.data:
        names = list(graph.data)
        so.add_external_initializers_from_files_in_memory(names, [graph.data[n] for n in names], [len(graph.data[n]) for n in names])
    if not graph_optimizations:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return so


def open_session(graph: Graph, where: str, providers: list[str], graph_optimizations: bool = True, so=None) -> "ort.InferenceSession":
    """An InferenceSession over verified bytes; a graph ONNX Runtime cannot load is one BundleError line."""
    so = so or session_options(graph, graph_optimizations)
    try:
        return ort.InferenceSession(graph.model, sess_options=so, providers=providers)
    except Exception as e:  # ORT raises its own Fail/InvalidProtobuf/... types
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "External data" in msg:
            msg = "the graph references external data that the manifest does not list (" + msg[:200] + ")"
        raise BundleError(f"{where}: ONNX Runtime cannot load this graph: {msg[:300]}") from None


class OrtSession:
    def __init__(self, graph: Graph, providers: list, name: str, info, graph_optimizations: bool = True, where: str = "",
                 choice: prov.ProviderChoice | None = None):
        so = session_options(graph, graph_optimizations)
        # A pipeline runs its ~13 sessions in turn, a few ms each, and every session owns an intra-op
        # pool whose threads spin after each run: on a machine with few cores those spinners take the
        # cores from the next session's run. Off by default; EMMA_ORT_SPIN=1 turns it back on and
        # EMMA_ORT_THREADS sets the pool size (emma-bench measures both ways).
        if os.environ.get("EMMA_ORT_SPIN", "0") != "1":
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if os.environ.get("EMMA_ORT_THREADS"):
            so.intra_op_num_threads = int(os.environ["EMMA_ORT_THREADS"])
        self.sess = open_session(graph, where or name, providers, so=so)
        if choice is not None:
            prov.check_loaded(self.sess, choice, name)
        self.name = name
        self.device_id = choice.device_id if choice is not None else 0
        self.input_names = [i.name for i in self.sess.get_inputs()]
        self.output_names = [o.name for o in self.sess.get_outputs()]
        self.input_dtypes = {t.name: _NP[t.dtype] for t in info.inputs}
        self.output_dtypes = {t.name: _NP[t.dtype] for t in info.outputs}
        # what each tensor is bound as: its numpy dtype, or ONNX's FP8 type for FP8 bytes held as uint8
        self._elem = {t.name: _ONNX_FP8 if t.dtype == FLOAT8 else None for t in info.inputs + info.outputs}
        # per thread: an IOBinding and what each name is bound to (outputs: " " + name)
        self._local = threading.local()

    def run(self, inputs: dict[str, Any], outputs: dict[str, Any] | None = None) -> dict[str, Any]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise ValueError(f"{self.name}: missing input(s) {missing}")
        # One binding per session, kept across runs: a tensor still at the address, shape and dtype it
        # was bound with is not bound again, so a decode step rebinds its few small inputs and not every
        # layer's cache buffer (measured ~1 ms of a 7 ms step on the small model's 32 buffers).
        local = self._local  # a binding per thread: an IOBinding is not shared between concurrent runs
        if not hasattr(local, "binding"):
            local.binding, local.bound = self.sess.io_binding(), {}
        binding, bound = local.binding, local.bound
        outputs = outputs or {}
        keep = []  # host arrays made for this run: alive until it returns
        for n in self.input_names:
            a = inputs[n]
            want = self.input_dtypes[n]
            if isinstance(a, OrtDeviceArray):
                if a.dtype != want:
                    raise ValueError(f"{self.name}: input '{n}' is a {a.dtype} device array, the graph takes {np.dtype(want)}")
                key = (a.device, a.ptr, a.shape, a.dtype)
                if bound.get(n) != key:
                    binding.bind_input(n, a.device, a.device_id, self._elem[n] or a.dtype, list(a.shape), a.ptr)
                    bound[n] = key
                continue
            a = np.asarray(a)
            if a.dtype != want:
                a = a.astype(want)
            if not a.flags.c_contiguous:
                a = np.ascontiguousarray(a)
            keep.append(a)
            key = ("cpu", a.ctypes.data, a.shape, a.dtype)
            if bound.get(n) != key:
                binding.bind_input(n, "cpu", 0, self._elem[n] or a.dtype, list(a.shape), a.ctypes.data)
                bound[n] = key
        for n in self.output_names:
            if n in outputs:
                o = outputs[n]
                want = np.dtype(self.output_dtypes[n])
                if isinstance(o, OrtDeviceArray):
                    if o.dtype != want:
                        raise ValueError(f"{self.name}: output buffer '{n}' is {o.dtype}, the graph writes {want}")
                    key = ("out", o.device, o.ptr, o.shape, o.dtype)
                    if bound.get(" " + n) != key:
                        binding.bind_output(n, o.device, o.device_id, self._elem[n] or o.dtype, list(o.shape), o.ptr)
                        bound[" " + n] = key
                    continue
                if not o.flags.c_contiguous or o.dtype != want:
                    raise ValueError(f"{self.name}: output buffer '{n}' must be a contiguous {want.name} array")
                key = ("out", "cpu", o.ctypes.data, o.shape, o.dtype)
                if bound.get(" " + n) != key:
                    binding.bind_output(n, "cpu", 0, self._elem[n] or o.dtype, list(o.shape), o.ctypes.data)
                    bound[" " + n] = key
            else:  # ONNX Runtime allocates it; bound anew every run, or the last run's array would be reused
                binding.bind_output(n, "cpu")
                bound[" " + n] = "new"
        # Runs synchronize the providers' streams before returning (ORT's default), so a device buffer
        # written here is complete when the next session reads it.
        self.sess.run_with_iobinding(binding)
        result = dict(outputs)
        for n, v in zip(self.output_names, binding.get_outputs()):
            if n not in outputs:
                result[n] = v.numpy()
        return result


class OrtBackend:
    name = "ort"

    def __init__(self, provider: str | list[str] | tuple[str, ...] | None = None, ortvalue_buffers: bool | None = None):
        """``ortvalue_buffers``: keep the KV cache in OrtValues bound by address (the default on a
        GPU provider, where they are device memory). On the CPU provider it runs the same binding
        path in host memory, which is how that path is tested without a GPU."""
        self.choice = prov.choose(provider)
        self.providers = list(self.choice.providers)
        if self.choice.gpu:
            prov.preload_gpu_libraries(self.choice)
            self.device = f"cuda:{self.choice.device_id}"
        else:
            self.device = "cpu"
        self._buffers = self.choice.gpu if ortvalue_buffers is None else ortvalue_buffers
        self._buffer_device = "cuda" if self.choice.gpu else "cpu"

    @property
    def on_gpu(self) -> bool:
        return self.choice.gpu

    def open(self, bundle: Bundle, component: str) -> OrtSession:
        info = bundle.manifest.components[component]
        if self.choice.gpu and info.attention == "gqa" and info.precision not in ("fp16", "bf16"):
            raise BundleError(f"{component}: a {info.precision} GroupQueryAttention graph runs on ONNX Runtime's CPU provider only "
                              f"(its CUDA kernel takes fp16/bf16): build the bundle with --attention standard for a GPU")
        # Q/DQ FP8 graphs (an FP8 precision or an FP8 KV cache) only run on the CPU provider with graph
        # optimizations off.
        fp8 = info.fp8
        graph, where = bundle.graph(component), str(bundle.root / info.file)
        try:
            return OrtSession(graph, prov.session_providers(self.choice, bundle, component), component, info,
                              graph_optimizations=not fp8, where=where, choice=self.choice)
        except BundleError as e:
            # A graph TensorRT takes only in part (the rest on CUDA) has inner inputs the manifest's
            # profile cannot name: the provider then sizes its profiles from the shapes it meets.
            if prov.TRT not in self.choice.providers or prov.PARTIAL_GRAPH not in str(e):
                raise
            return OrtSession(graph, prov.session_providers(self.choice, bundle, component, explicit_profiles=False), component,
                              info, graph_optimizations=not fp8, where=where, choice=self.choice)

    def empty(self, shape, dtype):
        if not self._buffers:
            return np.empty(shape, dtype=dtype)
        shape = tuple(int(s) for s in shape)
        dev, i = self._buffer_device, self.choice.device_id
        value = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.dtype(dtype).type, dev, i)
        return OrtDeviceArray(value, 0, shape, dtype, dev, i)

    def zeros(self, shape, dtype):
        if not self._buffers:
            return np.zeros(shape, dtype=dtype)
        return self.from_host(np.zeros(shape, dtype=dtype))

    def from_host(self, a: np.ndarray):
        if not self._buffers:
            return a
        a = np.ascontiguousarray(a)
        dev, i = self._buffer_device, self.choice.device_id
        # On the CPU the OrtValue views ``a`` (and holds a reference to it), as the numpy path would.
        value = ort.OrtValue.ortvalue_from_numpy(a, dev, i)
        return OrtDeviceArray(value, 0, a.shape, a.dtype, dev, i)

    def to_host(self, a) -> np.ndarray:
        return a.numpy() if isinstance(a, OrtDeviceArray) else np.asarray(a)

    def rows(self, a, start: int, stop: int):
        if not isinstance(a, OrtDeviceArray):
            return a[start:stop]
        n = a.shape[0]
        if not 0 <= start <= stop <= n:
            raise IndexError(f"rows [{start}:{stop}] outside an array of {n} rows")
        row = math.prod(a.shape[1:]) * a.dtype.itemsize
        return OrtDeviceArray(a.value, a.offset + start * row, (stop - start,) + a.shape[1:], a.dtype, a.device, a.device_id)

    def layer(self, a, i: int):
        if not isinstance(a, OrtDeviceArray):
            return a[i]
        v = self.rows(a, i, i + 1)
        return OrtDeviceArray(v.value, v.offset, a.shape[1:], a.dtype, a.device, a.device_id)

    def write_positions(self, dst, src, starts, counts) -> None:
        src = self.to_host(src)
        if not isinstance(dst, OrtDeviceArray):
            for b, (s, n) in enumerate(zip(starts, counts)):
                dst[b, :, s : s + n] = src[b, :, :n]
            return
        if dst.device == "cpu":
            view = _host_view(dst)
            for b, (s, n) in enumerate(zip(starts, counts)):
                view[b, :, s : s + n] = src[b, :, :n]
            return
        _copy_rows_to_cuda(dst, np.ascontiguousarray(src, dtype=dst.dtype), starts, counts)

    def describe(self) -> str:
        where = f" on cuda:{self.choice.device_id}" if self.on_gpu else ""
        return f"onnxruntime {ort.__version__} ({', '.join(self.providers)}){where}"
