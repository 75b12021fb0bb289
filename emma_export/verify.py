"""Parity of a bundle with the PyTorch reference: per component at several shapes, and (``--e2e``)
per pipeline through the runtime."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from emma_runtime.bundle import Bundle, BundleError

from emma_runtime.kv_cache import FLOAT8, dequantize
from emma_runtime.names import ATTENTION_GQA, ATTENTION_STANDARD, BACKBONE_UND, BACKBONES, past_kv

from .components import Backbone, GQABackbone, all_components
from .model.backbone import UND
from .config import EMMAConfig

# tolerances per precision live with the precision (precision.py)
from .numerics import abs_peak, finite_or_inf
from .precision import BY_NAME
from .precision import QUANTIZED as REAL_FEED_PRECISIONS  # calibrated: checked on held-out real feeds
from .precision import TOLERANCE, kv_cache_tolerance, tolerance_for

# Held-out real feeds checked per calibrated component, evenly spaced over the verify recipe's capture
# (every pipeline and timestep stays represented) with the largest first. Checking every feed (the
# backbones get one per decode and denoising step) made verify the slowest stage of the small int8
# build: 132.1 s; capped at 24, 36.8 s (the other stages also ran ~1.5x faster in that run: lighter
# load), the same verdict and worst errors (ae_decoder 0.0876, und_trunk 0.0877).
VERIFY_FEEDS = 24
# A graph checked layer by layer holds, per case, the reference's residual output of every layer and
# every output of both sides until its last slice has run: an emma-4b backbone's worth per case, so a
# few spread cases, not 24 (the emma-4b fp8 build's Gen backbone check, 4 cases: 18.2-19.1 GB sampled,
# the build's peak; docs/scale.md, run 6).
VERIFY_FEEDS_SLICED = 4
COMPONENT_TOLERANCE = {p.name: p.component_tolerance for p in BY_NAME.values()}
NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "bool": np.bool_, "int32": np.int32}


@dataclass
class ComponentResult:
    max_abs: float
    rel_l2: float
    tolerance: float
    passed: bool
    shapes: list[dict] = field(default_factory=list)
    precision: str = ""
    feeds: str = "random"  # "random" (verify_dims shapes) or "real" (held-out pipeline feeds)
    note: str = ""
    # a graph checked slice by slice: rel_l2 is the worst layer on the reference's input to it
    # (layer_parity); this is the output's through every layer, reported, not the verdict
    propagated_rel_l2: float | None = None
    layers: list[dict] = field(default_factory=list)


@dataclass
class VerifyReport:
    passed: bool
    components: dict[str, ComponentResult]
    pipelines: dict[str, dict] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    trt_parse: dict[str, str] = field(default_factory=dict)  # component -> "ok" | parser error line
    trt_parser: str = ""  # which TensorRT parsed, or why none did

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "components": {k: asdict(v) for k, v in self.components.items()},
            "pipelines": self.pipelines,
            "trt_parser": self.trt_parser,
            "trt_parse": self.trt_parse,
            "failures": self.failures,
        }


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    """inf, never NaN, when either side holds a NaN or inf: every caller keeps the worst figure with
    ``max``, and ``max(0.0, nan)`` is 0.0, so a NaN output would pass as exact."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return finite_or_inf(float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)))


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    """The largest absolute difference; inf when either side is not finite (as ``rel_l2``)."""
    return abs_peak(a.astype(np.float64) - b)


def reference_model(bundle: Bundle, checkpoint: str | None = None):
    from .export.source import WeightSource

    try:
        cfg = EMMAConfig.from_dict(bundle.manifest.config)
        cfg.validate()
    except (ValueError, TypeError, KeyError) as e:
        raise BundleError(f"{bundle.root / 'manifest.json'}: config is not a valid EMMA config ({str(e)[:200]})") from None
    w = bundle.manifest.weights
    if checkpoint is None and w.get("kind") == "checkpoint":
        checkpoint = w.get("path")
        if not isinstance(checkpoint, str) or not Path(checkpoint).exists():
            raise BundleError(f"{bundle.root / 'manifest.json'}: the bundle's source checkpoint {checkpoint!r} is not here; "
                              f"pass the reference weights with --checkpoint")
    if checkpoint is not None:
        return WeightSource.from_args(None, checkpoint).full_model()
    return WeightSource(cfg, int(w.get("seed", 0))).full_model()


