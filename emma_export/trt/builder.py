"""One engine builder over the TensorRT Python API, for ``tensorrt`` and ``tensorrt_rtx`` alike.

Per bundle component: parse the ONNX graph into a strongly typed network (the graph's own types
decide each layer's precision, which is what Q/DQ graphs need and what fp32/fp16 graphs get too),
add one optimization profile made from the manifest's ``profile`` symbols, and serialize the
engine. The flavours differ only where the API does:

- ``tensorrt`` builds for the GPU it runs on; a target may ask for hardware or version
  compatibility, and a timing cache (one file per target and TensorRT version) speeds up rebuilds.
- ``tensorrt_rtx`` compiles ahead of time for a compute capability set in the builder config
  (no GPU needed) and finishes kernels on the device; it has no timing cache.

Engines land in the bundle as ``<component>.engine`` and the manifest records an ``EngineInfo``
per component. The engine files and the manifest are written to temporary files first and moved
into place with ``os.replace`` once every component has built, so a failed build changes nothing.
"""

from __future__ import annotations

import importlib
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

from emma_runtime.bundle import MANIFEST, Bundle, ComponentInfo, EngineInfo, sha256_file

from ..targets import Target, TargetError, check_precision, detect_gpu, normalize_precision, parse_cc

MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
PIP = {"tensorrt": "pip install tensorrt-cu12 (or tensorrt-cu13)", "tensorrt-rtx": "pip install tensorrt-rtx-cu13"}
ENGINE_SUFFIX = ".engine"
DEFAULT_OPT_LEVEL = 3


class TrtUnavailable(RuntimeError):
    """The TensorRT flavour a target needs is not installed here (one line)."""


class EngineBuildError(RuntimeError):
    """A component that does not parse or build; the message names the component (and the node)."""


@dataclass(frozen=True)
class EngineResult:
    component: str
    file: str
    engine_bytes: int
    build_seconds: float
    sha256: str
    target: str
    compute_capability: str
    flavour: str
    peak_rss: int = 0  # bytes: this process's peak resident memory while the builder ran


#: the builder's peak resident memory per byte of graph weights (TensorRT-RTX here, measured: an MLP
#: of 0.8 GB of fp16 weights built at 2.5 GB peak RSS). Past the memory this machine has, a component's
#: engine is left to the device and the manifest says why (``ComponentInfo.engine_on_device``).
BUILDER_RSS_PER_WEIGHT_BYTE = 3.2
MEMORY_ENV = "EMMA_ENGINE_BUILD_MEMORY_GB"


