"""TensorRT backend: the bundle's ``<component>.engine`` files on an NVIDIA GPU.

Device arrays are plain CUDA allocations (cuda-python's runtime API) described by a pointer, a
shape and a dtype. ``rows``/``layer`` are pointer arithmetic on the first axis, so each layer of the
KV cache is a view of one buffer, bound to the engine with ``set_tensor_address``: a step copies no
past, only its new keys (``write_positions``, one 2-D copy per row). Engines run with ``execute_async_v3`` on one CUDA
stream; all execution contexts share one activation scratch buffer (user-managed device memory,
grown to the largest size the shapes so far needed), which is safe because every session runs on
that one stream and returns after it synchronizes.

Host arrays (numpy) are accepted wherever a device array is: they are copied to the device for
the run. Device arrays convert to numpy (``np.asarray(a)``, indexing) with a copy to the host, so
the pipelines' host-side steps (argmax over router logits, the last hidden state, guidance sums)
work unchanged.

Engines built by TensorRT or by TensorRT-RTX are read with the module that built them (tried in
order, by the target's name); nothing here imports torch.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import numpy as np

from ..bundle import Bundle, BundleError

NEEDS = "--backend trt needs an NVIDIA GPU with TensorRT and cuda-python"
_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_,
       "int8": np.int8, "uint8": np.uint8}
_MIN_ALLOC = 256  # bytes; also keeps zero-size tensors on a valid address


class TrtBackendUnavailable(RuntimeError):
    """No GPU, no TensorRT or no cuda-python here (one line)."""


def _import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as e:
            raise TrtBackendUnavailable(f"{NEEDS}: cuda-python is not installed (pip install 'emma-runtime[trt]'): {e}") from None
    return cudart


class _Cuda:
    """Checked calls into the CUDA runtime (cuda-python returns (status, *results))."""

    def __init__(self, cudart):
        self.rt = cudart

    def check(self, result, what: str):
        if isinstance(result, tuple):
            status, rest = result[0], result[1:]
        else:
            status, rest = result, ()
        if int(status) != 0:
            try:
                _, msg = self.rt.cudaGetErrorString(status)
                msg = msg.decode() if isinstance(msg, bytes) else str(msg)
            except Exception:
                msg = str(status)
            raise RuntimeError(f"CUDA {what} failed: {msg}")
        if not rest:
            return None
        return rest[0] if len(rest) == 1 else rest

    def malloc(self, nbytes: int) -> int:
        return int(self.check(self.rt.cudaMalloc(max(int(nbytes), _MIN_ALLOC)), f"cudaMalloc({nbytes})"))

    def free(self, ptr: int) -> None:
        self.rt.cudaFree(ptr)

    def h2d(self, dst: int, src: np.ndarray, stream) -> None:
        if src.nbytes:
            self.check(self.rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes,
                                               self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream), "copy to device")

    def d2h(self, dst: np.ndarray, src: int, stream) -> None:
        if dst.nbytes:
            self.check(self.rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes,
                                               self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream), "copy to host")

    def d2d(self, dst: int, src: int, nbytes: int, stream) -> None:
        if nbytes:
            self.check(self.rt.cudaMemcpyAsync(dst, src, nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream),
                       "device copy")

    def rows_2d(self, dst: int, dst_shape, src: int, seq: int, itemsize: int, starts, counts, kind, stream=None) -> None:
        """A chunk's new keys into a cache layer, one 2-D copy per row (heads x its new positions):
        dst (batch, heads, capacity, head_dim) at ``dst``, src (batch, heads, seq, head_dim) at ``src``;
        row b's first counts[b] positions land at starts[b]. Synchronous without a stream."""
        B, H, cap, hd = dst_shape
        for b, (s, n) in enumerate(zip(starts, counts)):
            if n:
                args = (dst + (b * H * cap + int(s)) * hd * itemsize, cap * hd * itemsize,
                        src + b * H * seq * hd * itemsize, seq * hd * itemsize, int(n) * hd * itemsize, H, kind)
                self.check(self.rt.cudaMemcpy2D(*args) if stream is None else self.rt.cudaMemcpy2DAsync(*args, stream), "KV cache write")

    def sync(self, stream) -> None:
        self.check(self.rt.cudaStreamSynchronize(stream), "stream synchronize")


