"""`emma-export build`: export -> calibrate -> quantize -> engine build -> bundle -> verify, atomically.

Everything happens in a temporary sibling folder of ``--out`` that is renamed into place only when
every stage succeeded (verify included), so a failed or interrupted build leaves nothing that looks
like a bundle. The precision is checked against the target before any work: an FP8 build for a GPU
without FP8 tensor cores stops with one line naming what to use instead.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from .precision import PRECISIONS, QUANTIZED


class BuildError(RuntimeError):
    """A stage failed; the message says which and why (one line where possible)."""


@dataclass
class Row:
    component: str
    precision: str
    bytes: int
    rel_l2: float | None
    tolerance: float | None
    passed: bool | None
    engine: str
    policy: str = ""
    # the tensors the graph stores, and what `plan` predicts for them (size_check.py)
    weight_bytes: int = 0
    plan_bytes: int = 0
    size_off: bool = False
    # a graph verified slice by slice: rel_l2 is its worst layer on the reference's input to that
    # layer (layer_parity); this is its output's through every layer
    propagated_rel_l2: float | None = None


@dataclass
class BuildReport:
    out: str
    config: str
    precision: str
    target: str
    rows: list[Row]
    e2e: dict = field(default_factory=dict)
    e2e_passed: bool = True
    verify_passed: bool = True
    failures: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    quantize_details: dict = field(default_factory=dict)
    # shapes world (a model trained on it): held-out task figures of this bundle on the runtime, the
    # fp32 PyTorch reference's on the same scenes and noise, and the change (points; AE in dB)
    tasks: dict = field(default_factory=dict)
    # components quantized when the build named some (``only``); empty: all of them
    quantized_only: list[str] = field(default_factory=list)
    # bytes of the bundle's graphs and weight files on disk, a shared file (the tied embedding) once
    bundle_bytes: int = 0
    # a task-subset bundle's tasks (``--tasks``); empty: every task
    bundle_tasks: list[str] = field(default_factory=list)
    # `plan`'s weight bytes for the bundle on disk (each graph's, the tied embedding once)
    plan_bundle_weights: int = 0
    # the manifest's kv_cache (dtype, 8-bit scales) when --kv-cache chose one; empty: the export's float32
    kv_cache: dict = field(default_factory=dict)
    # the tasks checked end to end (their pipelines against the fp32 reference's): the bundle's tasks,
    # every task for a full bundle; empty when e2e did not run (--no-e2e, or e2e["skipped"] says why)
    e2e_tasks: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.verify_passed and self.e2e_passed and not self.failures

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return _json_safe(d)


def _json_safe(x):
    if hasattr(x, "item") and getattr(x, "ndim", None) == 0:  # numpy scalars (np.bool_ from a comparison)
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


# ---- target check -------------------------------------------------------------------------------

def resolve_target(name: str, precision: str):
    """The target, after checking it can run ``precision`` (TargetError with one line otherwise)."""
    from .targets import check_precision, load_target

    if precision not in PRECISIONS:
        from .targets import TargetError

        raise TargetError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    t = load_target(name)
    check_precision(t, precision)
    return t


# ---- stages ---------------------------------------------------------------------------------------

def capture_calibration(model, tokenizer, recipe: str = "full", world: str | None = None, tasks: tuple[str, ...] = ()) -> dict:
    from . import worlds
    from .quantize.calibrate import capture, check_complete

    feeds = capture(model, tokenizer, recipe, world=worlds.load(world), tasks=tasks)
    check_complete(model.cfg, feeds, tasks)
    return feeds


def _engines(bundle_dir: Path, target, echo) -> dict[str, str]:
    """Engine build (the TRT engineer's builder). Component -> what happened."""
    if not target.is_gpu:
        return {}
    try:
        from .trt.builder import EngineBuildError, TrtUnavailable, build_engines
    except ImportError as e:  # pragma: no cover - the builder ships with this package
        return {"*": f"no: engine builder unavailable ({e})"}
    lines: list[str] = []
    try:
        results = build_engines(bundle_dir, target, echo=lines.append)
    except TrtUnavailable as e:
        return {"*": f"no: {e}"}
    except EngineBuildError as e:
        raise BuildError(f"engine build: {e}") from None
    for ln in lines:
        echo(ln)
    from emma_runtime.bundle import Bundle

    state = {n: f"no: on the device ({c.engine_on_device.split(':')[0]})"
             for n, c in Bundle.load(bundle_dir, check_files=False).manifest.components.items() if c.engine_on_device}
    if not results and not state:
        return {"*": "no: " + (lines[-1] if lines else "builder built nothing")}
    state.update({r.component: f"yes ({r.engine_bytes / 1e6:.1f} MB, {r.build_seconds:.1f} s, builder peak RSS {r.peak_rss / 2**30:.2f} GiB)"
                  for r in results})
    return state


@dataclass(frozen=True)
class BuildRequest:
    """Everything one build is asked to do; the stages below read it and nothing else."""

    out: Path
    precision: str = "fp8"
    target: str = "cpu"
    config_name: str | None = None
    checkpoint: str | None = None
    seed: int = 0
    # start from this fp32 bundle instead of exporting (``emma-export quantize``)
    source_bundle: str | Path | None = None
    # a folder of per-component .npz feeds (``emma-export calibrate``) instead of capturing them now
    calibration: str | Path | None = None
    recipe: str = "full"
    calib_samples: int = 64
    verify: bool = True
    e2e: bool = True
    engines: bool = True
    force: bool = False
    progress: bool = False
    task_eval_n: int = 50
    # quantize just these components (the others at the target's high precision)
    only: tuple[str, ...] = ()
    overwrite: bool = False
    # the world the model was trained on (a name, emma_export.worlds): its calibration corpus
    # and task suite. "auto": the one the checkpoint or source bundle names; None: none
    world: str | None = "auto"
    # a task-subset bundle (names.TASKS): export, calibration and verify cover only those tasks' components
    tasks: tuple[str, ...] = ()
    # the Und backbone's flavour ("standard" or "gqa"); None: the target's (bundle_writer.default_attention)
    attention: str | None = None
    # the KV cache's dtype (quantize/kv_cache.py): auto keeps the export's float32 cache; fp16; int8 or
    # fp8 with per-layer scales from the calibration capture
    kv_cache: str = "auto"


@dataclass
class Verdict:
    """What the verify stages found: per-component parity, the end-to-end verdict, task figures."""

    components: dict = field(default_factory=dict)
    verify_passed: bool = True
    e2e: dict = field(default_factory=dict)
    e2e_passed: bool = True
    # the tasks whose pipelines ran end to end (a subset bundle's own); empty: e2e did not run
    e2e_tasks: list[str] = field(default_factory=list)
    tasks: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def build(*, echo: Callable[[str], None] = print, **kw) -> BuildReport:
    """One bundle at ``out`` (see BuildRequest for the keywords). The target and the output folder are
    checked before any work; the bundle appears only when every stage succeeded."""
    from .export.out_dir import check_out

    kw["only"] = tuple(kw.get("only", ()))
    kw["tasks"] = tuple(dict.fromkeys(kw.get("tasks", ())))
    req = BuildRequest(**kw)
    if req.tasks and req.source_bundle is not None:
        raise BuildError("--tasks chooses what to export; a source bundle already has its components")
    t = resolve_target(req.target, req.precision)  # before any work
    if req.source_bundle is not None and t.flavour != "ort":
        from emma_runtime.bundle import Bundle

        fused = [n for n, c in Bundle.load(req.source_bundle, check_files=False).manifest.components.items() if c.attention != "standard"]
        if fused:
            raise BuildError(f"{req.source_bundle}: {', '.join(fused)} is ONNX Runtime's fused graph, which TensorRT does not parse: "
                             f"start from `emma-export export --attention standard` for {t.name}")
    if req.attention == "gqa" and t.flavour != "ort":
        raise BuildError(f"--attention gqa is ONNX Runtime's fused graph, for ONNX Runtime targets (not {t.name}): "
                         f"use --attention standard")
    _check_kv_cache(req)
    if req.kv_cache in ("fp16", "fp8") and req.attention is None and req.source_bundle is None and t.flavour == "ort" and echo:
        echo(f"kv cache: {req.kv_cache}: backbone_und is the standard graph (ONNX Runtime's GroupQueryAttention has no "
             f"{req.kv_cache.upper()} cache on the CPU)")
    req = replace(req, out=check_out(req.out, "bundle", req.overwrite), world=_world_spec(req))
    if req.only:
        _check_components(req.only, req.precision, req.config_name, req.checkpoint, req.source_bundle)
    with _torch_threads_for_small_models(req.config_name, req.checkpoint, req.source_bundle):
        return _build(req, t, echo)


def _check_kv_cache(req: BuildRequest) -> None:
    """--kv-cache against the graph flavour, before any work: ONNX Runtime's GroupQueryAttention takes
    an int8 cache but no FP8 (or fp16) one on the CPU."""
    from .quantize.kv_cache import GQA_KV_CACHES, KV_CACHE_CHOICES

    kv = req.kv_cache
    if kv not in KV_CACHE_CHOICES:
        raise BuildError(f"unknown --kv-cache {kv!r}; choose one of {', '.join(KV_CACHE_CHOICES)}")
    if kv in GQA_KV_CACHES:
        return
    if req.attention == "gqa":
        raise BuildError(f"--kv-cache {kv} with --attention gqa: ONNX Runtime's GroupQueryAttention has no {kv.upper()} cache "
                         f"on the CPU; use --attention standard or --kv-cache int8")
    if req.source_bundle is not None:
        from emma_runtime.bundle import Bundle

        und = Bundle.load(req.source_bundle, check_files=False).manifest.components.get("backbone_und")
        if und is not None and und.attention == "gqa":
            raise BuildError(f"{req.source_bundle}: its backbone_und is a gqa graph, which takes no {kv} cache on the CPU: "
                             f"start from `emma-export export --attention standard`, or use --kv-cache int8")


def _world_spec(req: BuildRequest) -> str | None:
    from . import worlds

    if req.world != "auto":
        worlds.load(req.world)  # a bad name fails before any work
        return req.world
    if req.source_bundle is not None:
        from emma_runtime.bundle import Bundle

        return Bundle.load(req.source_bundle, check_files=False).manifest.weights.get("world")
    if req.checkpoint is not None:
        from .weights.checkpoint import checkpoint_root

        return worlds.of_checkpoint(checkpoint_root(req.checkpoint))
    return None


def _source_config(config_name, checkpoint, source_bundle):
    """The config of what is being built, read without loading weights; None if the source is bad (the
    export stage reports that properly)."""
    from .config import EMMAConfig, get_config

    try:
        if source_bundle is not None:
            from emma_runtime.bundle import Bundle

            return EMMAConfig.from_dict(Bundle.load(source_bundle, check_files=False).manifest.config)
        if checkpoint is not None:
            from .weights.checkpoint import read_config

            return read_config(checkpoint)
        return get_config(config_name or "tiny")
    except Exception:  # noqa: BLE001
        return None


def _check_components(only, precision, config_name, checkpoint, source_bundle) -> None:
    """``only`` names components of the model being built (before any work)."""
    from .components import all_components

    if precision == "fp32":
        raise BuildError("--component picks what to quantize; an fp32 build quantizes nothing")
    cfg = _source_config(config_name, checkpoint, source_bundle)
    if cfg is None:  # the export stage reports a bad source properly
        return
    names = [c.name for c in all_components(cfg)]
    unknown = [c for c in only if c not in names]
    if unknown:
        raise BuildError(f"--component {', '.join(unknown)}: no such component (the model has {', '.join(names)})")


@contextlib.contextmanager
def _torch_threads_for_small_models(config_name, checkpoint, source_bundle):
    """The small configs' GEMMs are far too small to share between threads: on a busy machine
    PyTorch's OpenMP threads then spin against each other (verify of a tiny bundle measured 180 s
    with 2 threads, 8 s with 1; the quick calibration capture of ``small``, hidden 512, 35.6 s of CPU
    and 72 s wall with 1 thread, more than 6 minutes wall with 2, load average 5-8). One thread
    while the build runs the reference model, up to ``small``'s widths."""
    import torch

    cfg = _source_config(config_name, checkpoint, source_bundle)
    hidden = cfg.llm.hidden_size if cfg is not None else 1 << 20
    small = hidden <= 512
    before = torch.get_num_threads()
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---- stages: each takes the request and what the stage before made --------------------------------

class _Reference:
    """The fp32 PyTorch reference, built once when a stage first needs it."""

    def __init__(self, checkpoint):
        self.checkpoint, self.model = checkpoint, None

    def get(self, bundle):
        from .verify import reference_model

        if self.model is None:
            self.model = reference_model(bundle, self.checkpoint)
        return self.model

    def drop_if_streamed(self) -> None:
        """A layer-streamed reference (emma-4b: 5 GB resident) is let go between calibration and verify:
        quantization needs the memory (the emma-4b fp8 build reached 20.8 GB quantizing the autoencoder
        with it held), and making it again costs about 20 s."""
        if self.model is not None and any(p.is_meta for p in self.model.parameters()):
            self.model = None
            gc.collect()


def stage_export(req: BuildRequest, t, work: Path):
    """The fp32 bundle to start from: exported now, or a copy of the given one (checked first)."""
    from emma_runtime.bundle import Bundle

    if req.source_bundle is not None:
        Bundle.load(req.source_bundle)  # checksums before anything is copied
        shutil.copytree(req.source_bundle, work)
    else:
        from .export.bundle_writer import default_attention, export_bundle
        from .export.source import WeightSource

        try:
            src = WeightSource.from_args(req.config_name, req.checkpoint, req.seed)
        except (ValueError, OSError) as e:
            raise BuildError(str(e)) from None
        export_bundle(src, work, target=t.name, progress=req.progress, tasks=req.tasks,
                      attention=req.attention or default_attention(src.cfg, t.name, req.precision, req.kv_cache))
    return Bundle.load(work)


def stage_calibrate(req: BuildRequest, bundle, ref: _Reference, echo) -> dict:
    """Every component's inputs from the reference pipelines on real data."""
    if req.calibration is not None:
        from .quantize.calibrate import load_dir

        feeds = load_dir(req.calibration)
        if not feeds:
            raise BuildError(f"{req.calibration}: no calibration .npz files")
        # the check a capture made here gets: a folder left by a killed capture (emma4b.sh reuses one
        # when backbone_und.npz exists) would quantize the components it lacks without feeds
        from .config import EMMAConfig
        from .quantize.calibrate import check_complete

        try:
            check_complete(EMMAConfig.from_dict(bundle.manifest.config), feeds, bundle.manifest.tasks)
        except ValueError as e:
            raise BuildError(f"{req.calibration}: {e} (an interrupted `emma-export calibrate`? capture it again)") from None
        return feeds
    model = ref.get(bundle)
    if echo:
        echo(f"calibrate: capturing component inputs from the reference pipelines ({req.recipe} recipe)")
    return capture_calibration(model, bundle.tokenizer(), req.recipe, req.world, bundle.manifest.tasks)


def stage_quantize(req: BuildRequest, t, work: Path, feeds, echo) -> dict:
    """Converts the bundle in place (manifest rewritten); component -> what the quantizer reported."""
    if req.precision == "fp32":
        _retarget(work, t.name)
        return {}
    from .quantize import quantize_bundle

    if echo:
        echo(f"quantize: {req.precision} for target {t.name}")
    try:
        outcomes = quantize_bundle(work, req.precision, t, feeds, calib_samples=req.calib_samples, only=req.only, consume=True)
    except ValueError as e:
        raise BuildError(str(e)) from None
    return {o.component: o.details for o in outcomes}


def stage_kv_cache(req: BuildRequest, work: Path, feeds, echo) -> dict:
    """The backbones' KV cache as ``req.kv_cache`` (8-bit: scales from the calibration capture)."""
    if req.kv_cache == "auto":
        return {}
    from .quantize.kv_cache import apply_to_bundle

    try:
        info = apply_to_bundle(work, req.kv_cache, feeds)
    except ValueError as e:
        raise BuildError(f"kv cache: {e}") from None
    if echo:
        scales = f", per-layer scales keys {min(info.key_scales):.3g}-{max(info.key_scales):.3g}, values " \
                 f"{min(info.value_scales):.3g}-{max(info.value_scales):.3g}" if info.quantized else ""
        echo(f"kv cache: {info.dtype}{scales}")
    return info.to_dict()


def stage_verify(req: BuildRequest, t, work: Path, ref: _Reference, echo, seconds: dict) -> Verdict:
    """Checksums and per-component parity (verify), the pipelines against the fp32 reference
    (verify_e2e: its verdict is the only one), and a trained world's task figures."""
    from emma_runtime.bundle import Bundle

    from . import worlds

    v = Verdict()
    if not req.verify:
        return v
    from .verify import verify_bundle

    t0 = time.perf_counter()
    rep = verify_bundle(work, checkpoint=req.checkpoint)
    v.components, v.verify_passed = rep.components, rep.passed
    v.failures += rep.failures
    seconds["verify"] = time.perf_counter() - t0
    bundle = Bundle.load(work)
    subset = bool(bundle.manifest.tasks) and set(bundle.manifest.tasks) != {"understand", "generate", "edit"}
    streamed = _streamed_components(bundle)
    if req.e2e and streamed:
        # the pipelines would hold every graph whole: past the streaming threshold each component is
        # checked slice by slice instead (verify._runner), against the layer-streamed reference
        v.e2e["skipped"] = {"passed": True, "reason": f"{', '.join(streamed)} past the streaming threshold: per-component parity, layer by layer"}
    elif req.e2e and not (t.is_gpu and req.precision == "bf16"):
        from .verify_e2e import e2e_tasks, verify_pipelines

        # a task-subset bundle runs its own tasks' pipelines (the others' graphs are not in it)
        v.e2e_tasks = list(e2e_tasks(bundle))
        t0 = time.perf_counter()
        for k, r in verify_pipelines(bundle, ref.get(bundle)).items():
            v.e2e[k] = dict(r)
            if not r["passed"]:
                v.e2e_passed = False
                v.failures.append(f"e2e {k}: {r['reason']}")
        seconds["e2e"] = time.perf_counter() - t0
    world = worlds.load(req.world)
    if req.task_eval_n > 0 and world is not None and not subset:  # a world's suite scores all three tasks
        t0 = time.perf_counter()
        if echo:
            echo(f"evaluate: {world.name}-world held-out suite, n={req.task_eval_n}, runtime and fp32 reference")
        v.tasks = world.task_figures(work, req.checkpoint, req.task_eval_n)
        seconds["evaluate"] = time.perf_counter() - t0
        v.failures += _collapsed(v.tasks)
    return v


def _streamed_components(bundle) -> list[str]:
    from .export.streamed_export import threshold
    from .export.external_data import graph_weight_bytes

    return [n for n, c in bundle.manifest.components.items() if graph_weight_bytes(bundle.path(c.file)) > threshold()]


def _rows(bundle, verdict: Verdict, engine_state: dict, t, only: tuple[str, ...] = ()) -> list[Row]:
    from .size_check import compare

    m = bundle.manifest
    sizes = {s.component: s for s in compare(bundle.root, only, t.is_gpu)}
    rows = []
    for name, info in m.components.items():
        r = verdict.components.get(name)
        s = sizes[name]
        eng = engine_state.get(name) or engine_state.get("*") or ("n/a (ONNX Runtime)" if not t.is_gpu else "no")
        rows.append(Row(name, info.precision, s.bundle, None if r is None else r.rel_l2, None if r is None else r.tolerance,
                        None if r is None else r.passed, eng, m.precision_policy.get(name, ""),
                        weight_bytes=s.weights, plan_bytes=s.plan, size_off=s.off,
                        propagated_rel_l2=None if r is None else r.propagated_rel_l2))
    return rows


def _plan_bundle_weights(bundle, rows: list[Row]) -> int:
    """`plan`'s bytes for the bundle on disk: every graph's, the tied embedding once where the
    bundle stores it once (both graphs read one file)."""
    from .export.tied_embedding import TIED_FILE

    m = bundle.manifest
    total = sum(r.plan_bytes for r in rows)
    e, h = m.components.get("embed_tokens"), m.components.get("lm_head")
    if e is not None and h is not None and TIED_FILE in {f for f, _ in e.data_files} & {f for f, _ in h.data_files}:
        total -= next(r.plan_bytes for r in rows if r.component == "embed_tokens")
    return total


def _build(req: BuildRequest, t, echo) -> BuildReport:
    from emma_runtime.bundle import Bundle

    from .export.bundle_writer import bundle_bytes
    from .export.out_dir import replace_dir, temp_sibling

    tmp_root = temp_sibling(req.out, "build")
    work = tmp_root / "bundle"
    seconds: dict[str, float] = {}
    ref = _Reference(req.checkpoint)

    def timed(name, fn, *a):
        t0 = time.perf_counter()
        r = fn(*a)
        seconds[name] = time.perf_counter() - t0
        return r

    try:
        bundle = timed("export", stage_export, req, t, work)
        # fp16 needs feeds too: its overflow check runs real inputs; an 8-bit KV cache its scales
        needs_feeds = req.precision in QUANTIZED or req.precision == "fp16" or req.kv_cache in ("int8", "fp8")
        feeds = timed("calibrate", stage_calibrate, req, bundle, ref, echo) if needs_feeds else None
        ref.drop_if_streamed()
        details = timed("quantize", stage_quantize, req, t, work, feeds, echo)
        kv_cache = timed("kv_cache", stage_kv_cache, req, work, feeds, echo)
        feeds = None  # nothing after this reads them: the engine builder and verify want the memory
        engine_state = timed("engines", _engines, work, t, echo) if req.engines else {}
        verdict = stage_verify(req, t, work, ref, echo, seconds)
        bundle = Bundle.load(work, check_files=False)
        rows = _rows(bundle, verdict, engine_state, t, req.only)
        report = BuildReport(str(req.out), bundle.manifest.config_name, req.precision, t.name, rows,
                             verdict.e2e, verdict.e2e_passed, verdict.verify_passed, verdict.failures, seconds, details,
                             verdict.tasks, sorted(req.only), bundle_bytes=bundle_bytes(work, bundle.manifest.components.values()),
                             bundle_tasks=list(bundle.manifest.tasks), plan_bundle_weights=_plan_bundle_weights(bundle, rows), kv_cache=kv_cache,
                             e2e_tasks=verdict.e2e_tasks)
        (work / "build-report.json").write_text(json.dumps(report.to_dict(), indent=2))
        if not report.passed and not req.force:
            f = verdict.failures
            raise BuildError("verify failed, nothing written: " + "; ".join(f[:4]) + (" ..." if len(f) > 4 else ""))
        replace_dir(work, req.out)
        return report
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


# A task figure this many points under the fp32 reference on the same scenes means the bundle is
# broken, not slightly less precise (every precision measures within 2 points, int4w within 5; a
# bundle with the wrong tokenizer measured 0.000 on all three and used to be written all the same).
TASK_COLLAPSE_POINTS = 15.0


def _collapsed(tasks: dict) -> list[str]:
    out = []
    for k, d in tasks.get("change_vs_fp32", {}).items():
        if k != "ae_psnr" and d is not None and d < -TASK_COLLAPSE_POINTS:
            out.append(f"task {k}: {tasks['runtime'][k]:.3f} against the fp32 reference's {tasks['fp32_reference'][k]:.3f} "
                       f"({d:+.1f} points, more than {TASK_COLLAPSE_POINTS:g} lost: the bundle is broken)")
    return out


def _retarget(bundle_dir: Path, target: str) -> None:
    from dataclasses import replace

    from emma_runtime.bundle import MANIFEST, Bundle

    m = Bundle.load(bundle_dir, check_files=False).manifest
    if m.target != target:
        (bundle_dir / MANIFEST).write_text(replace(m, target=target).to_json())


def print_report(rep: BuildReport) -> None:
    from rich.console import Console
    from rich.table import Table

    only = f" ({', '.join(rep.bundle_tasks)} only)" if rep.bundle_tasks else ""
    tab = Table(title=f"build {rep.config}{only} {rep.precision} -> {rep.target}: {rep.out}")
    for col in ("component", "precision", "bundle", "weights", "plan", "weights/plan", "rel L2", "tolerance", "pass", "engine built"):
        tab.add_column(col, justify="right" if col in ("bundle", "weights", "plan", "weights/plan") else "left")
    for r in rep.rows:
        err = "-" if r.rel_l2 is None or not math.isfinite(r.rel_l2) else f"{r.rel_l2:.3g}"
        tol = "-" if r.tolerance is None else f"{r.tolerance:g}"
        ok = "-" if r.passed is None else ("yes" if r.passed else "[red]NO")
        tab.add_row(r.component, r.precision, _size(r.bytes), _size(r.weight_bytes), _size(r.plan_bytes), _ratio(r), err, tol, ok, r.engine)
    total = rep.bundle_bytes or sum(r.bytes for r in rep.rows)
    plan_total = rep.plan_bundle_weights
    vs = f"{total / plan_total:.3f} (files)" if plan_total else ""
    tab.add_row("[bold]total (shared files once)", "", f"[bold]{_size(total)}", "", _size(plan_total) if plan_total else "", vs, "", "", "", "")
    con = Console()
    con = Console(width=max(con.width, 150))  # the table reads badly wrapped (CI logs are 80 wide)
    con.print(tab)
    from .size_check import FLOOR_BYTES, SIZE_TOLERANCE

    off = [r.component for r in rep.rows if r.size_off]
    con.print(f"size: bundle = the graph and its data files, weights = the tensors it stores, plan = `emma-export plan`'s weight "
              f"bytes; a component is OFF when its weights differ from plan by > {SIZE_TOLERANCE:.0%} (plan >= {FLOOR_BYTES // 1024} kB; "
              f"below, marked ~, folded and shared constants are more than that)" + (f"; [red]OFF: {', '.join(off)}" if off else ""))
    for r in rep.rows:
        if r.propagated_rel_l2 is not None:
            con.print(f"{r.component}: verified layer by layer; rel L2 is its worst layer on the reference's input to that layer, "
                      f"its output through every layer {r.propagated_rel_l2:.3g}")
    con.print(f"KV cache: {rep.kv_cache.get('dtype', 'float32 (as exported)')}"
              + (" with per-layer scales from calibration" if rep.kv_cache.get("key_scales") else ""))
    if rep.e2e_tasks:
        rest = [k for k in ("understand", "generate", "edit") if k not in rep.e2e_tasks]
        con.print(f"e2e: checked end to end: {', '.join(rep.e2e_tasks)}"
                  + (f" (task-subset bundle; {', '.join(rest)} not in it)" if rest else ""))
    for k, v in rep.e2e.items():
        if k == "skipped":
            con.print(f"e2e: skipped: {v.get('reason')}")
            continue
        fig = f"token agreement {v.get('token_agreement')}" if k == "understand" else f"PSNR {v.get('psnr_db')} dB"
        floor = "" if k == "understand" else f" (min {v.get('min_psnr_db')})"
        con.print(f"e2e {k} vs fp32 pipeline: {fig}{floor}{'' if v.get('passed') else '  [red]FAILED: ' + str(v.get('reason'))}")
    if rep.tasks:
        tt = Table(title=f"shapes world, held-out n={rep.tasks['n']}: {rep.precision} runtime against the fp32 reference")
        for col in ("task", rep.precision, "fp32 reference", "change"):
            tt.add_column(col, justify="left" if col == "task" else "right")
        for k, v in rep.tasks["runtime"].items():
            ref, d = rep.tasks["fp32_reference"][k], rep.tasks["change_vs_fp32"][k]
            if k == "ae_psnr":
                tt.add_row("autoencoder PSNR", f"{v:.2f} dB", f"{ref:.2f} dB", f"{d:+.2f} dB")
            else:
                tt.add_row(k, f"{v:.3f}", f"{ref:.3f}", f"{d:+.1f} pts")
        con.print(tt)
    con.print("  ".join(f"{k} {v:.1f}s" for k, v in rep.seconds.items()))


def _ratio(r: Row) -> str:
    from .size_check import FLOOR_BYTES

    if not r.plan_bytes:
        return "-"
    text = f"{r.weight_bytes / r.plan_bytes:.3f}"
    if r.size_off:
        return f"[red]{text} OFF"
    return text if r.plan_bytes >= FLOOR_BYTES else f"~{text}"


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
