"""`emma-run info --bundle B`: the bundle at a glance, this machine, and whether one can run the other.

The bundle part reads the manifest and re-hashes every file. The machine part asks what is
installed (ONNX Runtime builds and providers, TensorRT flavours, cuda-python) and what is visible
(GPUs with their compute capability and free memory, host memory) without starting a session. The
verdict compares them per way of running: ONNX Runtime on each provider, and the TensorRT engines
(each engine runs only on the compute capability it was built for).

Memory needed is counted as the weights the sessions hold (the graph and data files, or the engine
files) plus the KV cache at the model's full context for editing, the busiest task: three guidance
prefixes and, in the runtime's default batch guidance, their stacked copy (six rows). Activations
are not counted, so a tight fit is reported as such.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import click

from . import names
from .bundle import Bundle, BundleError
from .kv_cache import storage_dtype

MIB, GIB = 2**20, 2**30
KV_ROWS = 6  # edit: 3 guidance prefixes + their batched copy (cfg_mode="batch")
TIGHT = 0.9  # above this share of the free memory the fit is called tight (activations are not counted)


@dataclass(frozen=True)
class EngineRow:
    file: str
    bytes: int
    target: str
    compute_capability: str
    flavour: str


@dataclass(frozen=True)
class ComponentRow:
    name: str
    precision: str
    bytes: int  # the graph plus its external data files
    engine: EngineRow | None


@dataclass(frozen=True)
class BundleSummary:
    path: str
    format_version: int
    config_name: str
    precision: str
    target: str
    created_by: str
    weights: dict
    model: dict
    components: list[ComponentRow]
    files: int
    total_bytes: int
    checksums: str  # "verified", or what failed
    kv_cache_bytes: int  # KV_ROWS rows at max_context
    trt_cache_files: int = 0  # the TensorRT provider's engine/timing caches in the bundle folder (machine-specific)
    trt_cache_bytes: int = 0

    @property
    def graph_bytes(self) -> int:
        return sum(c.bytes for c in self.components)

    @property
    def engine_bytes(self) -> int:
        return sum(c.engine.bytes for c in self.components if c.engine)

    @property
    def has_engines(self) -> bool:
        return all(c.engine for c in self.components)


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    compute_capability: str
    memory_total: int
    memory_free: int


@dataclass(frozen=True)
class Machine:
    onnxruntime: str
    onnxruntime_distributions: dict[str, str]
    providers: list[str]
    tensorrt: dict[str, str]  # flavour -> version, for the ones that import
    cuda_python: str
    gpus: list[Gpu]
    gpu_probe: str  # how the GPUs were found, or why none were
    host_memory_total: int
    host_memory_available: int


@dataclass(frozen=True)
class Verdict:
    way: str  # "ort cpu", "ort cuda", "ort tensorrt", "trt engines"
    runnable: bool
    reason: str
    needs_bytes: int = 0
    has_bytes: int = 0


@dataclass(frozen=True)
class InfoReport:
    bundle: BundleSummary
    machine: Machine
    verdicts: list[Verdict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# ---- the bundle ---------------------------------------------------------------------------------

def _size(root: Path, file: str) -> int:
    try:
        return (root / file).stat().st_size
    except OSError:
        return 0


def summarize_bundle(path: str | Path) -> BundleSummary:
    bundle = Bundle.load(path, check_files=False)
    try:
        bundle.verify_checksums()
        checksums = "verified"
    except BundleError as e:
        checksums = f"FAILED: {e}"
    m, root = bundle.manifest, bundle.root
    rows = []
    for name, c in m.components.items():
        eng = None
        if c.engine:
            e = c.engine
            eng = EngineRow(e.file, _size(root, e.file), e.target, e.compute_capability, e.flavour)
        rows.append(ComponentRow(name, c.precision, _size(root, c.file) + sum(_size(root, f) for f, _ in c.data_files), eng))
    files = m.files()
    bb = m.components.get(names.BACKBONE_UND) or m.components[names.BACKBONE_GEN]
    kv = bb.tensor(names.past_kv(0)[0])
    import numpy as np

    from .backends.ort_providers import TRT_CACHE_DIR

    cache_dir = root / TRT_CACHE_DIR
    cache = [p for p in cache_dir.iterdir() if p.is_file()] if cache_dir.is_dir() else []
    d = m.model
    kv_bytes = 2 * d.num_layers * d.num_kv_heads * d.head_dim * storage_dtype(kv.dtype).itemsize * d.max_context * KV_ROWS
    return BundleSummary(
        path=str(root), format_version=m.format_version, config_name=m.config_name, precision=m.precision,
        target=m.target, created_by=m.created_by, weights=dict(m.weights), model=asdict(d), components=rows,
        files=len(files) + 1, total_bytes=_size(root, "manifest.json") + sum(_size(root, f) for f, _ in files),
        checksums=checksums, kv_cache_bytes=kv_bytes, trt_cache_files=len(cache), trt_cache_bytes=sum(p.stat().st_size for p in cache),
    )


# ---- the machine --------------------------------------------------------------------------------

def _host_memory() -> tuple[int, int]:
    try:
        fields = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, _, v = line.partition(":")
            fields[k] = int(v.split()[0]) * 1024
        return fields.get("MemTotal", 0), fields.get("MemAvailable", fields.get("MemFree", 0))
    except (OSError, ValueError):
        return 0, 0


def _gpus_cudart() -> list[Gpu] | None:
    try:
        try:
            from cuda.bindings import runtime as rt
        except ImportError:
            from cuda import cudart as rt
    except ImportError:
        return None
    status, n = rt.cudaGetDeviceCount()
    if int(status) != 0:
        return []
    gpus = []
    for i in range(n):
        rt.cudaSetDevice(i)
        _, prop = rt.cudaGetDeviceProperties(i)
        _, free, total = rt.cudaMemGetInfo()
        name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
        gpus.append(Gpu(i, name.rstrip("\x00"), f"{prop.major}.{prop.minor}", int(total), int(free)))
    return gpus


def _gpus_nvidia_smi() -> list[Gpu] | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=index,name,compute_cap,memory.total,memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 5:
            try:
                gpus.append(Gpu(int(parts[0]), parts[1], parts[2], int(float(parts[3]) * MIB), int(float(parts[4]) * MIB)))
            except ValueError:
                continue
    return gpus


def probe_gpus() -> tuple[list[Gpu], str]:
    try:
        gpus = _gpus_cudart()
    except Exception as e:  # a broken driver install: fall through to nvidia-smi
        gpus, err = None, str(e)
    else:
        err = ""
    if gpus:
        return gpus, "cuda-python"
    smi = _gpus_nvidia_smi()
    if smi:
        return smi, "nvidia-smi"
    if gpus is None and smi is None:
        return [], "no GPU seen: neither cuda-python nor nvidia-smi is here" + (f" ({err})" if err else "")
    return [], "no GPU visible to the CUDA driver"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""


def probe_machine() -> Machine:
    import onnxruntime as ort

    from .backends.ort_providers import installed_distributions

    trt = {}
    for flavour, module in (("tensorrt", "tensorrt"), ("tensorrt-rtx", "tensorrt_rtx")):
        try:
            trt[flavour] = importlib.import_module(module).__version__
        except Exception:  # not installed, or its libraries do not load here
            pass
    gpus, how = probe_gpus()
    total, avail = _host_memory()
    return Machine(ort.__version__, installed_distributions(), list(ort.get_available_providers()), trt,
                   _version("cuda-python") or _version("cuda-bindings"), gpus, how, total, avail)


# ---- the verdict --------------------------------------------------------------------------------

def _fit(way: str, need: int, have: int, where: str) -> Verdict:
    if need > have:
        return Verdict(way, False, f"needs {need / GIB:.2f} GiB, {where} has {have / GIB:.2f} GiB free", need, have)
    tight = " (tight: activations not counted)" if need > TIGHT * have else ""
    return Verdict(way, True, f"needs {need / GIB:.2f} GiB of {have / GIB:.2f} GiB free on {where}{tight}", need, have)


def verdicts(b: BundleSummary, m: Machine) -> list[Verdict]:
    from .backends.ort_providers import CPU, CUDA, TRT, missing_provider_message

    out = []
    graphs = b.graph_bytes + b.kv_cache_bytes
    if b.checksums != "verified":
        return [Verdict(w, False, "the bundle failed its checksums") for w in ("ort cpu", "ort cuda", "ort tensorrt", "trt engines")]
    out.append(_fit("ort cpu", graphs, m.host_memory_available, "the host") if CPU in m.providers
               else Verdict("ort cpu", False, missing_provider_message(CPU)))
    gpu = m.gpus[0] if m.gpus else None
    for way, prov in (("ort cuda", CUDA), ("ort tensorrt", TRT)):
        if prov not in m.providers:
            out.append(Verdict(way, False, missing_provider_message(prov)))
        elif gpu is None:
            out.append(Verdict(way, False, f"no GPU: {m.gpu_probe}"))
        elif prov == TRT and "tensorrt" not in m.tensorrt:
            out.append(Verdict(way, False, "TensorRT's libraries are not installed: pip install 'emma-runtime[trt]'"))
        elif prov == TRT and b.precision == "fp8" and _cc(gpu.compute_capability) < (8, 9):
            # the CUDA provider dequantizes FP8 Q/DQ graphs and runs them; TensorRT wants FP8 tensor cores
            out.append(Verdict(way, False, f"an fp8 bundle needs FP8 tensor cores (compute capability 8.9+) for TensorRT; "
                                           f"GPU 0 ({gpu.name}) is {gpu.compute_capability}: use --provider cuda"))
        else:
            out.append(_fit(way, graphs, gpu.memory_free, f"GPU 0 ({gpu.name})"))
    out.append(_engine_verdict(b, m, gpu))
    return out


def _cc(text: str) -> tuple[int, int]:
    major, _, minor = text.partition(".")
    try:
        return int(major), int(minor or 0)
    except ValueError:
        return (0, 0)


def _engine_verdict(b: BundleSummary, m: Machine, gpu: Gpu | None) -> Verdict:
    way = "trt engines"
    if not any(c.engine for c in b.components):
        return Verdict(way, False, f"the bundle has no engines (build them: emma-export engines --bundle {b.path} --target auto)")
    if not b.has_engines:
        lacking = [c.name for c in b.components if not c.engine]
        return Verdict(way, False, f"no engine for {', '.join(lacking)}")
    if not m.cuda_python:
        return Verdict(way, False, "cuda-python is not installed: pip install 'emma-runtime[trt]'")
    flavours = {c.engine.flavour or ("tensorrt-rtx" if c.engine.target.startswith("rtx") else "tensorrt") for c in b.components}
    absent = sorted(f for f in flavours if f not in m.tensorrt)
    if absent:
        hint = "pip install " + " ".join(f"'emma-runtime[{'trt' if f == 'tensorrt' else 'trt-rtx'}]'" for f in absent)
        return Verdict(way, False, f"the engines need {', '.join(absent)}, not installed here: {hint}")
    if gpu is None:
        return Verdict(way, False, f"no GPU: {m.gpu_probe}")
    ccs = sorted({c.engine.compute_capability for c in b.components})
    if ccs != [gpu.compute_capability]:
        return Verdict(way, False, f"the engines are built for compute capability {', '.join(ccs)} and GPU 0 ({gpu.name}) is "
                                   f"{gpu.compute_capability}: rebuild on this machine, emma-export engines --bundle {b.path} --target auto")
    return _fit(way, b.engine_bytes + b.kv_cache_bytes, gpu.memory_free, f"GPU 0 ({gpu.name})")


def bundle_info(path: str | Path) -> InfoReport:
    b = summarize_bundle(path)
    m = probe_machine()
    return InfoReport(b, m, verdicts(b, m))


# ---- the command --------------------------------------------------------------------------------

def _mib(n: int) -> str:
    return f"{n / MIB:.2f}"


def render(r: InfoReport) -> str:
    b, m = r.bundle, r.machine
    d = b.model
    lines = [
        f"bundle     {b.path} (format {b.format_version}, written by {b.created_by or '?'})",
        f"config     {b.config_name}: hidden {d['hidden_size']}, {d['num_layers']} layers, {d['num_kv_heads']} KV heads x "
        f"{d['head_dim']}, vocab {d['vocab_size']}, context {d['max_context']}, {d['num_experts']} vision experts",
        f"precision  {b.precision}    target {b.target}    weights "
        + (" ".join(f"{k}={v}" for k, v in b.weights.items()) or "?"),
        f"checksums  {b.checksums} ({b.files} files, {_mib(b.total_bytes)} MiB)",
        "",
        f"{'component':<16}{'precision':<11}{'graph MiB':>10}  engine",
    ]
    for c in b.components:
        eng = "-"
        if c.engine:
            e = c.engine
            eng = f"{_mib(e.bytes)} MiB, {e.flavour or 'tensorrt'} for {e.target} (compute capability {e.compute_capability})"
        lines.append(f"{c.name:<16}{c.precision:<11}{_mib(c.bytes):>10}  {eng}")
    lines.append(f"{'total':<27}{_mib(b.graph_bytes):>10}  " + (f"{_mib(b.engine_bytes)} MiB of engines" if b.engine_bytes else ""))
    lines.append(f"KV cache at context {d['max_context']} ({KV_ROWS} rows: edit's guidance): {_mib(b.kv_cache_bytes)} MiB")
    if b.trt_cache_files:
        lines.append(f"TensorRT provider cache: {b.trt_cache_files} files, {_mib(b.trt_cache_bytes)} MiB (built on a machine "
                     f"like this one; not part of the manifest)")
    dists = ", ".join(f"{k} {v}" for k, v in m.onnxruntime_distributions.items()) or "?"
    lines += [
        "",
        "machine",
        f"  onnxruntime {m.onnxruntime} ({dists}): {', '.join(m.providers)}",
        f"  TensorRT   {', '.join(f'{k} {v}' for k, v in m.tensorrt.items()) or 'not installed'}",
        f"  cuda-python {m.cuda_python or 'not installed'}",
    ]
    if m.gpus:
        for g in m.gpus:
            lines.append(f"  GPU {g.index}      {g.name}, compute capability {g.compute_capability}, "
                         f"{g.memory_free / GIB:.1f} of {g.memory_total / GIB:.1f} GiB free ({m.gpu_probe})")
    else:
        lines.append(f"  GPU        {m.gpu_probe}")
    lines.append(f"  host       {m.host_memory_available / GIB:.1f} of {m.host_memory_total / GIB:.1f} GiB available")
    lines += ["", "can run here"]
    for v in r.verdicts:
        lines.append(f"  {v.way:<14}{'yes' if v.runnable else 'no ':<5}{v.reason}")
    return "\n".join(lines)


@click.command("info")
@click.option("--bundle", required=True, type=click.Path(), help="Bundle directory.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info_command(bundle, as_json):
    """The bundle at a glance, this machine's providers and GPUs, and whether it can run the bundle."""
    try:
        r = bundle_info(bundle)
    except BundleError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    click.echo(json.dumps(r.to_dict(), indent=2) if as_json else render(r))
    if r.bundle.checksums != "verified":
        click.echo(f"error: {r.bundle.checksums.removeprefix('FAILED: ')}", err=True)
        sys.exit(2)
