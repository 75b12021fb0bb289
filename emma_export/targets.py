"""Deployment targets: where a bundle runs, with which engine flavour, and at which precisions.

The targets are data (``engines/targets/<name>.json``, one file each); this module types them and
holds the rules that follow from the hardware: FP8 tensor cores need compute capability 8.9 or
newer, BF16 and INT4 weight-only kernels 8.0 or newer. ``auto`` is resolved here: the visible
GPU's compute capability (nvidia-smi, NVML, cuda-python or a Jetson's device tree) with whichever
TensorRT flavour imports, else ``cpu``.

Set ``EMMA_TARGETS_DIR`` to read the target files from another folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

Flavour = Literal["ort", "tensorrt", "tensorrt-rtx"]
FLAVOURS: tuple[str, ...] = ("ort", "tensorrt", "tensorrt-rtx")

from .precision import ALIASES as PRECISION_ALIASES  # noqa: F401 - the names targets have always offered
from .precision import MIN_COMPUTE_CAPABILITY, PRECISIONS
from .precision import normalize as normalize_precision


HARDWARE_COMPATIBILITY = ("none", "ampere_plus", "same_compute_capability")

TARGETS_DIR = Path(os.environ.get("EMMA_TARGETS_DIR", Path(__file__).resolve().parents[1] / "engines" / "targets"))


class TargetError(ValueError):
    """An unknown target, a malformed target file, or a precision the target cannot run (one line)."""


@dataclass(frozen=True)
class Target:
    name: str
    flavour: Flavour
    compute_capability: str | None  # "8.9"; None for the CPU
    memory_gb: tuple[float, ...]  # the memory variants of the device (e.g. Orin 8/16/32/64)
    precisions: tuple[str, ...]
    notes: str = ""
    reserved_gb: float = 1.0  # held by the OS, driver, display or CUDA context: not available to the model
    hardware_compatibility: str = "none"  # TensorRT HardwareCompatibilityLevel, lower case
    version_compatible: bool = False  # TensorRT BuilderFlag.VERSION_COMPATIBLE
    build_on: str = ""  # where its engines can be built (shown when this machine cannot)
    source: str = field(default="", compare=False)  # the file it came from

    @property
    def cc(self) -> tuple[int, int] | None:
        return parse_cc(self.compute_capability) if self.compute_capability else None

    @property
    def is_gpu(self) -> bool:
        return self.flavour != "ort"

    def describe(self) -> str:
        where = f"compute capability {self.compute_capability}" if self.compute_capability else "CPU"
        mem = "/".join(f"{m:g}" for m in self.memory_gb)
        return f"{self.name}: {self.flavour}, {where}, {mem} GB, precisions {', '.join(self.precisions)}"

    @classmethod
    def from_dict(cls, d: dict, source: str = "") -> "Target":
        where = source or d.get("name", "target")
        known = {f for f in cls.__dataclass_fields__ if f != "source"}
        unknown = set(d) - known
        if unknown:
            raise TargetError(f"{where}: unknown field(s) {sorted(unknown)}")
        for k in ("name", "flavour", "compute_capability", "memory_gb", "precisions"):
            if k not in d:
                raise TargetError(f"{where}: missing field '{k}'")
        if d["flavour"] not in FLAVOURS:
            raise TargetError(f"{where}: flavour {d['flavour']!r} is not one of {', '.join(FLAVOURS)}")
        cc = d["compute_capability"]
        if d["flavour"] == "ort":
            if cc is not None:
                raise TargetError(f"{where}: an 'ort' target has no compute_capability")
        else:
            if not isinstance(cc, str):
                raise TargetError(f"{where}: compute_capability must be a string like \"8.9\"")
            parse_cc(cc, where)
        bad = [p for p in d["precisions"] if p not in PRECISIONS]
        if bad:
            raise TargetError(f"{where}: unknown precision(s) {bad}; known: {', '.join(PRECISIONS)}")
        hw = d.get("hardware_compatibility", "none")
        if hw not in HARDWARE_COMPATIBILITY:
            raise TargetError(f"{where}: hardware_compatibility {hw!r} is not one of {', '.join(HARDWARE_COMPATIBILITY)}")
        mem = tuple(float(m) for m in d["memory_gb"])
        if not mem or any(m <= 0 for m in mem):
            raise TargetError(f"{where}: memory_gb must list positive sizes")
        t = cls(
            name=d["name"], flavour=d["flavour"], compute_capability=cc, memory_gb=mem,
            precisions=tuple(d["precisions"]), notes=d.get("notes", ""), reserved_gb=float(d.get("reserved_gb", 1.0)),
            hardware_compatibility=hw, version_compatible=bool(d.get("version_compatible", False)),
            build_on=d.get("build_on", ""), source=source,
        )
        # The data must agree with the hardware rules (a target listing fp8 below SM 8.9 is a typo).
        for p in t.precisions:
            reason = _hardware_reason(t, p)
            if reason:
                raise TargetError(f"{where}: lists {p} but {reason}")
        return t

    def to_dict(self) -> dict:
        return {
            "name": self.name, "flavour": self.flavour, "compute_capability": self.compute_capability,
            "memory_gb": list(self.memory_gb), "reserved_gb": self.reserved_gb, "precisions": list(self.precisions),
            "hardware_compatibility": self.hardware_compatibility, "version_compatible": self.version_compatible,
            "build_on": self.build_on, "notes": self.notes,
        }


def parse_cc(cc: str, where: str = "compute capability") -> tuple[int, int]:
    try:
        major, minor = cc.strip().split(".")
        return int(major), int(minor)
    except (ValueError, AttributeError):
        raise TargetError(f"{where}: compute capability {cc!r} is not of the form MAJOR.MINOR (e.g. 8.9)") from None


# ---- loading ------------------------------------------------------------------------------------

def list_targets(directory: Path | None = None) -> list[str]:
    """Names of the target files, sorted; ``auto`` is resolved separately (:func:`resolve_auto`)."""
    d = Path(directory or TARGETS_DIR)
    return sorted(p.stem for p in d.glob("*.json"))


def load_target(name: str, directory: Path | None = None) -> Target:
    """The target ``name`` (``auto``: this machine's GPU, else cpu)."""
    if name == "auto":
        return resolve_auto(directory)
    d = Path(directory or TARGETS_DIR)
    path = d / f"{name}.json"
    if not path.is_file():
        raise TargetError(f"unknown target {name!r}; choose one of {', '.join(list_targets(d) + ['auto'])}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TargetError(f"{path}: not valid JSON ({e})") from None
    t = Target.from_dict(data, str(path))
    if t.name != name:
        raise TargetError(f"{path}: names itself {t.name!r}, expected {name!r}")
    return t


def all_targets(directory: Path | None = None) -> list[Target]:
    return [load_target(n, directory) for n in list_targets(directory)]


# ---- auto ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str
    memory_gb: float | None
    via: str


def detect_gpu() -> GpuInfo | None:
    """The first visible NVIDIA GPU, or None. Tries nvidia-smi, NVML, cuda-python, then a Jetson's
    device tree (Jetson's nvidia-smi may not report the compute capability)."""
    for probe in (_gpu_nvidia_smi, _gpu_nvml, _gpu_cudart, _gpu_tegra):
        try:
            g = probe()
        except Exception:  # a broken driver install must not break `--target auto`
            g = None
        if g is not None:
            return g
    return None


def _gpu_nvidia_smi() -> GpuInfo | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    r = subprocess.run([exe, "--query-gpu=name,compute_cap,memory.total", "--format=csv,noheader,nounits"],
                       capture_output=True, text=True, timeout=20)
    if r.returncode != 0 or not r.stdout.strip():
        return None
    name, cc, mem = [x.strip() for x in r.stdout.strip().splitlines()[0].split(",")]
    parse_cc(cc)
    mem_gb = float(mem) / 1024 if mem.replace(".", "", 1).isdigit() else None
    return GpuInfo(name, cc, mem_gb, "nvidia-smi")


def _gpu_nvml() -> GpuInfo | None:
    if importlib.util.find_spec("pynvml") is None:
        return None
    import pynvml

    pynvml.nvmlInit()
    try:
        if pynvml.nvmlDeviceGetCount() < 1:
            return None
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
        name = pynvml.nvmlDeviceGetName(h)
        name = name.decode() if isinstance(name, bytes) else name
        mem = pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**30
        return GpuInfo(name, f"{major}.{minor}", mem, "nvml")
    finally:
        pynvml.nvmlShutdown()


def _gpu_cudart() -> GpuInfo | None:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError:
            return None
    err, n = cudart.cudaGetDeviceCount()
    if int(err) != 0 or n < 1:
        return None
    err, prop = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        return None
    name = prop.name.decode(errors="replace").rstrip("\x00") if isinstance(prop.name, bytes) else str(prop.name)
    return GpuInfo(name, f"{prop.major}.{prop.minor}", prop.totalGlobalMem / 2**30, "cuda-python")


_TEGRA = {"tegra234": ("Jetson Orin", "8.7"), "tegra264": ("Jetson Thor", "11.0"), "tegra194": ("Jetson Xavier", "7.2")}


def _gpu_tegra() -> GpuInfo | None:
    p = Path("/proc/device-tree/compatible")
    if not p.exists():
        return None
    compat = p.read_bytes().decode(errors="replace")
    for soc, (name, cc) in _TEGRA.items():
        if soc in compat:
            mem = None
            meminfo = Path("/proc/meminfo")
            if meminfo.exists():
                for line in meminfo.read_text().splitlines():
                    if line.startswith("MemTotal:"):
                        mem = int(line.split()[1]) / 2**20
            return GpuInfo(name, cc, mem, "device-tree")
    return None


def available_flavours() -> list[str]:
    """TensorRT flavours whose Python module is installed here (imports nothing)."""
    out = []
    if importlib.util.find_spec("tensorrt") is not None:
        out.append("tensorrt")
    if importlib.util.find_spec("tensorrt_rtx") is not None:
        out.append("tensorrt-rtx")
    return out


def precisions_for(cc: str | None) -> tuple[str, ...]:
    """What a GPU of this compute capability can run (None: the CPU, everything through ONNX Runtime)."""
    if cc is None:
        return PRECISIONS
    v = parse_cc(cc)
    return tuple(p for p in PRECISIONS if v >= MIN_COMPUTE_CAPABILITY.get(p, (0, 0)))


def resolve_auto(directory: Path | None = None, gpu: GpuInfo | None | bool = True) -> Target:
    """``--target auto``: the named target with this GPU's compute capability and an installed
    flavour when there is one (its memory variants narrowed to this GPU's), else a target made
    from the GPU itself; ``cpu`` when no GPU is visible. ``gpu``: pass a GpuInfo (tests) or None
    (no GPU); True detects."""
    g = detect_gpu() if gpu is True else (gpu or None)
    if g is None:
        return load_target("cpu", directory)
    flavours = available_flavours()
    for t in all_targets(directory):
        if t.compute_capability == g.compute_capability and t.flavour in flavours:
            mem = (round(g.memory_gb),) if g.memory_gb else t.memory_gb
            return replace(t, name="auto", memory_gb=mem, notes=f"{g.name} ({g.via}) as {t.name}. {t.notes}")
    # Full TensorRT builds for the GPU it runs on, so it can serve any compute capability.
    flavour = "tensorrt" if "tensorrt" in flavours else ("tensorrt-rtx" if flavours else "tensorrt")
    return Target(
        name="auto", flavour=flavour, compute_capability=g.compute_capability,
        memory_gb=(round(g.memory_gb),) if g.memory_gb else (8.0,), precisions=precisions_for(g.compute_capability),
        notes=f"{g.name} found by {g.via}", reserved_gb=1.0,
        build_on="this machine (its GPU is the target)",
    )


# ---- precision rules ----------------------------------------------------------------------------

def _hardware_reason(target: Target, precision: str) -> str | None:
    need = MIN_COMPUTE_CAPABILITY.get(precision)
    if need is None or target.cc is None or target.cc >= need:
        return None
    return (f"--precision {precision} needs compute capability {need[0]}.{need[1]} or newer; "
            f"{target.name} is {target.compute_capability}")


def _suggest(target: Target, precision: str) -> str:
    alts = [p for p in ("int8", "fp16") if p in target.precisions and p != precision]
    if not alts:
        alts = [p for p in target.precisions if p != precision][:2]
    return "use --precision " + " or ".join(alts) if alts else "choose another target"


def check_precision(target: Target, precision: str) -> None:
    """Raises TargetError with one line (why, and what to use instead) when ``target`` cannot run
    ``precision``."""
    if precision not in PRECISIONS:
        raise TargetError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    reason = _hardware_reason(target, precision)
    if reason:
        raise TargetError(f"{reason}: {_suggest(target, precision)}")
    if precision not in target.precisions:
        raise TargetError(f"--precision {precision} is not supported on {target.name} "
                          f"(it runs {', '.join(target.precisions)}): {_suggest(target, precision)}")
