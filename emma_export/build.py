"""`emma-export build`: export -> calibrate -> quantize -> engine build -> bundle -> verify, atomically.

Everything happens in a temporary sibling folder of ``--out`` that is renamed into place only when
every stage succeeded (verify included), so a failed or interrupted build leaves nothing that looks
like a bundle. The precision is checked against the target before any work: an FP8 build for a GPU
without FP8 tensor cores stops with one line naming what to use instead.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .quantize.policy import PRECISIONS, QUANTIZED
from .verify_e2e import E2E_MIN

# End-to-end acceptance against the fp32 PyTorch pipeline (tiny, random weights; measured, see the
# build report): greedy token agreement over 8 tokens and PSNR of generated / edited images.
# fp32 must match exactly (verify_e2e's own rule); the others are floors with margin below what the
# tiny model measured (its random weights make logits nearly flat, so one early flipped token
# changes all later ones: token agreement is a coarse figure there).


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

def capture_calibration(model, tokenizer, recipe: str = "full") -> dict:
    from .quantize.calibrate import capture, check_complete

    feeds = capture(model, tokenizer, recipe)
    check_complete(model.cfg, feeds)
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
    if not results:
        return {"*": "no: " + (lines[-1] if lines else "builder built nothing")}
    return {r.component: f"yes ({r.engine_bytes / 1e6:.1f} MB, {r.build_seconds:.1f} s)" for r in results}


def build(
    *,
    config_name: str | None = None,
    checkpoint: str | None = None,
    precision: str = "fp8",
    target: str = "cpu",
    out: str | Path,
    seed: int = 0,
    source_bundle: str | Path | None = None,
    calibration: str | Path | None = None,
    recipe: str = "full",
    calib_samples: int = 64,
    verify: bool = True,
    e2e: bool = True,
    engines: bool = True,
    force: bool = False,
    echo: Callable[[str], None] = print,
    progress: bool = False,
    task_eval_n: int = 50,
    only: tuple[str, ...] = (),
) -> BuildReport:
    """One bundle of ``precision`` for ``target`` at ``out``. ``source_bundle``: start from this fp32
    bundle instead of exporting (``emma-export quantize``). ``calibration``: a folder of per-component
    .npz feeds (``emma-export calibrate``) instead of capturing them now. ``only``: quantize just these
    components (the others at the target's high precision)."""
    t = resolve_target(target, precision)  # before any work
    if only:
        _check_components(only, precision, config_name, checkpoint, source_bundle)
    with _torch_threads_for_small_models(config_name, checkpoint, source_bundle):
        return _build(t, precision=precision, out=out, config_name=config_name, checkpoint=checkpoint, seed=seed,
                      source_bundle=source_bundle, calibration=calibration, recipe=recipe, calib_samples=calib_samples,
                      verify=verify, e2e=e2e, engines=engines, force=force, echo=echo, progress=progress,
                      task_eval_n=task_eval_n, only=tuple(only))


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
    with 2 threads, 8 s with 1). One thread while the build runs the reference model."""
    import torch

    cfg = _source_config(config_name, checkpoint, source_bundle)
    hidden = cfg.llm.hidden_size if cfg is not None else 1 << 20
    small = hidden <= 256
    before = torch.get_num_threads()
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _build(t, *, precision, out, config_name, checkpoint, seed, source_bundle, calibration, recipe, calib_samples,
           verify, e2e, engines, force, echo, progress, task_eval_n=0, only=()) -> BuildReport:
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    work = tmp_root / "bundle"
    seconds: dict[str, float] = {}
    try:
        # 1. export (or copy the given fp32 bundle)
        t0 = time.perf_counter()
        if source_bundle is not None:
            from emma_runtime.bundle import Bundle

            Bundle.load(source_bundle)  # checksums before anything is copied
            shutil.copytree(source_bundle, work)
        else:
            from .export.bundle_writer import export_bundle
            from .export.source import WeightSource

            try:
                src = WeightSource.from_args(config_name, checkpoint, seed)
            except (ValueError, OSError) as e:
                raise BuildError(str(e)) from None
            tok_file = None
            if checkpoint and Path(checkpoint).is_dir() and (Path(checkpoint) / "tokenizer.json").exists():
                tok_file = Path(checkpoint) / "tokenizer.json"
            export_bundle(src, work, target=t.name, progress=progress, tokenizer_file=tok_file)
        seconds["export"] = time.perf_counter() - t0

        from emma_runtime.bundle import Bundle

        from .verify import reference_model

        bundle = Bundle.load(work)
        model = None
        cfg_name = bundle.manifest.config_name

        # 2. calibrate (real data through the reference pipelines)
        feeds = None
        needs_feeds = precision in QUANTIZED or precision == "fp16"
        if needs_feeds:
            t0 = time.perf_counter()
            if calibration is not None:
                from .quantize.calibrate import load_dir

                feeds = load_dir(calibration)
                if not feeds:
                    raise BuildError(f"{calibration}: no calibration .npz files")
            else:
                from tokenizers import Tokenizer

                model = reference_model(bundle, checkpoint)
                tok = Tokenizer.from_file(str(bundle.path(bundle.manifest.tokenizer[0])))
                if echo:
                    echo(f"calibrate: capturing component inputs from the reference pipelines ({recipe} recipe)")
                feeds = capture_calibration(model, tok, recipe)
            seconds["calibrate"] = time.perf_counter() - t0

        # 3. quantize / convert in place, manifest rewritten
        t0 = time.perf_counter()
        details: dict = {}
        if precision != "fp32":
            from .quantize import quantize_bundle

            if echo:
                echo(f"quantize: {precision} for target {t.name}")
            try:
                outcomes = quantize_bundle(work, precision, t, feeds, calib_samples=calib_samples, only=only)
            except ValueError as e:
                raise BuildError(str(e)) from None
            for o in outcomes:
                details[o.component] = o.details
        else:
            _retarget(work, t.name)
        seconds["quantize"] = time.perf_counter() - t0

        # 4. engines
        t0 = time.perf_counter()
        engine_state = _engines(work, t, echo) if engines else {}
        seconds["engines"] = time.perf_counter() - t0

        # 5. verify (checksums, per-component parity; end-to-end against the fp32 pipeline)
        bundle = Bundle.load(work)
        rows: list[Row] = []
        failures: list[str] = []
        e2e_res: dict = {}
        verify_ok, e2e_ok = True, True
        comps = {}
        if verify:
            from .verify import verify_bundle

            t0 = time.perf_counter()
            rep = verify_bundle(work, checkpoint=checkpoint)
            comps = rep.components
            verify_ok = rep.passed
            failures += rep.failures
            seconds["verify"] = time.perf_counter() - t0
            if e2e and not (t.is_gpu and precision == "bf16"):
                t0 = time.perf_counter()
                from .verify_e2e import verify_pipelines

                model = model or reference_model(bundle, checkpoint)
                pipes = verify_pipelines(bundle, model)
                floor = E2E_MIN.get(precision, {})
                for k, v in pipes.items():
                    figure = v.get("token_agreement") if k == "understand" else v.get("psnr_db")
                    need = floor.get("token_agreement") if k == "understand" else floor.get("psnr_db")
                    ok = figure is not None and need is not None and figure >= need and v.get("visual_tokens") == v.get("expected_visual_tokens")
                    # the per-step figures (logits, velocity, final latents) have their floors in E2E_MIN too
                    step_ok = v.get("passed", True)
                    e2e_res[k] = {kk: vv for kk, vv in v.items() if kk not in ("passed", "reason", "min_psnr_db")} | {"min": need, "passed": ok and step_ok}
                    if not ok:
                        e2e_ok = False
                        failures.append(f"e2e {k}: {'token agreement' if k == 'understand' else 'PSNR'} {figure} < {need}")
                    elif not step_ok:
                        e2e_ok = False
                        failures.append(f"e2e {k}: {v.get('reason')}")
                seconds["e2e"] = time.perf_counter() - t0
        tasks: dict = {}
        if verify and task_eval_n > 0 and cfg_name == "shapes":
            t0 = time.perf_counter()
            if echo:
                echo(f"evaluate: shapes-world held-out suite, n={task_eval_n}, runtime and fp32 reference")
            tasks = _task_figures(work, checkpoint, task_eval_n)
            seconds["evaluate"] = time.perf_counter() - t0
        m = bundle.manifest
        for name, info in m.components.items():
            r = comps.get(name)
            size = bundle.path(info.file).stat().st_size + sum(bundle.path(f).stat().st_size for f, _ in info.data_files)
            eng = engine_state.get(name) or engine_state.get("*") or ("n/a (ONNX Runtime)" if not t.is_gpu else "no")
            rows.append(Row(name, info.precision, size, None if r is None else r.rel_l2, None if r is None else r.tolerance,
                            None if r is None else r.passed, eng, m.precision_policy.get(name, "")))
        report = BuildReport(str(out), cfg_name, precision, t.name, rows, e2e_res, e2e_ok, verify_ok, failures, seconds, details, tasks,
                             sorted(only))
        (work / "build-report.json").write_text(json.dumps(report.to_dict(), indent=2))
        if not report.passed and not force:
            raise BuildError("verify failed, nothing written: " + "; ".join(failures[:4]) + (" ..." if len(failures) > 4 else ""))
        from .export.bundle_writer import _replace_dir

        _replace_dir(work, out)
        return report
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


def _task_figures(bundle_dir: Path, checkpoint, n: int) -> dict:
    """What users see, for this precision: the held-out suite through the bundle and through the
    fp32 PyTorch reference (same scenes, same initial noise), and the change against fp32."""
    from .shapes.evaluate import evaluate, headline

    ck = None
    if checkpoint:
        ck = Path(checkpoint) / "model.safetensors" if Path(checkpoint).is_dir() else Path(checkpoint)
    res = evaluate(bundle_dir, n=n, seed=0, reference=True, checkpoint=ck, ceiling=False)
    return {"n": n, "split": res["split"], "runtime": headline(res["runtime"]), "fp32_reference": headline(res["reference"]),
            "change_vs_fp32": res["delta"]}


def _retarget(bundle_dir: Path, target: str) -> None:
    from dataclasses import replace

    from emma_runtime.bundle import MANIFEST, Bundle

    m = Bundle.load(bundle_dir, check_files=False).manifest
    if m.target != target:
        (bundle_dir / MANIFEST).write_text(replace(m, target=target).to_json())


def print_report(rep: BuildReport) -> None:
    from rich.console import Console
    from rich.table import Table

    tab = Table(title=f"build {rep.config} {rep.precision} -> {rep.target}: {rep.out}")
    for col in ("component", "precision", "size", "rel L2", "tolerance", "pass", "engine built"):
        tab.add_column(col)
    for r in rep.rows:
        err = "-" if r.rel_l2 is None or not math.isfinite(r.rel_l2) else f"{r.rel_l2:.3g}"
        tol = "-" if r.tolerance is None else f"{r.tolerance:g}"
        ok = "-" if r.passed is None else ("yes" if r.passed else "[red]NO")
        tab.add_row(r.component, r.precision, _size(r.bytes), err, tol, ok, r.engine)
    total = sum(r.bytes for r in rep.rows)
    tab.add_row("[bold]total", "", f"[bold]{_size(total)}", "", "", "", "")
    con = Console()
    con = Console(width=max(con.width, 132))  # the table reads badly wrapped (CI logs are 80 wide)
    con.print(tab)
    for k, v in rep.e2e.items():
        fig = f"token agreement {v.get('token_agreement')}" if k == "understand" else f"PSNR {v.get('psnr_db')} dB"
        con.print(f"e2e {k} vs fp32 pipeline: {fig} (min {v.get('min')}){'' if v.get('passed') else '  [red]FAILED'}")
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


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