def build_memory_budget() -> int:
    """Bytes the builder may use: ``EMMA_ENGINE_BUILD_MEMORY_GB``, else what the kernel says is
    available now (MemAvailable), else no limit."""
    raw = os.environ.get(MEMORY_ENV)
    if raw:
        try:
            return int(float(raw) * 2**30)
        except ValueError:
            raise EngineBuildError(f"{MEMORY_ENV}={raw!r}: expected a number of GiB") from None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def _reset_peak_rss() -> None:
    """Linux resets the process's peak RSS (VmHWM) on '5' to clear_refs, so each build's is its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def trt_module(flavour: str):
    """The TensorRT Python module for ``flavour`` ("tensorrt" or "tensorrt-rtx"), or TrtUnavailable."""
    if flavour not in MODULES:
        raise TrtUnavailable(f"flavour {flavour!r} builds no TensorRT engines (choose one of {', '.join(MODULES)})")
    try:
        return importlib.import_module(MODULES[flavour])
    except ImportError as e:
        raise TrtUnavailable(f"{flavour} is not installed here ({PIP[flavour]}): {e}") from None
    except OSError as e:  # the wheel imports but a shared library (libnvinfer, CUDA) is missing
        raise TrtUnavailable(f"{flavour} is installed but does not load: {e}") from None


def available_module():
    """Whichever TensorRT module imports here (full TensorRT first), with its flavour name."""
    errors = []
    for flavour in ("tensorrt", "tensorrt-rtx"):
        try:
            return trt_module(flavour), flavour
        except TrtUnavailable as e:
            errors.append(str(e))
    raise TrtUnavailable("no TensorRT module imports: " + "; ".join(errors))


def deferred_build_message(target: Target, bundle_dir: str | Path, reason: str) -> str:
    """The one line printed instead of building when this machine cannot build ``target``."""
    where = target.build_on or "a machine with that GPU and TensorRT"
    return (f"{target.name}: {reason}; build its engines on {where}: "
            f"emma-export engines --bundle {bundle_dir} --target {target.name}")


# ---- logging ------------------------------------------------------------------------------------

def _make_logger(trt, echo: Callable[[str], None] | None = None):
    """An ILogger that keeps errors (for messages) and forwards warnings to ``echo`` if given."""

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg.strip())
            elif severity == trt.ILogger.Severity.WARNING and echo is not None:
                echo(f"[TensorRT] {msg.strip()}")

        def last_error(self) -> str:
            return self.errors[-1].splitlines()[-1] if self.errors else "no error message"

    return _Logger()


# ---- parse --------------------------------------------------------------------------------------

def parser_errors(parser) -> list[str]:
    """One line per parser error: node index, name and operator, and the parser's reason."""
    out = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        code = getattr(e.code(), "name", str(e.code())).lower()
        name = e.node_name() or "?"
        op = e.node_operator() or "?"
        node = e.node()
        where = f"node {node} '{name}' ({op})" if node >= 0 else "graph"
        desc = e.desc().strip()
        out.append(f"{where}: {code}" + (f": {desc}" if desc and desc != "false" else ""))
    return out


def parse_network(trt, builder, onnx_path: Path, logger, component: str):
    """A strongly typed network from ``onnx_path``; EngineBuildError naming the node on failure."""
    flag = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flag)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(onnx_path))  # resolves external data next to the file
    if not ok:
        lines = parser_errors(parser) or [logger.last_error()]
        raise EngineBuildError(f"{component}: {onnx_path.name} does not parse: " + "; ".join(lines))
    return network, parser


# ---- profile ------------------------------------------------------------------------------------

def resolve_profile(profile: dict[str, tuple[int, int, int]]) -> dict[str, tuple[int, int, int]]:
    """The profile with ``total`` = ``past`` + ``seq`` filled in when the manifest lacks it, checked
    for min <= opt <= max and non-negative sizes."""
    p = {k: tuple(int(x) for x in v) for k, v in profile.items()}
    if "total" not in p and "past" in p and "seq" in p:
        p["total"] = tuple(a + b for a, b in zip(p["past"], p["seq"]))
    for k, (lo, opt, hi) in p.items():
        if not (0 <= lo <= opt <= hi):
            raise EngineBuildError(f"profile symbol {k!r}: (min, opt, max) = {(lo, opt, hi)} is not 0 <= min <= opt <= max")
    return p


def profile_shapes(info: ComponentInfo, component: str = "") -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shapes per input: every symbolic dim of the manifest's input mapped through
    the component's profile. Raises EngineBuildError for a symbol the profile does not cover."""
    prof = resolve_profile(info.profile)
    out = {}
    for t in info.inputs:
        shapes = []
        for k in range(3):
            dims = []
            for d in t.shape:
                if isinstance(d, int):
                    dims.append(d)
                elif d in prof:
                    dims.append(prof[d][k])
                else:
                    raise EngineBuildError(f"{component or 'component'}: input '{t.name}' has dim {d!r} that the manifest's profile does not cover")
            shapes.append(tuple(dims))
        out[t.name] = tuple(shapes)
    return out


# ---- build --------------------------------------------------------------------------------------

def _compute_capability_enum(trt, cc: str):
    major, minor = parse_cc(cc)
    member = f"SM{major}{minor}"
    enum = trt.ComputeCapability
    if member not in enum.__members__:
        have = ", ".join(m for m in enum.__members__ if m.startswith("SM"))
        raise TargetError(f"TensorRT-RTX {trt.__version__} cannot compile for compute capability {cc} (it knows {have})")
    return enum.__members__[member]


