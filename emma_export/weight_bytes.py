"""The bytes each component's graph stores, predicted from the parameter shapes and the precision
policy (``quantize/policy.py``): what ``plan`` counts as weights and what the build report compares
the bundle against.

Nothing is exported or allocated (the model is built on the meta device). Each parameter is given
the name of the graph node that reads it, as the exporter names nodes (``node_path``): the policy's
patterns (``Plan.exclude``, ``Plan.keep_fp32``) are matched against it exactly as the quantizer
matches them against the exported graph, so a GEMM the policy keeps high is counted high. What the
policy does not say but Model Optimizer does on its own (``modelopt_skips``) is mirrored too.

Storage per tensor (``hp``: the component's high precision, 4 bytes on the cpu target, 2 on GPU
targets; ``quantize/policy.py`` says why):

- fp32 component (``gen_head`` always, every component of an fp32 bundle): 4 bytes.
- fp16 conversion: 2 bytes; 4 for what the policy keeps fp32 (norms, the router, the timestep MLP,
  the decoder's conv_out, LayerNormalization ops). The overflow check may keep more nodes fp32 on
  real feeds; that is data, not shapes, and is not predicted.
- bf16: bfloat16 storage (2 bytes) for tensors of 256 elements and more, 4 for smaller ones and for
  what the policy keeps fp32.
- int8 / fp8 (Q/DQ): a quantized GEMM weight is 1 byte, plus per output channel one scale (``hp``
  bytes) and one zero point (1 byte); every other tensor ``hp``.
- int4w (weight-only, blocked): a quantized GEMM weight is half a byte, plus one scale (``hp`` bytes)
  per block of ``block_size`` weights along K; every other tensor ``hp`` (on GPU targets the norms
  stay fp32: the fp16 conversion after INT4 keeps them).
- Tables that are not parameters: the fused (gqa) Und backbone holds RoPE cos/sin tables for every
  position of the cache, 2 x max_context x head_dim/2 at the graph's float precision.

Scalars, shape constants and graph structure (node names, attributes) are not predicted: the build
report's comparison says how it treats them (``size_check.py``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

from emma_runtime import names

from .config import EMMAConfig

FP32, FP16 = 4, 2
#: bytes of one quantized GEMM weight
QUANTIZED_BYTES = {"int8": 1.0, "fp8": 1.0, "int4w": 0.5}
#: the bf16 conversion leaves tensors smaller than this in fp32 (fp16.convert_bf16_weights)
BF16_MIN_ELEMENTS = 256
#: Model Optimizer's own limits (modelopt.onnx.quantization.graph_utils): GEMMs with K or N below
#: _MIN_MATMUL_DIM and convolutions with fewer channels are left unquantized
MODELOPT_MIN_DIM = 16
MODELOPT_FP8_MAX_FILTER = 32


@dataclass(frozen=True)
class Gemm:
    """The GEMM a weight feeds: ``k`` inputs (features or channels), ``n`` outputs (one scale each at
    int8/fp8), the convolution kernel, and whether the convolution reads a graph input."""

    op: str  # MatMul (Linear layers, the LM head) or Conv
    k: int
    n: int
    kernel: tuple[int, ...] = ()
    groups: int = 1
    reads_input: bool = False


@dataclass(frozen=True)
class PlannedTensor:
    key: str  # state-dict key, or the name of a table that is not a parameter
    numel: int
    node: str  # the path of the graph node that reads it, "/llm/layers.0/mlp/und/down_proj/"
    op: str = ""  # that node's operator where it matters (LayerNormalization)
    gemm: Gemm | None = None


@dataclass(frozen=True)
class WeightBytes:
    """Predicted bytes of one component's tensors, by how they are stored."""

    quantized: int = 0  # low-bit GEMM weights
    scales: int = 0  # their scales and zero points
    high: int = 0  # at the component's precision (fp32/fp16/bf16) or the quantized graph's high precision
    kept_fp32: int = 0  # kept fp32 inside a 16-bit or quantized-on-GPU graph
    tables: int = 0  # constants that are not parameters (RoPE tables)

    @property
    def total(self) -> int:
        return self.quantized + self.scales + self.high + self.kept_fp32 + self.tables


# ---- what each graph holds ------------------------------------------------------------------------

