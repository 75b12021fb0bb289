"""Which ONNX Runtime execution providers to use, with which options, and what to install when one
is missing.

``--provider cuda`` and ``--provider tensorrt`` need the GPU build of ONNX Runtime
(``onnxruntime-gpu``, the ``[gpu]`` extra); TensorRT's provider also needs TensorRT's libraries
(the ``[trt]`` extra). A provider that is asked for and cannot run here is one line saying what is
missing and the command that installs it, never a silent fall-back to the CPU.

The TensorRT provider compiles each graph into an engine on first use; its engine and timing
caches live in the bundle folder (``ort-trt-cache/``), so the second load of a bundle on a device
is quick. Those files are not in the manifest: ``pack`` leaves them out and ``unpack`` refuses them
(they are compiled for one GPU and one TensorRT version).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import onnxruntime as ort

from ..bundle import Bundle, ComponentInfo

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
ALIASES = {"cpu": CPU, "cuda": CUDA, "gpu": CUDA, "tensorrt": TRT, "trt": TRT}
PREFERRED = [TRT, CUDA, CPU]
GPU_PROVIDERS = (CUDA, TRT)
TRT_CACHE_DIR = "ort-trt-cache"

GPU_INSTALL = ("pip install 'emma-runtime[gpu]' && pip uninstall -y onnxruntime && "
               "pip install --force-reinstall --no-deps onnxruntime-gpu")
TRT_INSTALL = "pip install 'emma-runtime[trt]' (TensorRT's libraries) with onnxruntime-gpu installed"


class ProviderUnavailable(RuntimeError):
    """An execution provider that was asked for cannot run here (one line: what and how to install)."""


@dataclass(frozen=True)
class ProviderChoice:
    """The providers, in order, and the CUDA device the GPU ones run on."""

    providers: tuple[str, ...]
    device_id: int = 0
    requested: tuple[str, ...] = field(default=())  # what the caller named (empty: best available)

    @property
    def gpu(self) -> bool:
        return self.providers[0] in GPU_PROVIDERS


def installed_distributions() -> dict[str, str]:
    """The ONNX Runtime builds pip installed here ({name: version}); two at once clash."""
    out = {}
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def missing_provider_message(full: str) -> str:
    avail = ort.get_available_providers()
    dists = installed_distributions()
    if full == CPU:
        return f"{CPU} is not in this onnxruntime (available: {', '.join(avail)})"
    if len(dists) > 1:
        return (f"{full} is not available: onnxruntime and onnxruntime-gpu are both installed and share one module; "
                f"keep the GPU build: pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu")
    if full in (CUDA, TRT) and CUDA not in avail:
        return (f"{full} is not available: this onnxruntime {ort.__version__} is the CPU build "
                f"(providers: {', '.join(avail)}); for NVIDIA GPUs: {GPU_INSTALL}")
    return f"{full} is not in this onnxruntime {ort.__version__} (available: {', '.join(avail)})"


def _parse(name: str) -> tuple[str, int | None]:
    """'cuda', 'cuda:1', 'CUDAExecutionProvider' -> (full name, device id or None)."""
    base, _, dev = name.strip().partition(":")
    full = ALIASES.get(base.lower(), base)
    if dev and not dev.isdigit():
        raise ValueError(f"provider {name!r}: the device after ':' must be a number (e.g. cuda:0)")
    return full, int(dev) if dev else None


def choose(requested: str | list[str] | tuple[str, ...] | None) -> ProviderChoice:
    """Resolves the caller's providers against what this onnxruntime offers.

    Named providers must all be available (else ``ProviderUnavailable``); the CPU provider is
    appended after GPU ones so that nodes a GPU provider does not take still run. ``None`` takes
    the best available.
    """
    avail = ort.get_available_providers()
    if not requested:
        return ProviderChoice(tuple(p for p in PREFERRED if p in avail) or (CPU,))
    # "cuda,cpu" from a command line is the list ["cuda", "cpu"]
    names = [n for n in requested.split(",") if n.strip()] if isinstance(requested, str) else list(requested)
    chosen: list[str] = []
    device = None
    for n in names:
        full, dev = _parse(n)
        if full not in avail:
            raise ProviderUnavailable(missing_provider_message(full))
        if dev is not None:
            if device is not None and dev != device:
                raise ValueError(f"providers name two devices ({device} and {dev}): one pipeline runs on one GPU")
            device = dev
        if full not in chosen:
            chosen.append(full)
    # TensorRT's provider hands what TensorRT cannot build to the CUDA provider, then to the CPU.
    if TRT in chosen and CUDA in avail and CUDA not in chosen:
        chosen.insert(chosen.index(TRT) + 1, CUDA)
    if CPU not in chosen:
        chosen.append(CPU)
    return ProviderChoice(tuple(chosen), device or 0, tuple(names))


def preload_gpu_libraries(choice: ProviderChoice) -> None:
    """Loads CUDA/cuDNN (from the nvidia-* wheels) and TensorRT's libraries into the process before
    a session needs them, so pip-installed libraries are found without LD_LIBRARY_PATH."""
    if not choice.gpu:
        return
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception:  # best effort: system-wide CUDA installs need nothing preloaded
            pass
    if TRT in choice.providers:
        try:
            import tensorrt  # noqa: F401  (its import loads libnvinfer, which the provider then finds)
        except Exception:
            pass


# ---- per-component provider options -------------------------------------------------------------

def profile_shapes(info: ComponentInfo) -> dict[str, tuple[str, str, str]] | None:
    """The component's (min, opt, max) input shapes from the manifest's profile symbols, formatted as
    the TensorRT provider's ``trt_profile_*_shapes`` take them (``name:1x3x32x32``). ``None`` when
    the manifest's profile does not cover every symbolic dim (the provider then sizes profiles itself)."""
    prof = {k: tuple(int(x) for x in v) for k, v in info.profile.items()}
    if "total" not in prof and "past" in prof and "seq" in prof:
        prof["total"] = tuple(p + s for p, s in zip(prof["past"], prof["seq"]))
    out = {}
    for t in info.inputs:
        dims: list[tuple[int, int, int]] = []
        for d in t.shape:
            if isinstance(d, int):
                dims.append((d, d, d))
            elif d in prof:
                dims.append(prof[d])
            else:
                return None
        out[t.name] = tuple("x".join(str(dim[i]) for dim in dims) for i in range(3))
    return out