def default_timing_cache(target: Target, trt) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "emma-deploy"
    return base / f"timing-{target.name}-sm{(target.compute_capability or '').replace('.', '')}-trt{trt.__version__}.cache"


def build_component(trt, target: Target, onnx_path: Path, info: ComponentInfo, component: str, *,
                    opt_level: int = DEFAULT_OPT_LEVEL, timing_cache=None, workspace_gb: float | None = None,
                    echo: Callable[[str], None] | None = None) -> tuple[bytes, float]:
    """Serialized engine bytes and build seconds for one component."""
    t0 = time.perf_counter()
    logger = _make_logger(trt, echo)
    builder = trt.Builder(logger)
    network, _parser = parse_network(trt, builder, onnx_path, logger, component)
    config = builder.create_builder_config()
    config.builder_optimization_level = opt_level
    if workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    rtx = target.flavour == "tensorrt-rtx"
    if rtx:
        config.num_compute_capabilities = 1
        if not config.set_compute_capability(_compute_capability_enum(trt, target.compute_capability), 0):
            raise EngineBuildError(f"{component}: TensorRT-RTX refused compute capability {target.compute_capability}: {logger.last_error()}")
    else:
        if target.hardware_compatibility != "none":
            config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.__members__[target.hardware_compatibility.upper()]
        if timing_cache is not None:
            config.set_timing_cache(timing_cache, False)
    if target.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)

    shapes = profile_shapes(info, component)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in shapes:
            raise EngineBuildError(f"{component}: the graph's input '{name}' is not in the manifest")
        lo, opt, hi = shapes[name]
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"{component}: {target.flavour} could not build an engine for {target.name}: {logger.last_error()}")
    return bytes(serialized), time.perf_counter() - t0


def _check_can_build(target: Target, trt) -> str | None:
    """Why this machine cannot build ``target`` with full TensorRT (None: it can)."""
    gpu = detect_gpu()
    if gpu is None:
        return "TensorRT imports but no NVIDIA GPU is visible (full TensorRT builds on the target GPU)"
    if target.hardware_compatibility == "none" and gpu.compute_capability != target.compute_capability:
        return (f"this machine's GPU ({gpu.name}) is compute capability {gpu.compute_capability}, "
                f"{target.name} is {target.compute_capability}")
    return None