def node_path(module_name: str, modules: dict) -> str:
    """The exporter's scope path of a module: one segment per module that runs (ModuleList and
    ModuleDict do not; a Sequential does), each named relative to the nearest ancestor that is not a
    container: ``ae.decoder.up_blocks.5.0.conv1`` -> ``/ae/decoder/up_blocks.5/up_blocks.5.0/conv1/``
    (the graph says ``/decoder/up_blocks.5/up_blocks.5.0/conv1/Conv``: the model's own top-level
    modules whose methods the component calls are not scopes; the policy's patterns never name them)."""
    from torch import nn

    parts = module_name.split(".")
    segs, anchor = [], 0
    for i in range(1, len(parts) + 1):
        mod = modules[".".join(parts[:i])]
        if isinstance(mod, (nn.ModuleList, nn.ModuleDict)):
            continue
        segs.append(".".join(parts[anchor:i]))
        if not isinstance(mod, nn.Sequential):
            anchor = i
    return "/" + "/".join(segs) + "/"


@lru_cache(maxsize=8)
def _graph_tensors_cached(cfg_json: str, attention: str) -> tuple[tuple[str, tuple[PlannedTensor, ...]], ...]:
    import torch
    from torch import nn

    from .components import all_components
    from .model.emma import EMMA

    cfg = EMMAConfig.from_json(cfg_json)
    with torch.device("meta"):
        m = EMMA(cfg)
    modules = dict(m.named_modules())
    owner = {f"{mn}.{pn}": (mn, mod) for mn, mod in modules.items() for pn, _ in mod.named_parameters(recurse=False)}
    first_conv: dict[str, str] = {}  # component -> the first convolution it runs (reads the graph input)
    out = []
    for comp in all_components(cfg, attention):
        tensors = []
        for key, p in m.named_parameters():
            if not comp.uses(key):
                continue
            mn, mod = owner[key]
            gemm, node, op = None, node_path(mn, modules), ""
            if comp.name == names.LM_HEAD and key.startswith("llm.embed_tokens."):
                # the tied embedding is the LM head's MatMul weight (hidden -> vocab)
                gemm, node = Gemm("MatMul", p.shape[1], p.shape[0]), "/lm_head/"
            elif isinstance(mod, nn.Linear) and key.endswith(".weight"):
                gemm = Gemm("MatMul", mod.in_features, mod.out_features)
            elif isinstance(mod, nn.Conv2d) and key.endswith(".weight"):
                first = first_conv.setdefault(comp.name, key) == key
                gemm = Gemm("Conv", mod.in_channels, mod.out_channels, tuple(mod.kernel_size), mod.groups, reads_input=first)
            elif isinstance(mod, nn.LayerNorm):
                op = "LayerNormalization"
            tensors.append(PlannedTensor(key, p.numel(), node, op, gemm))
        if getattr(comp, "attention", None) == names.ATTENTION_GQA:
            l = cfg.llm
            for t in ("cos", "sin"):  # GQABackboneModule: one table pair for every position of the cache
                tensors.append(PlannedTensor(f"rope_{t}_cache", cfg.max_context * (l.head_dim // 2), "/GroupQueryAttention/"))
        out.append((comp.name, tuple(tensors)))
    return tuple(out)


def graph_tensors(cfg: EMMAConfig, attention: str = names.ATTENTION_STANDARD) -> dict[str, tuple[PlannedTensor, ...]]:
    """Per component, the tensors its graph holds (parameters, the tied embedding in both graphs
    that read it, the shared Q/K in both backbones, tables)."""
    return dict(_graph_tensors_cached(cfg.to_json(), attention))


# ---- what the policy stores ---------------------------------------------------------------------------

def _matches(path: str, patterns) -> bool:
    return any(re.search(p, path) for p in patterns)


def modelopt_skips(g: Gemm, mode: str) -> bool:
    """Whether Model Optimizer leaves this GEMM unquantized by its own shape rules (int8/fp8; its
    ``find_nodes_from_matmul_to_exclude`` and ``find_nodes_from_convs_to_exclude``): K or N under 16;
    a convolution with fewer than 16 input or output channels (INT8 keeps some of those: square
    kernel, a multiple of 8 channels, and either the first layer or one side >= 16); FP8 also skips
    filters over 32 taps and convolutions with 16 channels or fewer. Its other rule, GEMVs (an M of 1
    in the first calibration feed), depends on the feeds; calibrate.select hands the largest first."""
    if g.op != "Conv":
        return g.k < MODELOPT_MIN_DIM or g.n < MODELOPT_MIN_DIM
    oc, ic = g.n, g.k // max(g.groups, 1)
    if oc < MODELOPT_MIN_DIM or ic < MODELOPT_MIN_DIM:
        if mode == "int8":
            square = len(set(g.kernel)) <= 1
            if g.groups == 1 and (oc % 8 == 0 or ic % 8 == 0) and (g.reads_input or oc >= 16 or ic >= 16) and square:
                return False
            if g.groups > 1 and oc % 8 == 0 and all(k >= 3 for k in g.kernel):
                return False
        return True
    if mode == "fp8":
        return math.prod(g.kernel) > MODELOPT_FP8_MAX_FILTER or oc <= MODELOPT_MIN_DIM or ic <= MODELOPT_MIN_DIM
    return False


def component_bytes(tensors, p) -> WeightBytes:
    """Predicted bytes of a component's ``tensors`` stored as the policy's plan ``p`` says."""
    if p.method == "none":
        return WeightBytes(high=FP32 * sum(t.numel for t in tensors))
    hp = FP32 if p.high_precision == "fp32" else FP16
    acc = {"quantized": 0.0, "scales": 0.0, "high": 0, "kept_fp32": 0, "tables": 0}

    def kept(t: PlannedTensor) -> bool:
        return _matches(t.node, p.keep_fp32) or (t.op and t.op in p.keep_fp32_ops)

    for t in tensors:
        if t.gemm is None and t.node == "/GroupQueryAttention/":
            acc["tables"] += (FP16 if p.method == "fp16" else hp) * t.numel
            continue
        if p.method in ("fp16", "bf16-autocast"):
            acc["kept_fp32" if kept(t) else "high"] += (FP32 if kept(t) else FP16) * t.numel
            continue
        if p.method == "bf16-weights":
            small = t.numel < BF16_MIN_ELEMENTS or _matches(t.node, p.keep_fp32)
            acc["kept_fp32" if small else "high"] += (FP32 if small else FP16) * t.numel
            continue
        mode = {"modelopt-int8": "int8", "modelopt-fp8": "fp8", "modelopt-int4": "int4w"}[p.method]
        g = t.gemm
        quantize = g is not None and not _matches(t.node, p.exclude)
        if quantize and mode == "int4w":
            quantize = g.op == "MatMul"  # INT4 weight-only: MatMul/Gemm weights only
        elif quantize:
            quantize = not modelopt_skips(g, mode)
        if quantize:
            acc["quantized"] += QUANTIZED_BYTES[mode] * t.numel
            if mode == "int4w":
                acc["scales"] += hp * math.ceil(g.k / (p.block_size or 128)) * g.n
            else:
                acc["scales"] += (hp + 1) * g.n  # per output channel: scale and zero point
        elif mode == "int4w" and hp == FP16 and _matches(t.node, (r"norm",)):
            acc["kept_fp32"] += FP32 * t.numel  # apply_plan's fp16 conversion after INT4 keeps norms fp32
        else:
            acc["high"] += hp * t.numel
    return WeightBytes(**{k: math.ceil(v) for k, v in acc.items()})


def predict(cfg: EMMAConfig, precision: str, target_is_gpu: bool, attention: str = names.ATTENTION_STANDARD,
            only: tuple[str, ...] = ()) -> dict[str, WeightBytes]:
    """Predicted bytes per component of a ``precision`` bundle for a cpu (False) or GPU (True)
    target; ``only``: the components quantized (the others at the target's high precision), as
    ``quantize_bundle`` does."""
    return dict(_predict_cached(cfg.to_json(), precision, bool(target_is_gpu), attention, tuple(sorted(only))))


@lru_cache(maxsize=64)
def _predict_cached(cfg_json: str, precision: str, gpu: bool, attention: str, only: tuple[str, ...]):
    from .quantize.policy import plan as policy_plan

    cfg = EMMAConfig.from_json(cfg_json)
    out = []
    for name, tensors in graph_tensors(cfg, attention).items():
        p = policy_plan(name, precision, gpu, cfg)
        if only and name not in only and precision != "fp32":
            p = policy_plan(name, "fp16" if gpu else "fp32", gpu, cfg)
        out.append((name, component_bytes(tensors, p)))
    return tuple(out)
