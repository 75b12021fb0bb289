"""What a precision is, in one place: its name, whether it is calibrated, the compute capability its
tensor cores need, and how close to the fp32 reference its graphs must be.

The quantizer (``quantize/policy.py``) decides what each component becomes at a precision; targets
(``targets.py``) check the hardware rule; ``verify`` reads the tolerances; ``verify_e2e`` the
end-to-end minimums; ``build`` reports what those two decide and decides nothing itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Precision:
    name: str
    # calibrated on real data, and verified on held-out real feeds (random feeds fall outside the
    # calibrated ranges and measure clipping, not the graph)
    quantized: bool
    # per-component parity against the PyTorch reference (rel L2), and overrides per component where a
    # component's error differs for a structural reason (see quantize/policy.py)
    tolerance: float
    component_tolerance: dict[str, float] = field(default_factory=dict)
    # the oldest compute capability whose tensor cores run it (GPU targets); None: any
    min_compute_capability: tuple[int, int] | None = None


# Tolerances: the worst rel L2 measured by `emma-export build` (issue #9; int8/fp8/int4w on held-out
# real feeds; cpu target unless noted), with margin: fp32 1.2e-6; fp16 1.1e-3 (und_trunk); bf16 6.4e-3
# (und_trunk, bf16 weights); int8 0.079 (ae_decoder); fp8 0.10, 0.11 on rtx-ada (und_trunk: E4M3 keeps 3
# mantissa bits, ~2.5% RMS per quantized tensor, compounding over the ViT's GEMMs; backbone
# 0.085-0.095); int4w 0.16 (backbone_und, weight-only, block 16). fp16 and bf16 keep their issue #3
# values (the torch-dtype exports of `export --dtype` share them).
#
# int4w backbone_und 0.5 (issue 23): small's int4w build measured 0.383-0.414 there (backbone_gen 0.084)
# and a correct INT4 of the same weights does no better. Model Optimizer's RTN (symmetric, amax/7 per
# block of 128 along K) applied in PyTorch to every Und GEMM of small's random weights, checked as verify
# checks (worst output over 24 held-out feeds): 0.426 on the hidden states, 0.460 worst (new_key_7); block
# 64 0.427, 32 0.387, 16 0.333. The Und branch compounds it: its inputs are random-init token embeddings
# (rms 0.0196, against the Gen branch's 0.724), so each layer's output is its own random branch and the
# error grows layer by layer (keys 0.13 after layer 0, 0.31 after layer 1, 0.46 after layer 7; the same
# RTN on the Gen branch 0.12 -> 0.18). 0.5 still fails broken INT4: each output row dequantized with its
# neighbour's scales measured 0.781, truncation instead of rounding 398.6. The other components keep 0.25.
_TABLE = (
    Precision("fp32", quantized=False, tolerance=1e-4),
    Precision("fp16", quantized=False, tolerance=1e-2),
    Precision("bf16", quantized=False, tolerance=4e-2, min_compute_capability=(8, 0)),
    Precision("int8", quantized=True, tolerance=1e-1),
    Precision("fp8", quantized=True, tolerance=1.5e-1, min_compute_capability=(8, 9)),
    Precision("int4w", quantized=True, tolerance=2.5e-1, component_tolerance={"backbone_und": 5e-1},
              min_compute_capability=(8, 0)),
)
BY_NAME: dict[str, Precision] = {p.name: p for p in _TABLE}

#: every precision the toolchain knows, widest first
PRECISIONS: tuple[str, ...] = tuple(BY_NAME)
QUANTIZED: tuple[str, ...] = tuple(p.name for p in _TABLE if p.quantized)
MIN_COMPUTE_CAPABILITY: dict[str, tuple[int, int]] = {p.name: p.min_compute_capability for p in _TABLE if p.min_compute_capability}
TOLERANCE: dict[str, float] = {p.name: p.tolerance for p in _TABLE}

#: other spellings of a precision (bundle manifests, the quantizer's modes)
ALIASES = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16", "int4": "int4w", "int4_awq": "int4w"}


def normalize(precision: str) -> str:
    return ALIASES.get(precision, precision)


def get(name: str) -> Precision:
    """The precision called ``name`` (an alias too), or ValueError naming the known ones."""
    p = BY_NAME.get(normalize(name))
    if p is None:
        raise ValueError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}")
    return p


def tolerance_for(component: str, precision: str) -> float:
    p = BY_NAME.get(normalize(precision))
    if p is None:
        return 1e-1
    return p.component_tolerance.get(component, p.tolerance)


# An 8-bit KV cache (``build --kv-cache int8|fp8``) adds its quantization error to a backbone's: the
# rel L2 a backbone may show on top of its precision's tolerance, per kind of cache. Measured on
# held-out real feeds (fp32 bundles, worst backbone): tiny int8 0.016, fp8 0.043; the trained shapes
# checkpoint int8 0.037, fp8 0.043. Scales 1/50 of the calibrated ones (a wrong calibration) fail it
# by far (tests/test_kv_cache_8bit.py).
KV_CACHE_TOLERANCE = {"int8": 0.08, "float8e4m3fn": 0.1, "fp8": 0.1, "float16": 1e-2, "fp16": 1e-2, "float32": 0.0, "fp32": 0.0}


def kv_cache_tolerance(dtype: str) -> float:
    """The extra rel L2 a backbone with a ``dtype`` KV cache (a manifest dtype or a --kv-cache name) may show."""
    return KV_CACHE_TOLERANCE.get(dtype, 0.0)
