"""Export one component to ONNX: trace, check, optimize, and check TensorRT compatibility."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from ..components import Component
from ..config import EMMAConfig
from . import external_data
from .source import DTYPES
from .trt_ops import assert_supported

OPSET = 19


def _torch_inputs(comp: Component, cfg: EMMAConfig, dtype: str) -> tuple[torch.Tensor, ...]:
    rng = np.random.default_rng(0)
    sample = comp.sample_inputs(cfg, comp.export_dims(cfg), rng)
    out = []
    for spec in comp.inputs(cfg):
        t = torch.from_numpy(sample[spec.name])
        if t.is_floating_point():
            t = t.to(DTYPES[dtype])
        out.append(t)
    return tuple(out)


def export_component(comp: Component, cfg: EMMAConfig, model, out_file: Path, dtype: str = "fp32", optimize: bool = True) -> onnx.ModelProto | None:
    """Writes ``out_file`` (plus ``out_file.data`` past ``external_data.threshold()``). Returns nothing large.
    ``model``: the EMMA whose tensors ``comp`` uses are real, or a ``WeightSource``: then the weights
    are streamed from it one tensor at a time (``streamed_export``; the emma-4b backbones)."""
    from .source import WeightSource

    if isinstance(model, WeightSource):
        from .streamed_export import export_streamed

        export_streamed(comp, cfg, model, out_file, dtype)
        _finish(comp, cfg, out_file, onnx.load(str(out_file), load_external_data=False))
        return None
    module = comp.module(model).eval()
    args = _torch_inputs(comp, cfg, dtype)
    out_file = Path(out_file)
    with tempfile.TemporaryDirectory(dir=out_file.parent) as td:
        raw = Path(td) / "raw.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about python ints: parity checks catch real issues
            torch.onnx.export(
                module,
                args,
                str(raw),
                input_names=[s.name for s in comp.inputs(cfg)],
                output_names=[s.name for s in comp.outputs(cfg)],
                dynamic_axes=comp.dynamic_axes(cfg),
                opset_version=OPSET,
                do_constant_folding=True,
                custom_opsets={"com.microsoft": 1} if getattr(comp, "attention", None) == "gqa" else None,
                dynamo=False,
            )
        del module
        size = sum(f.stat().st_size for f in Path(td).iterdir())
        m = onnx.load(str(raw), load_external_data=True)
        # onnxslim serializes the whole graph: past the protobuf limit it cannot, and the graph is
        # written as traced (parity is checked by verify either way)
        if optimize and size <= external_data.DEFAULT_THRESHOLD:
            m = _optimize(m)
        external_data.save_graph(m, out_file)
        del m
    _finish(comp, cfg, out_file, onnx.load(str(out_file), load_external_data=False))
    return None


def _finish(comp: Component, cfg: EMMAConfig, out_file: Path, m: onnx.ModelProto) -> None:
    """Symbolic dim names on the IO, then the checker and TensorRT's operator rules."""
    _name_symbolic_dims(m, comp, cfg)
    out_file.write_bytes(m.SerializeToString())
    onnx.checker.check_model(str(out_file), full_check=True)
    # Reject what TensorRT's parser cannot take now, naming the node, not at engine-build time. A gqa
    # graph is ONNX Runtime's own flavour (contrib operators): never given to TensorRT.
    if getattr(comp, "attention", None) != "gqa":
        assert_supported(m, comp.name)


def _optimize(m: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    # onnxslim folds constants and fuses shape chains; parity is checked after, by verify.
    return onnxslim.slim(m)


def _name_symbolic_dims(m: onnx.ModelProto, comp: Component, cfg: EMMAConfig) -> None:
    """Give graph IO the component's symbolic dim names (exporters and optimizers rename them)."""
    specs = {s.name: s for s in comp.inputs(cfg) + comp.outputs(cfg)}
    for vi in list(m.graph.input) + list(m.graph.output):
        spec = specs.get(vi.name)
        if spec is None:
            continue
        dims = vi.type.tensor_type.shape.dim
        for d, s in zip(dims, spec.shape):
            if isinstance(s, str):
                d.ClearField("dim_value")
                d.dim_param = s
            else:
                d.dim_value = s