def _session(bundle: Bundle, component: str):
    """The component's graph on the CPU provider, opened from the bytes its checksum was taken on."""
    from emma_runtime.backends.ort import open_session

    info = bundle.manifest.components[component]
    # as the runtime's ORT backend: FP8 Q/DQ graphs run with optimizations off
    return open_session(bundle.graph(component), str(bundle.root / info.file), ["CPUExecutionProvider"],
                        graph_optimizations=not info.fp8)


def _runner(bundle: Bundle, component: str, kv=None):
    """(feeds list -> outputs list per feed, how it ran, (SlicedGraph, session maker) or None). A graph past the streaming threshold (an
    emma-4b backbone) runs one decoder layer's slice at a time (``layer_slices``): the same
    operators on the same inputs as the whole file, with one layer's weights in memory; its files
    were checked against the manifest's sha256 by ``Bundle.load`` just before."""
    from .export.streamed_export import threshold
    from .export.external_data import graph_weight_bytes

    info = bundle.manifest.components[component]
    path = bundle.path(info.file)
    if graph_weight_bytes(path) <= threshold():
        sess = _session(bundle, component)
        return (lambda feeds: [_run(sess, f, info, kv) for f in feeds]), "", None
    if any(t.dtype == FLOAT8 for t in info.inputs):
        raise NotImplementedError(f"{component}: a graph past the streaming threshold with an fp8 KV cache is not verified slice by slice "
                                  f"(numpy has no fp8 type for the slices' IO); build it with --kv-cache int8")
    import onnxruntime as ort

    from .layer_slices import SlicedGraph, SliceRunner

    sg = SlicedGraph(path)

    def session(model_bytes: bytes):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if info.fp8:  # as the runtime's ORT backend: FP8 Q/DQ with optimizations off
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])

    names = [o.name for o in info.outputs]
    run = lambda feeds: [[_graph_output(r[n], n, kv) for n in names] for r in SliceRunner(sg, session).run(feeds)]
    how = f"run slice by slice ({len(sg.slices)} slices: {sg.slices[0].name} .. {sg.slices[-1].name}), one layer's weights at a time"
    return run, how, (sg, session)


def verify_components(bundle: Bundle, model, names: list[str] | None = None, progress=None,
                      real_feeds: dict[str, list[dict]] | None = None) -> dict[str, ComponentResult]:
    """``real_feeds``: component -> feeds to check instead of random ones at ``verify_dims``."""
    cfg = model.cfg
    out: dict[str, ComponentResult] = {}
    und = bundle.manifest.components.get(BACKBONE_UND)
    for comp in all_components(cfg, und.attention if und else ATTENTION_STANDARD):
        if (names and comp.name not in names) or comp.name not in bundle.manifest.components:
            continue
        info = bundle.manifest.components[comp.name]
        kv = bundle.manifest.kv_cache if comp.name in BACKBONES else None
        tol = tolerance_for(comp.name, info.precision) + (kv_cache_tolerance(kv.dtype) if kv else 0.0)
        try:
            run_all, how, sliced = _runner(bundle, comp.name, kv)
        except Exception as e:  # noqa: BLE001 - only a bf16 graph is allowed not to load on the CPU
            if info.precision != "bf16" or "NOT_IMPLEMENTED" not in str(e):
                raise
            out[comp.name] = ComponentResult(float("nan"), float("nan"), tol, True, [], info.precision, "none",
                                             "not run: ONNX Runtime's CPU provider has no bf16 kernels for this graph (TensorRT runs it)")
            continue
        gqa = isinstance(comp, GQABackbone)
        # A gqa graph is checked against the standard reference module on the same step (gqa_pairs).
        module = (Backbone(UND) if gqa else comp).module(model).eval()
        worst_abs, worst_rel, shapes = 0.0, 0.0, []
        real = (real_feeds or {}).get(comp.name)
        if real:
            real = comp.from_captured(cfg, real)
        cases = real if real else [comp.sample_inputs(cfg, dims, np.random.default_rng(100 + i)) for i, dims in enumerate(comp.verify_dims(cfg))]
        if sliced is not None and not gqa and comp.name in BACKBONES:  # decoder layers to judge one by one
            from .quantize.calibrate import select

            cases = select(cases, VERIFY_FEEDS_SLICED)
            out[comp.name] = _verify_layers(comp, cfg, module, info, kv, cases, sliced, tol, how, bool(real))
            if progress:
                progress(comp.name)
            continue
        outs = run_all([{t.name: _graph_input(f[t.name], t, kv) for t in info.inputs} for f in cases])
        for i, (feeds, got) in enumerate(zip(cases, outs)):
            dims = {t.name: list(feeds[t.name].shape) for t in info.inputs} if real else comp.verify_dims(cfg)[i]
            if gqa:
                # the past the graph was given, as the cache holds it (what "past kept" must equal)
                given = {n: _graph_output(_graph_input(feeds[n], info.tensor(n), kv), n, kv) for n in feeds if n.startswith("past_")}
                pairs = gqa_pairs(cfg, module, feeds, got, given)
            else:
                with torch.no_grad():
                    ref = module(*[torch.from_numpy(feeds[s.name]) for s in comp.inputs(cfg)])
                ref = ref if isinstance(ref, tuple) else (ref,)
                pairs = [(spec, g, r.float().numpy()) for spec, g, r in zip(comp.outputs(cfg), got, ref)]
            for spec, g, r in pairs:
                if g.shape != r.shape:
                    raise AssertionError(f"{comp.name}: output '{spec.name}' has shape {g.shape}, reference {r.shape} at {dims}")
                worst_abs = max(worst_abs, max_abs(g, r))
                worst_rel = max(worst_rel, rel_l2(g, r) if r.size else 0.0)
            shapes.append(dims)
        out[comp.name] = ComponentResult(worst_abs, worst_rel, tol, worst_rel <= tol, shapes, info.precision, "real" if real else "random", how)
        if progress:
            progress(comp.name)
    return out


