"""Parity of a bundle with the PyTorch reference: per component at several shapes, and (``--e2e``)
per pipeline through the runtime."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from emma_runtime.bundle import Bundle, BundleError

from .components import all_components
from .config import EMMAConfig

# rel L2 tolerance per precision (issue #3: fp32 at most 1e-4).
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 4e-2, "int8": 1e-1, "fp8": 1e-1, "int4w": 1.5e-1}
NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "bool": np.bool_, "int32": np.int32}


@dataclass
class ComponentResult:
    max_abs: float
    rel_l2: float
    tolerance: float
    passed: bool
    shapes: list[dict] = field(default_factory=list)


@dataclass
class VerifyReport:
    passed: bool
    components: dict[str, ComponentResult]
    pipelines: dict[str, dict] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "components": {k: asdict(v) for k, v in self.components.items()},
            "pipelines": self.pipelines,
            "failures": self.failures,
        }


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def reference_model(bundle: Bundle, checkpoint: str | None = None):
    from .export.source import WeightSource

    cfg = EMMAConfig.from_dict(bundle.manifest.config)
    w = bundle.manifest.weights
    if checkpoint is None and w.get("kind") == "checkpoint":
        checkpoint = w["path"]
    if checkpoint is not None:
        return WeightSource.from_args(None, checkpoint).full_model()
    return WeightSource(cfg, int(w.get("seed", 0))).full_model()


def verify_components(bundle: Bundle, model, names: list[str] | None = None, progress=None) -> dict[str, ComponentResult]:
    import onnxruntime as ort

    cfg = model.cfg
    tol = TOLERANCE.get(bundle.manifest.precision, 1e-1)
    out: dict[str, ComponentResult] = {}
    for comp in all_components(cfg):
        if (names and comp.name not in names) or comp.name not in bundle.manifest.components:
            continue
        info = bundle.manifest.components[comp.name]
        sess = ort.InferenceSession(str(bundle.path(info.file)), providers=["CPUExecutionProvider"])
        module = comp.module(model).eval()
        worst_abs, worst_rel, shapes = 0.0, 0.0, []
        for i, dims in enumerate(comp.verify_dims(cfg)):
            feeds = comp.sample_inputs(cfg, dims, np.random.default_rng(100 + i))
            ort_feeds = {t.name: feeds[t.name].astype(NP_DTYPES[t.dtype]) for t in info.inputs}
            got = sess.run(None, ort_feeds)
            with torch.no_grad():
                ref = module(*[torch.from_numpy(feeds[s.name]) for s in comp.inputs(cfg)])
            ref = ref if isinstance(ref, tuple) else (ref,)
            for spec, g, r in zip(comp.outputs(cfg), got, ref):
                r = r.float().numpy()
                if g.shape != r.shape:
                    raise AssertionError(f"{comp.name}: output '{spec.name}' has shape {g.shape}, reference {r.shape} at {dims}")
                worst_abs = max(worst_abs, float(np.abs(g.astype(np.float64) - r).max()) if r.size else 0.0)
                worst_rel = max(worst_rel, rel_l2(g, r) if r.size else 0.0)
            shapes.append(dims)
        out[comp.name] = ComponentResult(worst_abs, worst_rel, tol, worst_rel <= tol, shapes)
        if progress:
            progress(comp.name)
    return out


def verify_bundle(bundle_dir: str | Path, e2e: bool = False, checkpoint: str | None = None, progress=None) -> VerifyReport:
    bundle = Bundle.load(bundle_dir)  # checksums first: a tampered bundle fails before anything runs
    model = reference_model(bundle, checkpoint)
    comps = verify_components(bundle, model, progress=progress)
    failures = [
        f"{name}: rel L2 {r.rel_l2:.3g} > tolerance {r.tolerance:g} (max abs {r.max_abs:.3g})"
        for name, r in comps.items() if not r.passed
    ]
    pipelines: dict[str, dict] = {}
    if e2e:
        from .verify_e2e import verify_pipelines

        pipelines = verify_pipelines(bundle, model)
        failures += [f"pipeline {k}: {v['reason']}" for k, v in pipelines.items() if not v["passed"]]
    return VerifyReport(not failures, comps, pipelines, failures)


__all__ = ["verify_bundle", "VerifyReport", "ComponentResult", "TOLERANCE", "BundleError"]
