"""ONNX Runtime backend with IOBinding: inputs and outputs are bound to existing buffers, so the
KV cache is read and written in place instead of being copied through Python every step."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np
import onnxruntime as ort

from ..bundle import Bundle, BundleError, Graph

_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "bool": np.bool_, "int32": np.int32}
_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider"}
_PREFERRED = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


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
    def __init__(self, graph: Graph, providers: list[str], name: str, info, graph_optimizations: bool = True, where: str = ""):
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
        self.name = name
        self.input_names = [i.name for i in self.sess.get_inputs()]
        self.output_names = [o.name for o in self.sess.get_outputs()]
        self.input_dtypes = {t.name: _NP[t.dtype] for t in info.inputs}
        self.output_dtypes = {t.name: _NP[t.dtype] for t in info.outputs}

    def run(self, inputs: dict[str, Any], outputs: dict[str, Any] | None = None) -> dict[str, Any]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise ValueError(f"{self.name}: missing input(s) {missing}")
        binding = self.sess.io_binding()
        for n in self.input_names:
            a = inputs[n]
            want = self.input_dtypes[n]
            if a.dtype != want:
                a = a.astype(want)
            if not a.flags.c_contiguous:
                a = np.ascontiguousarray(a)
            binding.bind_input(n, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
            inputs[n] = a  # keep the buffer alive until the run returns
        outputs = outputs or {}
        for n in self.output_names:
            if n in outputs:
                o = outputs[n]
                if not o.flags.c_contiguous or o.dtype != self.output_dtypes[n]:
                    raise ValueError(f"{self.name}: output buffer '{n}' must be a contiguous {self.output_dtypes[n].__name__} array")
                binding.bind_output(n, "cpu", 0, o.dtype, list(o.shape), o.ctypes.data)
            else:
                binding.bind_output(n, "cpu")
        self.sess.run_with_iobinding(binding)
        result = dict(outputs)
        for n, v in zip(self.output_names, binding.get_outputs()):
            if n not in outputs:
                result[n] = v.numpy()
        return result


class OrtBackend:
    name = "ort"

    def __init__(self, provider: str | None = None):
        avail = ort.get_available_providers()
        if provider:
            full = _ALIASES.get(provider.lower(), provider)
            if full not in avail:
                raise ValueError(f"ONNX Runtime provider {full} is not available here (available: {', '.join(avail)})")
            self.providers = [full] + (["CPUExecutionProvider"] if full != "CPUExecutionProvider" else [])
        else:
            self.providers = [p for p in _PREFERRED if p in avail]
        # Buffers are host arrays: with a GPU provider ORT copies bound inputs per run. Device-resident
        # caches on a GPU are the TensorRT backend's job (backends/trt.py).
        self.device = "cpu"

    def open(self, bundle: Bundle, component: str) -> OrtSession:
        info = bundle.manifest.components[component]
        # Q/DQ FP8 graphs only run on the CPU provider with graph optimizations off.
        fp8 = info.precision == "fp8"
        return OrtSession(bundle.graph(component), self.providers, component, info, graph_optimizations=not fp8,
                          where=str(bundle.root / info.file))

    def empty(self, shape, dtype) -> np.ndarray:
        return np.empty(shape, dtype=dtype)

    def from_host(self, a: np.ndarray) -> np.ndarray:
        return a

    def to_host(self, a: np.ndarray) -> np.ndarray:
        return a

    def rows(self, a: np.ndarray, start: int, stop: int) -> np.ndarray:
        return a[start:stop]

    def describe(self) -> str:
        return f"onnxruntime {ort.__version__} ({', '.join(self.providers)})"