def _verify_layers(comp, cfg, module, info, kv, cases: list[dict], sliced, tol: float, how: str, real: bool) -> ComponentResult:
    """A graph past the streaming threshold, layer by layer (``layer_parity``): the verdict is each
    layer's output on the reference's input to it; the output through every layer is reported."""
    from .layer_parity import TeacherForced, reference_with_layers
    from .layer_slices import SliceRunner

    sg, session = sliced
    names = [o.name for o in comp.outputs(cfg)]
    refs, layer_out = [], []
    for f in cases:
        r, lo = reference_with_layers(module, [torch.from_numpy(f[s.name]) for s in comp.inputs(cfg)])
        refs.append(dict(zip(names, r)))
        layer_out.append(lo)
    tf = TeacherForced(session, layer_out, refs, lambda n, a: _graph_output(a, n, kv))
    got = SliceRunner(sg, session, on_slice=tf).run([{t.name: _graph_input(f[t.name], t, kv) for t in info.inputs} for f in cases])
    worst_abs, prop = 0.0, 0.0
    for g, r in zip(got, refs):
        for n in names:
            a = _graph_output(g[n], n, kv)
            if a.shape != r[n].shape:
                raise AssertionError(f"{comp.name}: output '{n}' has shape {a.shape}, reference {r[n].shape}")
            if r[n].size:
                worst_abs = max(worst_abs, max_abs(a, r[n]))
                prop = max(prop, rel_l2(a, r[n]))
    w = tf.worst()
    if w is None:
        raise AssertionError(f"{comp.name}: no decoder layer slice was run ({how})")
    # a layer whose nodes the slicer did not scope as /layers.N/ would run inside another slice and never
    # be judged on its own: every layer the reference ran must have a verdict
    unjudged = sorted(set(range(len(layer_out[0]))) - set(tf.errors))
    if unjudged:
        raise AssertionError(f"{comp.name}: decoder layers {unjudged} of {len(layer_out[0])} have no slice of their own in the graph ({how})")
    # the same for keys/values made outside every layer's slice (an 8-bit cache's QuantizeLinear left
    # unscoped): the output through all layers would be their only check, and it is not judged
    unjudged_kv = [n for n in names if n.startswith(("new_", "present_")) and n not in tf.judged]
    if unjudged_kv:
        shown = ", ".join(unjudged_kv[:4]) + (f" and {len(unjudged_kv) - 4} more" if len(unjudged_kv) > 4 else "")
        raise AssertionError(f"{comp.name}: keys/values {shown} are made outside their layer's slice and cannot be judged "
                             f"per layer ({how}); rebuild the bundle's KV cache with this version")
    note = (f"{how}; verdict: each of its {len(tf.errors)} layers on the reference's input to it (worst layers.{w.layer}: "
            f"hidden {w.hidden:.3g}, keys/values {w.kv:.3g}); output through all layers: rel L2 {prop:.3g}")
    # on stderr as it is found: a sliced check is the longest part of an emma-4b verify, and a build's
    # report keeps only the verdict's figure
    import sys

    print(f"verify {comp.name}: {note}", file=sys.stderr, flush=True)
    shapes = [{t.name: list(f[t.name].shape) for t in info.inputs} for f in cases]
    layers = [{"layer": e.layer, "hidden": e.hidden, "kv": e.kv} for e in sorted(tf.errors.values(), key=lambda e: e.layer)]
    return ComponentResult(worst_abs, w.worst, tol, w.worst <= tol, shapes, info.precision, "real" if real else "random", note,
                           propagated_rel_l2=prop, layers=layers)