def trt_cache_dir(bundle: Bundle) -> Path:
    """``<bundle>/ort-trt-cache``, or a per-bundle folder under ~/.cache when the bundle is read-only
    (a bundle installed system-wide on a device)."""
    d = bundle.root.resolve() / TRT_CACHE_DIR
    try:
        d.mkdir(exist_ok=True)
        if os.access(d, os.W_OK):
            return d
    except OSError:
        pass
    tag = hashlib.sha256(str(bundle.root.resolve()).encode()).hexdigest()[:16]
    d = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "emma-deploy" / "ort-trt" / tag
    d.mkdir(parents=True, exist_ok=True)
    return d


def trt_options(bundle: Bundle, component: str, device_id: int, explicit_profiles: bool = True) -> dict[str, str]:
    info = bundle.manifest.components[component]
    precision = info.precision or bundle.manifest.precision
    cache = str(trt_cache_dir(bundle))
    opts = {
        "device_id": str(device_id),
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": cache,
        # The graph's sha256 in the name: a bundle re-exported into this folder never meets the
        # engines (weights included) compiled from its previous graphs.
        "trt_engine_cache_prefix": f"{component}_{info.sha256[:16]}",
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": cache,
        # An fp32 bundle stays fp32 (its parity with the reference is what was verified); every
        # other precision keeps its unquantized layers in half precision (the plan's policy).
        "trt_fp16_enable": "False" if precision == "fp32" else "True",
    }
    if precision == "bf16":
        opts["trt_bf16_enable"] = "True"
    if precision in ("int8", "fp8"):
        # Q/DQ graphs carry their scales: the flag lets TensorRT honour them, no calibration table.
        opts["trt_int8_enable"] = "True"
    shapes = profile_shapes(info) if explicit_profiles else None
    if shapes:
        for i, key in enumerate(("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")):
            opts[key] = ",".join(f"{name}:{s[i]}" for name, s in shapes.items())
    return opts


def session_providers(choice: ProviderChoice, bundle: Bundle, component: str, explicit_profiles: bool = True) -> list:
    """The ``providers`` argument of ``InferenceSession``: names with their options."""
    out = []
    for p in choice.providers:
        if p == TRT:
            out.append((TRT, trt_options(bundle, component, choice.device_id, explicit_profiles)))
        elif p == CUDA:
            out.append((CUDA, {"device_id": str(choice.device_id)}))
        else:
            out.append(p)
    return out


#: What the TensorRT provider says when it takes a graph only in part: the inner subgraphs' dynamic
#: inputs have no profile in the manifest (it names graph inputs only).
PARTIAL_GRAPH = "dynamic shape inputs"


def check_loaded(session: ort.InferenceSession, choice: ProviderChoice, component: str) -> None:
    """ONNX Runtime falls back to the next provider when a GPU provider's libraries fail to load;
    a provider the caller named must really be in use."""
    active = set(session.get_providers())
    for name in choice.requested:
        full, _ = _parse(name)
        if full in active:
            continue
        if full == TRT:
            raise ProviderUnavailable(f"{component}: {TRT} did not load (TensorRT's libraries not found): {TRT_INSTALL}")
        if full == CUDA:
            raise ProviderUnavailable(f"{component}: {CUDA} did not load (CUDA 12 / cuDNN 9 libraries not found): "
                                      f"pip install 'onnxruntime-gpu[cuda,cudnn]'")
        raise ProviderUnavailable(f"{component}: {full} did not load")