def build_engines(bundle_dir: str | Path, target: Target, *, components: Iterable[str] | None = None,
                  opt_level: int = DEFAULT_OPT_LEVEL, timing_cache: str | Path | bool | None = None,
                  workspace_gb: float | None = None, echo: Callable[[str], None] = print,
                  progress: Callable[[str, EngineResult], None] | None = None) -> list[EngineResult]:
    """Builds ``<component>.engine`` for every (or the named) component of the bundle for ``target``
    and records an EngineInfo per component in manifest.json.

    Returns [] after one line through ``echo`` when the target needs no engines (``ort``) or when its
    TensorRT flavour is not usable here (where and how to build them instead). ``timing_cache``:
    a path, True/None for the default per-target file, False for none (``tensorrt`` only).
    """
    bundle_dir = Path(bundle_dir)
    bundle = Bundle.load(bundle_dir)
    manifest = bundle.manifest
    if target.flavour == "ort":
        echo(f"{target.name}: ONNX Runtime runs the bundle's ONNX graphs; there are no engines to build")
        return []
    for precision in sorted({manifest.precision, *(c.precision for c in manifest.components.values())}):
        check_precision(target, normalize_precision(precision))
    try:
        trt = trt_module(target.flavour)
    except TrtUnavailable as e:
        if target.flavour == "tensorrt":
            reason = "TensorRT is not installed here" if "not installed" in str(e) else str(e)
            echo(deferred_build_message(target, bundle_dir, reason))
            return []
        raise
    if target.flavour == "tensorrt":
        why = _check_can_build(target, trt)
        if why:
            echo(deferred_build_message(target, bundle_dir, why))
            return []

    names = list(manifest.components) if components is None else list(components)
    unknown = [n for n in names if n not in manifest.components]
    if unknown:
        raise EngineBuildError(f"unknown component(s) {unknown}; the bundle has {list(manifest.components)}")
    fused = [n for n in names if manifest.components[n].attention != "standard"]
    if fused:
        raise EngineBuildError(f"{', '.join(fused)}: ONNX Runtime's fused {manifest.components[fused[0]].attention} graph, which "
                               f"TensorRT does not parse: build the bundle for {target.name} (or export with --attention standard)")

    # One target per bundle: a partial rebuild must not leave engines for two targets behind.
    others = sorted({c.engine.target for n, c in manifest.components.items()
                     if c.engine is not None and n not in names and c.engine.target != target.name})
    if others:
        raise EngineBuildError(f"the bundle's other engines are for {', '.join(others)}: build every component "
                               f"(no --component) to switch it to {target.name}")

    cache, cache_path = None, None
    if target.flavour == "tensorrt" and timing_cache is not False:
        cache_path = default_timing_cache(target, trt) if timing_cache in (None, True) else Path(timing_cache)
        cfg0 = trt.Builder(_make_logger(trt)).create_builder_config()
        cache = cfg0.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")

    cc = target.compute_capability or ""
    staged: list[tuple[Path, Path]] = []
    results: list[EngineResult] = []
    entries = dict(manifest.components)
    from ..export.external_data import graph_weight_bytes

    budget = build_memory_budget()
    try:
        for name in names:
            info = manifest.components[name]
            weights = graph_weight_bytes(bundle.path(info.file))
            need = int(BUILDER_RSS_PER_WEIGHT_BYTE * weights)
            if need > budget:
                why = (f"the builder needs about {need / 2**30:.1f} GiB ({BUILDER_RSS_PER_WEIGHT_BYTE:g}x its {weights / 2**30:.2f} GiB "
                       f"of weights), more than the {budget / 2**30:.1f} GiB here: build it on the device "
                       f"(emma-export engines --bundle B --target {target.name} --component {name})")
                echo(f"{name}: {why}")
                entries[name] = replace(info, engine=None, engine_on_device=why)
                continue
            _reset_peak_rss()
            data, seconds = build_component(trt, target, bundle.path(info.file), info, name, opt_level=opt_level,
                                            timing_cache=cache, workspace_gb=workspace_gb)
            peak = _peak_rss()
            final = bundle_dir / f"{name}{ENGINE_SUFFIX}"
            tmp = _write_temp(bundle_dir, final.name, data)
            del data
            staged.append((tmp, final))
            digest = sha256_file(tmp)
            res = EngineResult(name, final.name, tmp.stat().st_size, seconds, digest, target.name, cc, target.flavour, peak)
            results.append(res)
            entries[name] = replace(info, engine_on_device="", engine=EngineInfo(
                final.name, digest, target.name, cc, dict(resolve_profile(info.profile)), round(seconds, 3), target.flavour, peak))
            if progress:
                progress(name, res)
        new_manifest = replace(manifest, components=entries)
        mtmp = _write_temp(bundle_dir, MANIFEST, new_manifest.to_json().encode())
        staged.append((mtmp, bundle_dir / MANIFEST))
        for tmp, final in staged:  # engines first, the manifest last
            os.replace(tmp, final)
        staged.clear()
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    if cache is not None and cache_path is not None:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(cache_path, bytes(cache.serialize()))
        except OSError as e:
            echo(f"timing cache not saved ({cache_path}): {e}")
    return results


def _write_temp(directory: Path, name: str, data: bytes) -> Path:
    fd, p = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        os.chmod(p, 0o666 & ~_umask())  # mkstemp makes 0600; the bundle's files are ordinary files
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(p).unlink(missing_ok=True)
        raise
    return Path(p)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, data: bytes) -> None:
    os.replace(_write_temp(path.parent, path.name, data), path)