class _Allocation:
    """One cudaMalloc'd block, freed when the last array viewing it goes away."""

    __slots__ = ("ptr", "nbytes", "_cuda")

    def __init__(self, cuda: _Cuda, nbytes: int):
        self._cuda = cuda
        self.nbytes = int(nbytes)
        self.ptr = cuda.malloc(nbytes)

    def __del__(self):
        ptr, self.ptr = getattr(self, "ptr", 0), 0
        if ptr:
            try:
                self._cuda.free(ptr)
            except Exception:  # interpreter shutdown
                pass


class DeviceArray:
    """A C-contiguous array in GPU memory: ``ptr``, ``shape``, ``dtype`` (and the allocation it views)."""

    __slots__ = ("_alloc", "offset", "shape", "dtype", "_backend")

    def __init__(self, alloc: _Allocation, offset: int, shape: tuple[int, ...], dtype, backend: "TrtBackend"):
        self._alloc = alloc
        self.offset = int(offset)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self._backend = backend

    @property
    def ptr(self) -> int:
        return self._alloc.ptr + self.offset

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        a = self._backend.to_host(self)
        return a if dtype is None else a.astype(dtype, copy=False)

    def __getitem__(self, index):
        """Indexing reads through the host (a copy): use ``rows`` for device views."""
        return self._backend.to_host(self)[index]

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype}, ptr=0x{self.ptr:x})"


def _tensor_np_dtype(trt, dt):
    if dt == getattr(trt.DataType, "FP8", None):  # an FP8 KV cache: its bytes as uint8 (kv_cache.storage_dtype)
        return np.dtype(np.uint8)
    try:
        return np.dtype(trt.nptype(dt))
    except TypeError:
        raise BundleError(f"the trt backend cannot bind {dt} tensors from numpy (export the graph with float32/float16 IO)") from None