def _graph_input(a: np.ndarray, t, kv) -> np.ndarray:
    """A float feed as the graph takes it: an 8-bit KV input quantized with the manifest's scale (FP8
    bytes as uint8), anything else cast."""
    if kv is not None and t.name.startswith("past_") and kv.quantized:
        from .quantize.kv_cache import quantize_host

        return quantize_host(a, kv.scale(t.name), kv.dtype)
    return np.ascontiguousarray(a.astype(NP_DTYPES[t.dtype]))


def _graph_output(a: np.ndarray, name: str, kv) -> np.ndarray:
    """A graph output as float32: an 8-bit KV output dequantized with the manifest's scale."""
    if kv is not None and kv.quantized and name.startswith(("new_", "present_", "past_")):
        return dequantize(a, kv.scale(name), kv.dtype)
    return a


def _run(sess, feeds: dict, info, kv) -> list[np.ndarray]:
    """The graph's outputs (8-bit KV ones dequantized). FP8 inputs go in as OrtValues of ONNX's FP8
    type (numpy has none)."""
    import onnxruntime as ort

    if any(t.dtype == FLOAT8 for t in info.inputs):
        vals = {t.name: ort.OrtValue.ortvalue_from_numpy_with_onnx_type(feeds[t.name], 17) if t.dtype == FLOAT8
                else ort.OrtValue.ortvalue_from_numpy(feeds[t.name]) for t in info.inputs}
        got = [v.numpy() for v in sess.run_with_ort_values([o.name for o in sess.get_outputs()], vals)]
    else:
        got = sess.run(None, feeds)
    return [_graph_output(g, o.name, kv) for g, o in zip(got, sess.get_outputs())]


