"""A bundle's bytes against what ``plan`` predicts for its weights, component by component.

Per component three figures: ``bundle`` (its graph file and data files on disk), ``weights`` (the
tensors the graph stores: initializers, with their external data, and constant attributes) and
``plan`` (``weight_bytes.predict``: the bytes the precision policy stores for its parameters).
``bundle - weights`` is graph structure (node names, attributes, shapes): about 0.3 kB a node,
nothing at emma-4b's widths, most of a tiny component.

The rule (``SizeRow.off``): a component is off when its weights differ from the plan by more than
``SIZE_TOLERANCE`` (5 %) and the plan predicts at least ``FLOOR_BYTES`` (64 kB) for it. Below the
floor the prediction's blind spots are more than 5 %: the exporter folds a norm's weight into the next
MatMul (tiny's ``gen_head``: 2.1 kB stored for 2.3 kB predicted, -10 %) and shares constants of equal
value (random-init norms are all ones: a tiny vision expert stores 16.7 kB for 17.6 kB, -5 %);
scalars and shape constants are not predicted at all. Those are a few hundred bytes to a few kB
per graph. The weights, not the files, are judged because the graph structure is not a weight;
both ratios are printed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

SIZE_TOLERANCE = 0.05
FLOOR_BYTES = 64 * 1024


@dataclass(frozen=True)
class SizeRow:
    component: str
    bundle: int  # graph file + its data files on disk (a shared file counted in each graph)
    weights: int  # tensor bytes the graph stores
    plan: int  # predicted weight bytes (weight_bytes.predict)

    @property
    def ratio(self) -> float:
        """weights / plan."""
        return self.weights / self.plan if self.plan else float("inf")

    @property
    def bundle_ratio(self) -> float:
        return self.bundle / self.plan if self.plan else float("inf")

    @property
    def judged(self) -> bool:
        return self.plan >= FLOOR_BYTES

    @property
    def off(self) -> bool:
        return self.judged and abs(self.ratio - 1) > SIZE_TOLERANCE


def tensor_bytes(t: onnx.TensorProto) -> int:
    """Bytes of a tensor's data, read from its header (external data is not loaded)."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return int(next((e.value for e in t.external_data if e.key == "length"), 0))
    if t.raw_data:
        return len(t.raw_data)
    from onnx import numpy_helper

    return numpy_helper.to_array(t).nbytes


def graph_weight_bytes(path: Path) -> int:
    """The tensor bytes of the graph at ``path``: initializers and Constant nodes' values."""
    g = onnx.load(str(path), load_external_data=False).graph
    inits = sum(tensor_bytes(t) for t in g.initializer)
    consts = sum(tensor_bytes(a.t) for n in g.node for a in n.attribute if a.HasField("t"))
    return inits + consts


def compare(bundle_dir: str | Path, only: tuple[str, ...] = (), target_is_gpu: bool | None = None) -> list[SizeRow]:
    """Every component of the bundle at ``bundle_dir`` against the plan for its precision and
    target (``only``: the components a ``--component`` build quantized; ``target_is_gpu``: default,
    the manifest's target's)."""
    from emma_runtime import names
    from emma_runtime.bundle import Bundle

    from .config import EMMAConfig
    from .precision import normalize
    from .targets import load_target
    from .weight_bytes import predict

    b = Bundle.load(bundle_dir, check_files=False)
    m = b.manifest
    cfg = EMMAConfig.from_dict(m.config)
    und = m.components.get(names.BACKBONE_UND)
    attention = und.attention if und is not None and und.attention else names.ATTENTION_STANDARD
    gpu = load_target(m.target).is_gpu if target_is_gpu is None else target_is_gpu
    predicted = predict(cfg, normalize(m.precision), gpu, attention, tuple(only))
    rows = []
    for name, info in m.components.items():
        g = b.path(info.file)
        disk = g.stat().st_size + sum(b.path(f).stat().st_size for f, _ in info.data_files)
        rows.append(SizeRow(name, disk, graph_weight_bytes(g), predicted[name].total))
    return rows