class TrtSession:
    def __init__(self, backend: "TrtBackend", name: str, engine, trt, flavour: str, info):
        self.backend = backend
        self.name = name
        self.engine = engine
        self.trt = trt
        self.flavour = flavour
        self.info = info
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self.context = engine.create_execution_context(strategy)
        if self.context is None:
            raise RuntimeError(f"{name}: TensorRT could not create an execution context")
        mode_in = trt.TensorIOMode.INPUT
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == mode_in]
        self.output_names = [n for n in names if engine.get_tensor_mode(n) != mode_in]
        self.dtypes = {n: _tensor_np_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
        self._staging: dict[str, _Allocation] = {}

    def _stage(self, name: str, host: np.ndarray) -> DeviceArray:
        """Copies a host input into this session's staging buffer for ``name`` (grown as needed;
        reused across runs, which is safe because a run returns after its stream synchronizes)."""
        buf = self._staging.get(name)
        if buf is None or buf.nbytes < host.nbytes:
            buf = self._staging[name] = _Allocation(self.backend.cuda, host.nbytes)
        d = DeviceArray(buf, 0, host.shape, host.dtype, self.backend)
        self.backend.cuda.h2d(d.ptr, host, self.backend.stream)
        return d

    def _profile_text(self, name: str) -> str:
        try:
            lo, opt, hi = self.engine.get_tensor_profile_shape(name, 0)
            return f"min {tuple(lo)}, max {tuple(hi)}"
        except Exception:
            return "its optimization profile"

    def run(self, inputs: dict[str, Any], outputs: dict[str, Any] | None = None) -> dict[str, Any]:
        b = self.backend
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise ValueError(f"{self.name}: missing input(s) {missing}")
        ctx = self.context
        staged = []  # host-side inputs copied for this run: kept alive until the stream syncs
        for n in self.input_names:
            a = inputs[n]
            want = self.dtypes[n]
            if isinstance(a, DeviceArray):
                if a.dtype != want:
                    raise ValueError(f"{self.name}: input '{n}' is a {a.dtype} device array, the engine takes {want}")
                d = a
            else:
                host = np.ascontiguousarray(np.asarray(a), dtype=want)
                d = self._stage(n, host)
                staged.append(host)
            if not ctx.set_input_shape(n, d.shape):
                raise ValueError(f"{self.name}: input '{n}' of shape {d.shape} is outside the engine's profile ({self._profile_text(n)})")
            ctx.set_tensor_address(n, d.ptr)
        outputs = outputs or {}
        result: dict[str, Any] = {}
        for n in self.output_names:
            shape = tuple(ctx.get_tensor_shape(n))
            if any(s < 0 for s in shape):
                raise RuntimeError(f"{self.name}: output '{n}' has an unresolved shape {shape}")
            if n in outputs:
                o = outputs[n]
                if not isinstance(o, DeviceArray):
                    raise ValueError(f"{self.name}: output buffer '{n}' must be a device array (backend.empty/rows), got {type(o).__name__}")
                if o.shape != shape or o.dtype != self.dtypes[n]:
                    raise ValueError(f"{self.name}: output buffer '{n}' is {o.dtype}{list(o.shape)}, the engine writes {self.dtypes[n]}{list(shape)}")
            else:
                o = b.empty(shape, self.dtypes[n])
            ctx.set_tensor_address(n, o.ptr)
            result[n] = o
        size = ctx.update_device_memory_size_for_shapes() if hasattr(ctx, "update_device_memory_size_for_shapes") \
            else self.engine.device_memory_size_v2
        ptr = b.scratch(size)
        if hasattr(ctx, "set_device_memory"):
            ctx.set_device_memory(ptr, int(size))
        else:  # TensorRT < 10.1
            ctx.device_memory = ptr
        ok = ctx.execute_async_v3(b.stream_handle)
        b.synchronize()
        if not ok:
            raise RuntimeError(f"{self.name}: TensorRT execution failed")
        return result


class TrtBackend:
    name = "trt"

    def __init__(self, device: int = 0):
        cudart = _import_cudart()
        self.cuda = _Cuda(cudart)
        try:
            n = self.cuda.check(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
        except RuntimeError as e:
            raise TrtBackendUnavailable(f"{NEEDS}: no usable GPU ({e})") from None
        if not n:
            raise TrtBackendUnavailable(f"{NEEDS}: no GPU is visible")
        self.cuda.check(cudart.cudaSetDevice(device), "cudaSetDevice")
        prop = self.cuda.check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
        name = prop.name
        self.gpu_name = (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).rstrip("\x00")
        self.compute_capability = f"{prop.major}.{prop.minor}"
        self.device = f"cuda:{device}"
        self.stream = self.cuda.check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.stream_handle = int(self.stream)
        self._modules: dict[str, Any] = {}  # flavour -> module
        self._runtimes: dict[str, Any] = {}
        self._scratch: _Allocation | None = None
        self._available = self._find_modules()

    # ---- TensorRT modules ------------------------------------------------------------------------
    def _find_modules(self) -> list[str]:
        found, errors = [], []
        for flavour, module in (("tensorrt", "tensorrt"), ("tensorrt-rtx", "tensorrt_rtx")):
            try:
                self._modules[flavour] = importlib.import_module(module)
                found.append(flavour)
            except (ImportError, OSError) as e:
                errors.append(f"{module}: {e}")
        if not found:
            raise TrtBackendUnavailable(f"{NEEDS}: TensorRT is not installed, pip install 'emma-runtime[trt]' "
                                        f"(or [trt-rtx] for RTX targets) ({'; '.join(errors)})")
        return found

    def _runtime(self, flavour: str):
        if flavour not in self._runtimes:
            trt = self._modules[flavour]
            self._runtimes[flavour] = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        return self._runtimes[flavour]

    def _deserialize(self, component: str, data: bytes, target: str, engine_cc: str, flavour: str = ""):
        # The manifest names the flavour that built the engine; older manifests fall back on the target name.
        want = flavour or ("tensorrt-rtx" if target.startswith("rtx") else "tensorrt")
        order = sorted(self._available, key=lambda f: 0 if f == want else 1)
        for flavour in order:
            engine = self._runtime(flavour).deserialize_cuda_engine(data)
            if engine is not None:
                return engine, self._modules[flavour], flavour
        hint = ""
        if engine_cc and engine_cc != self.compute_capability:
            hint = (f"; it was built for compute capability {engine_cc} (target {target}) and this GPU ({self.gpu_name}) "
                    f"is {self.compute_capability}: rebuild with emma-export engines --target auto")
        raise BundleError(f"{component}: no installed TensorRT ({', '.join(order)}) can read its engine{hint}")

    # ---- Backend interface ----------------------------------------------------------------------
    def open(self, bundle: Bundle, component: str) -> TrtSession:
        info = bundle.manifest.components[component]
        if info.engine is None:
            raise BundleError(f"{component}: the bundle has no TensorRT engine for it; build them with "
                              f"emma-export engines --bundle {bundle.root} --target auto")
        data = bytes(bundle.engine(component))  # hashed from these very bytes
        engine, trt, flavour = self._deserialize(component, data, info.engine.target, info.engine.compute_capability, info.engine.flavour)
        return TrtSession(self, component, engine, trt, flavour, info)

    def empty(self, shape, dtype) -> DeviceArray:
        dtype = np.dtype(dtype)
        shape = tuple(int(s) for s in shape)
        return DeviceArray(_Allocation(self.cuda, math.prod(shape) * dtype.itemsize), 0, shape, dtype, self)

    def zeros(self, shape, dtype) -> DeviceArray:
        d = self.empty(shape, dtype)
        if d.nbytes:
            self.cuda.check(self.cuda.rt.cudaMemsetAsync(d.ptr, 0, d.nbytes, self.stream), "cudaMemsetAsync")
        return d

    def from_host(self, a: np.ndarray, sync: bool = True) -> DeviceArray:
        a = np.ascontiguousarray(a)
        d = self.empty(a.shape, a.dtype)
        self.cuda.h2d(d.ptr, a, self.stream)
        if sync:
            self.synchronize()
        return d

    def to_host(self, a) -> np.ndarray:
        if not isinstance(a, DeviceArray):
            return np.asarray(a)
        out = np.empty(a.shape, a.dtype)
        self.cuda.d2h(out, a.ptr, self.stream)
        self.synchronize()
        return out

    def rows(self, a: DeviceArray, start: int, stop: int) -> DeviceArray:
        """a[start:stop] on the first axis: same allocation, pointer moved by whole rows (no copy)."""
        n = a.shape[0]
        if not 0 <= start <= stop <= n:
            raise IndexError(f"rows [{start}:{stop}] outside an array of {n} rows")
        row_bytes = math.prod(a.shape[1:]) * a.dtype.itemsize
        return DeviceArray(a._alloc, a.offset + start * row_bytes, (stop - start,) + a.shape[1:], a.dtype, self)

    def layer(self, a: DeviceArray, i: int) -> DeviceArray:
        v = self.rows(a, i, i + 1)
        return DeviceArray(v._alloc, v.offset, a.shape[1:], a.dtype, self)

    def write_positions(self, dst: DeviceArray, src, starts, counts) -> None:
        """Per row one 2-D copy on the stream (heads x new positions): the engine's new keys into the cache."""
        if not isinstance(src, DeviceArray):
            src = self.from_host(np.ascontiguousarray(src, dtype=dst.dtype))
        self.cuda.rows_2d(dst.ptr, dst.shape, src.ptr, src.shape[2], dst.dtype.itemsize, starts, counts,
                          self.cuda.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self.stream)

    def copy(self, dst: DeviceArray, src: DeviceArray) -> None:
        if dst.nbytes != src.nbytes:
            raise ValueError(f"copy of {src.nbytes} bytes into {dst.nbytes}")
        self.cuda.d2d(dst.ptr, src.ptr, src.nbytes, self.stream)

    def synchronize(self) -> None:
        self.cuda.sync(self.stream)

    def scratch(self, nbytes: int) -> int:
        """The shared activation buffer, grown (never shrunk) to ``nbytes``."""
        if self._scratch is None or self._scratch.nbytes < nbytes:
            self.synchronize()  # nothing may still run on the old buffer
            self._scratch = None
            self._scratch = _Allocation(self.cuda, max(int(nbytes), _MIN_ALLOC))
        return self._scratch.ptr

    def describe(self) -> str:
        mods = ", ".join(f"{f} {self._modules[f].__version__}" for f in self._available)
        return f"{mods} on {self.gpu_name} (compute capability {self.compute_capability})"

    def __del__(self):
        stream = getattr(self, "stream", None)
        if stream is not None:
            try:
                self._scratch = None
                self.cuda.rt.cudaStreamDestroy(stream)
            except Exception:
                pass