def gqa_pairs(cfg, std_module, feeds: dict, got: list, given: dict | None = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, graph's, reference's) for a gqa step, rows' real tokens only: the hidden states; every
    layer's written keys/values (the chunk's slots of ``present_key_i`` against the reference's new
    ones); and the past the operator must leave alone (``present_key_i`` before each row's length
    against the input, ``given``: as the graph got it, an 8-bit cache's dequantized), so a write at
    the wrong offset fails too."""
    std, lengths, real = GQABackbone.as_standard(cfg, feeds)
    with torch.no_grad():
        ref = std_module(*[torch.from_numpy(std[s.name]) for s in Backbone(UND).inputs(cfg)])
    ref = [r.float().numpy() for r in ref]
    B = len(lengths)
    rows = lambda a, pick: np.concatenate([pick(a, b).reshape(-1) for b in range(B)])
    pairs = [("hidden_states", rows(got[0], lambda a, b: a[b, : real[b]]), rows(ref[0], lambda a, b: a[b, : real[b]]))]
    for j in range(1, len(got)):
        name = f"{GQABackbone().outputs(cfg)[j].name}"
        past = (given or feeds)[names_past(j)]
        pairs.append((name, rows(got[j], lambda a, b: a[b, :, lengths[b] : lengths[b] + real[b]]),
                      rows(ref[j], lambda a, b: a[b, :, : real[b]])))
        pairs.append((name + " (past kept)", rows(got[j], lambda a, b: a[b, :, : lengths[b]]), rows(past, lambda a, b: a[b, :, : lengths[b]])))
    return pairs


def names_past(j: int) -> str:
    """The past input a gqa graph's j-th output (1-based after hidden_states) is written over."""
    return past_kv((j - 1) // 2)[(j - 1) % 2]


def verify_bundle(bundle_dir: str | Path, e2e: bool = False, checkpoint: str | None = None, progress=None) -> VerifyReport:
    bundle = Bundle.load(bundle_dir)  # checksums first: a tampered bundle fails before anything runs
    model = reference_model(bundle, checkpoint)
    real = None
    # an 8-bit KV cache is calibrated too: its backbones are checked on held-out real caches
    kv8 = bundle.manifest.kv_cache is not None and bundle.manifest.kv_cache.quantized
    calibrated = [n for n, c in bundle.manifest.components.items() if c.precision in REAL_FEED_PRECISIONS or (kv8 and n in BACKBONES)]
    if calibrated:
        from .quantize.calibrate import capture, select

        from . import worlds

        tok = bundle.tokenizer()
        world = worlds.load(bundle.manifest.weights.get("world"))
        # a layer-streamed reference (emma-4b) reads every layer's weights per backbone call: a short recipe
        recipe = "scale-verify" if any(p.is_meta for p in model.parameters()) else "verify"
        real = {k: select(v, VERIFY_FEEDS) for k, v in capture(model, tok, recipe, world=world, tasks=bundle.manifest.tasks).items()
                if k in calibrated}
    comps = verify_components(bundle, model, progress=progress, real_feeds=real)
    failures = [
        f"{name}: rel L2 {r.rel_l2:.3g} > tolerance {r.tolerance:g} (max abs {r.max_abs:.3g})"
        for name, r in comps.items() if not r.passed
    ]
    failures += kv_scale_mismatches(bundle)
    if bundle.manifest.target == "cpu" and bundle.manifest.precision == "int8":
        # the cpu target's INT8 graphs carry uint8 activations for ONNX Runtime's integer kernels
        # (quantize.modelopt_driver.activations_to_uint8), a form TensorRT does not take by design
        trt_parse, trt_parser = {}, "skipped: int8 for the cpu target is ONNX Runtime's uint8-activation form"
    else:
        trt_parse, trt_parser = _trt_parse(bundle_dir)
        # a gqa graph is ONNX Runtime's own (contrib operators): TensorRT is never given it
        trt_parse = {n: m for n, m in trt_parse.items() if bundle.manifest.components[n].attention != ATTENTION_GQA}
    failures += [f"{name}: TensorRT parser: {msg}" for name, msg in trt_parse.items() if msg != "ok"]
    pipelines: dict[str, dict] = {}
    if e2e:
        from .verify_e2e import verify_pipelines

        pipelines = verify_pipelines(bundle, model)
        failures += [f"pipeline {k}: {v['reason']}" for k, v in pipelines.items() if not v["passed"]]
    return VerifyReport(not failures, comps, pipelines, failures, trt_parse, trt_parser)


def kv_scale_mismatches(bundle: Bundle) -> list[str]:
    """An 8-bit cache's scales in each backbone graph against the manifest's (the runtime reads both:
    the graphs quantize, traces dequantize): one line per tensor that differs."""
    kv = bundle.manifest.kv_cache
    if kv is None or not kv.quantized:
        return []
    import onnx

    from .quantize.kv_cache import graph_scales

    out = []
    for name in BACKBONES:
        if name not in bundle.manifest.components:
            continue
        layers = bundle.manifest.model.num_layers
        have = graph_scales(onnx.load_from_string(bundle.graph(name).model), layers)
        for i in range(layers):
            for n in past_kv(i):
                want = kv.scale(n)
                if n not in have or not np.isclose(have[n], want, rtol=1e-6, atol=0.0):
                    out.append(f"{name}: KV scale of {n} is {have.get(n)} in the graph, {want:.6g} in the manifest")
    return out


def _trt_parse(bundle_dir) -> tuple[dict[str, str], str]:
    """Every graph through TensorRT's ONNX parser, when a TensorRT module imports here."""
    try:
        from .trt.parse_check import parse_bundle, parser_name

        return parse_bundle(bundle_dir), parser_name()
    except Exception as e:  # no TensorRT here: the check is skipped, and the report says why
        return {}, f"skipped: {str(e).splitlines()[0] if str(e) else type(e).__name__}"


__all__ = ["verify_bundle", "VerifyReport", "ComponentResult", "TOLERANCE", "COMPONENT_TOLERANCE", "tolerance_for", "BundleError"]
