"""Memory plan: does a model at a precision and context fit a target's memory variants?

Everything is arithmetic on parameter counts (meta device: nothing is allocated) and config
widths; nothing is measured. Sizes are in GiB (2**30 bytes).

**Weights** are counted per runtime graph, because each graph (ONNX session or TensorRT engine)
holds its own copy: the token embedding is held twice (the ``embed_tokens`` Gather and the tied
``lm_head``), the shallow layers' shared Q/K projections twice (``backbone_und`` and
``backbone_gen``), and both vision experts are loaded. The bytes of each graph are what the
precision policy stores (``weight_bytes.py``, which matches the policy's own node patterns against
every parameter): quantized GEMM weights, their scales, and everything else at the component's high
precision, which is **fp32 on the cpu target** and fp16 on GPU targets (``quantize/policy.py``):

==========  ============================================  ==============================================
precision   quantized GEMM weights (+ scales)              everything else (cpu target / GPU targets)
==========  ============================================  ==============================================
fp32        none                                           4 / 4
fp16, bf16  none                                           2 / 2 (norms, router, timestep MLP: 4)
int8, fp8   1 B, + per output channel a scale (4 / 2 B)    4 / 2
            and a zero point (1 B); the LM head too
int4w       0.5 B, + one scale (4 / 2 B) per block of      4 / 2 (norms 4 on GPU targets)
            ``block_size`` weights along K; backbones only
==========  ============================================  ==============================================

What the policy keeps high is counted high: ``gen_head`` is fp32 at every precision, the token
embedding (a Gather) and, at int4w, the LM head stay high, fp8 keeps ``gen_adapter`` high, int8
keeps the SwiGLU down projections, the autoencoders' attention and full-resolution stages and (small
widths) the trunk's attention projections high, int4w at small widths keeps the attention
projections high (INT4 goes to the MLPs); Model Optimizer's own shape rules (``modelopt_skips``:
K or N under 16, small-channel convolutions, FP8 filters over 32 taps) are applied as it applies
them. The fused (gqa) Und backbone of ONNX Runtime targets also holds RoPE tables for every
position of the cache (2 x max_context x head_dim/2). ``weights_detail`` keeps the split per graph.

**KV cache** = ``cfg.kv_bytes_per_token(kv_bytes)`` x context x rows. ``kv_bytes`` is the cache's
dtype (``--kv-cache``, ``build --kv-cache``): 1 for int8 and fp8 (per-layer scales), 2 for fp16, 4
for fp32; ``auto`` is the precision's default, 4 for fp32, 1 for fp8 and 2 otherwise. ``rows`` is
what the busiest task (editing, three guidance prefixes) keeps: 3 prefix caches, plus, with
``cfg_mode="batch"``, the stacked batch copy of them the runtime denoises with (3 more rows).

**Total** = weights + the peak over the phases of (the phase's activations + the KV rows alive
during it). The phases run one after another, and the largest activations (a long prefill) and the
largest cache (the denoising loop's stacked copy) do not meet: a prefill runs while the guidance
prefixes are being filled (``guidance_rows`` caches at most), the denoising steps while they and
their stacked copy live, the LM head with one understanding cache, the vision tower before any
cache exists, the autoencoder (the decoder after denoising) with the prefixes still held.

**Activations** are the peak of the phases, which run one after another (TensorRT and ONNX Runtime
reuse activation memory within a graph); ``a`` = 4 bytes for fp32, else 2 (fp16 activations):

- prefill of the prefix, ``S = T = context - L`` (``L`` = image tokens at ``image`` px), batch 1:
  ``S*(4H + 3F + (nq + 2nkv)*hd)*a`` live in one layer, plus one layer's attention scores
  ``nq*S*T*a`` (counted unfused: an explicit boolean mask may keep TensorRT off its fused kernels);
- a denoising step: the same with ``S = L``, ``T = context`` and batch = the guidance rows (3 batched,
  1 sequential);
- the LM head on the last position: ``vocab*4``;
- the vision trunk at ``image`` px, ``N = (image/patch)^2`` patches: ``N*(4D + F_v)*a + heads*N^2*a``;
- the autoencoder: stage i (width ``w_i``) at ``image/2^i`` px holds about three feature maps,
  ``max_i 3*w_i*(image/2^i)^2*a`` (encoder and decoder alike).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import lru_cache

from .config import EMMAConfig
from .targets import Target, check_precision, normalize_precision

GIB = 2**30
KV_BYTES = {"fp32": 4, "fp8": 1}  # ``--kv-cache auto``: the precision's default, else 2
#: bytes per cached value of each ``--kv-cache`` choice (quantize/kv_cache.py builds them)
KV_CACHE_BYTES = {"fp32": 4, "fp16": 2, "int8": 1, "fp8": 1}
KV_CACHE_CHOICES = ("auto", *KV_CACHE_BYTES)
GUIDANCE_ROWS = 3  # editing: text+image, image only, none


@dataclass(frozen=True)
class ParamSplit:
    """Parameters a runtime graph holds: Linear/Conv weights outside and inside the LLM layers, the rest."""

    matmul: int = 0
    llm_matmul: int = 0
    other: int = 0

    @property
    def total(self) -> int:
        return self.matmul + self.llm_matmul + self.other


@lru_cache(maxsize=8)
def _graph_params_cached(cfg_json: str) -> tuple[tuple[str, ParamSplit], ...]:
    import torch
    from torch import nn

    from .components import all_components
    from .info import model_info
    from .model.emma import EMMA

    cfg = EMMAConfig.from_json(cfg_json)
    with torch.device("meta"):
        m = EMMA(cfg)
    matmul_keys = {f"{n}.weight" for n, mod in m.named_modules() if isinstance(mod, (nn.Linear, nn.Conv2d))}
    params = dict(m.named_parameters())
    out = []
    for comp in all_components(cfg):
        split = {"matmul": 0, "llm_matmul": 0, "other": 0}
        for key, p in params.items():
            if not comp.uses(key):
                continue
            if key in matmul_keys:
                split["llm_matmul" if key.startswith("llm.layers.") else "matmul"] += p.numel()
            else:
                split["other"] += p.numel()
        out.append((comp.name, ParamSplit(**split)))
    # Cross-check with `emma-export info`: the graphs hold every parameter, the embedding and the
    # shared Q/K projections twice.
    mi = model_info(cfg)
    shared_qk = sum(p.numel() for k, p in params.items()
                    if k.startswith("llm.layers.") and ".shared." in k)
    held = sum(s.total for _, s in out)
    expect = mi.total + mi.parameters["embed_tokens"] + shared_qk
    assert held == expect, f"graph parameter split {held} != model_info total {mi.total} + duplicates {expect - mi.total}"
    return tuple(out)


def graph_params(cfg: EMMAConfig, tasks: tuple[str, ...] = ()) -> dict[str, ParamSplit]:
    """Parameters per runtime graph (``embed_tokens`` and ``lm_head`` both hold the embedding);
    with ``tasks``, only the graphs those tasks' pipelines run (a task-subset bundle)."""
    from emma_runtime import names

    keep = set(names.required(cfg.vision.num_experts, tuple(tasks) or None, cfg.reference_branch))
    return {k: v for k, v in _graph_params_cached(cfg.to_json()) if k in keep}


#: precisions whose bundles store the tied embedding once (export/tied_embedding.py): the LM head's
#: weight is the embedding's bytes. At int8/fp8 the LM head is quantized apart; bf16 is not matched.
TIED_ONCE = ("fp32", "fp16", "int4w")


def graph_weights(cfg: EMMAConfig, precision: str, target_is_gpu: bool, attention: str | None = None,
                  tasks: tuple[str, ...] = ()):
    """Predicted stored bytes per runtime graph (``weight_bytes.WeightBytes``), as the precision policy
    stores them for a cpu (False) or GPU (True) target; ``attention``: the Und backbone's flavour
    (default: the one the build picks for the target). With ``tasks``, only their graphs."""
    from emma_runtime import names

    from .weight_bytes import predict

    if attention is None:
        from .components import gqa_possible

        attention = names.ATTENTION_GQA if not target_is_gpu and gqa_possible(cfg) else names.ATTENTION_STANDARD
    keep = set(names.required(cfg.vision.num_experts, tuple(tasks) or None, cfg.reference_branch))
    return {k: v for k, v in predict(cfg, precision, target_is_gpu, attention).items() if k in keep}


def shared_embedding_bytes(weights: dict[str, int], precision: str, cfg: EMMAConfig | None = None, gpu: bool = False) -> int:
    """Bytes a bundle does not store twice: the embedding table (all of ``embed_tokens``' weights),
    when both graphs hold it in the same bytes (at an 8-bit precision: when the policy keeps the LM
    head at the embedding's precision, emma-4b's)."""
    if "lm_head" not in weights or "embed_tokens" not in weights:
        return 0
    if precision not in TIED_ONCE:
        from .quantize.policy import plan as policy_plan

        if cfg is None or policy_plan("lm_head", precision, gpu, cfg).precision != policy_plan("embed_tokens", precision, gpu, cfg).precision:
            return 0
    return weights["embed_tokens"]


# ---- KV cache and activations -------------------------------------------------------------------

def kv_cache_kind(precision: str, kv_cache: str = "auto") -> str:
    """The cache dtype a plan assumes: ``kv_cache``, or with ``auto`` the precision's default."""
    if kv_cache not in KV_CACHE_CHOICES:
        raise ValueError(f"unknown --kv-cache {kv_cache!r}; choose one of {', '.join(KV_CACHE_CHOICES)}")
    if kv_cache != "auto":
        return kv_cache
    return {4: "fp32", 1: "fp8"}.get(KV_BYTES.get(precision, 2), "fp16")


def kv_bytes_per_el(precision: str, kv_cache: str = "auto") -> int:
    return KV_CACHE_BYTES[kv_cache_kind(precision, kv_cache)]


def check_kv_cache(target: Target, kv_cache: str) -> None:
    """An FP8 cache is FP8 Q/DQ in the graphs: TensorRT runs it on compute capability 8.9 or newer."""
    from .precision import MIN_COMPUTE_CAPABILITY
    from .targets import TargetError

    need = MIN_COMPUTE_CAPABILITY["fp8"]
    if kv_cache == "fp8" and target.cc is not None and target.cc < need:
        raise TargetError(f"--kv-cache fp8 needs compute capability {need[0]}.{need[1]} or newer; "
                          f"{target.name} is {target.compute_capability}: use --kv-cache int8")


def guidance_rows(tasks: tuple[str, ...] = ()) -> int:
    """Prefix caches the busiest of ``tasks`` keeps: editing 3 (text+image, image, none), generation
    2 (prompt, empty), understanding 1 (no guidance)."""
    if not tasks or "edit" in tasks:
        return GUIDANCE_ROWS
    return 2 if "generate" in tasks else 1


def kv_rows(cfg_mode: str, tasks: tuple[str, ...] = ()) -> int:
    rows = guidance_rows(tasks)
    return 2 * rows if cfg_mode == "batch" and rows > 1 else rows


def kv_row_bytes(cfg: EMMAConfig, precision: str, context: int, kv_cache: str = "auto") -> int:
    """One cache row (one sequence) at ``context`` tokens."""
    return cfg.kv_bytes_per_token(kv_bytes_per_el(precision, kv_cache)) * context


def kv_cache_bytes(cfg: EMMAConfig, precision: str, context: int, cfg_mode: str = "batch", tasks: tuple[str, ...] = (),
                   kv_cache: str = "auto") -> int:
    return kv_row_bytes(cfg, precision, context, kv_cache) * kv_rows(cfg_mode, tasks)


def phase_kv_rows(cfg_mode: str, tasks: tuple[str, ...] = ()) -> dict[str, int]:
    """KV cache rows alive during each phase (module docstring): the prefixes while they prefill and
    while the decoder runs, those and their stacked copy while denoising, one understanding cache at
    the LM head, none yet at the vision tower."""
    g = guidance_rows(tasks)
    return {"prefill": g, "denoise_step": kv_rows(cfg_mode, tasks), "lm_head": 1, "vision": 0, "autoencoder": g}


def activation_bytes(cfg: EMMAConfig, precision: str, context: int, image: int, cfg_mode: str = "batch",
                     tasks: tuple[str, ...] = ()) -> dict[str, int]:
    """Peak activation bytes per phase (formulas in the module docstring); with ``tasks``, only the
    phases those tasks run."""
    a = 4 if precision == "fp32" else 2
    l, v, ae = cfg.llm, cfg.vision, cfg.ae
    H, F, nq, nk, hd = l.hidden_size, l.intermediate_size, l.num_attention_heads, l.num_key_value_heads, l.head_dim
    L = cfg.num_visual_tokens(image, image)

    def backbone(batch: int, S: int, T: int) -> int:
        return batch * S * (4 * H + 3 * F + (nq + 2 * nk) * hd) * a + batch * nq * S * T * a

    prefix = max(context - L, 1)
    rows = guidance_rows(tasks) if cfg_mode == "batch" else 1
    N = (image // v.patch_size) ** 2
    widths = ae.encoder_block_out_channels
    phases = {
        "prefill": backbone(1, prefix, prefix),
        "denoise_step": backbone(rows, L, context),
        "lm_head": l.vocab_size * 4,
        "vision": N * (4 * v.hidden_size + v.intermediate_size) * a + v.num_attention_heads * N * N * a,
        "autoencoder": max(3 * w * (image // 2**i) ** 2 * a for i, w in enumerate(widths)),
    }
    if tasks:
        images_out = "generate" in tasks or "edit" in tasks
        images_in = "understand" in tasks or "edit" in tasks
        drop = ({"denoise_step"} if not images_out else set()) | ({"vision"} if not images_in else set()) \
            | ({"lm_head"} if "understand" not in tasks else set())
        phases = {k: v for k, v in phases.items() if k not in drop}
    return phases


# ---- the plan -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class VariantFit:
    memory_gb: float
    usable_gb: float  # memory_gb - the target's reserved_gb
    fits: bool
    headroom_gb: float
    advice: str  # what to change when it does not fit ("" when it does)


@dataclass(frozen=True)
class MemoryPlan:
    config: str
    precision: str
    target: str
    context: int
    image: int
    cfg_mode: str
    weights: dict[str, int]  # bytes per runtime graph
    parameters: dict[str, int]  # per runtime graph
    kv_cache: int
    activations: dict[str, int]  # per phase
    activation_peak: int
    total: int
    variants: list[VariantFit] = field(default_factory=list)
    policy: str = ""
    tasks: tuple[str, ...] = ()
    # weight bytes a bundle stores once though two graphs hold them (the tied embedding)
    stored_once: int = 0
    # per runtime graph, its weight bytes by how they are stored (weight_bytes.WeightBytes)
    weights_detail: dict[str, dict[str, int]] = field(default_factory=dict)
    # the KV cache dtype assumed (--kv-cache, or the precision's default): fp32, fp16, int8, fp8
    kv_cache_dtype: str = "fp16"
    # per phase: its activations plus the KV rows alive during it; the total is weights + the largest
    phases: dict[str, int] = field(default_factory=dict)
    peak_phase: str = ""

    @property
    def weights_total(self) -> int:
        return sum(self.weights.values())

    @property
    def bundle_weights(self) -> int:
        """Weight bytes of the bundle on disk (each graph's, the tied embedding once)."""
        return self.weights_total - self.stored_once

    def to_dict(self) -> dict:
        d = asdict(self)
        d["weights_total"] = self.weights_total
        d["bundle_weights"] = self.bundle_weights
        return d


def _totals(cfg: EMMAConfig, precision: str, context: int, image: int, cfg_mode: str, tasks: tuple[str, ...] = (),
            gpu: bool = True, attention: str | None = None, kv_cache: str = "auto"):
    params = graph_params(cfg, tasks)
    detail = graph_weights(cfg, precision, gpu, attention, tasks)
    weights = {k: d.total for k, d in detail.items()}
    kv = kv_cache_bytes(cfg, precision, context, cfg_mode, tasks, kv_cache)
    acts = activation_bytes(cfg, precision, context, image, cfg_mode, tasks)
    peak = max(acts.values())
    row = kv_row_bytes(cfg, precision, context, kv_cache)
    rows = phase_kv_rows(cfg_mode, tasks)
    phases = {k: a + rows[k] * row for k, a in acts.items()}
    return params, detail, weights, kv, acts, peak, sum(weights.values()) + max(phases.values()), phases


def _policy_line(precision: str, gpu: bool, kv_cache: str = "auto") -> str:
    from .quantize.policy import high_precision_for
    from .weight_bytes import QUANTIZED_BYTES

    hp = high_precision_for(gpu) if precision in QUANTIZED_BYTES else precision
    where = "GPU targets" if gpu else "the cpu target"
    if precision in QUANTIZED_BYTES:
        scales = ("one scale per block along K" if precision == "int4w"
                  else "a scale and a zero point per output channel")
        head = (f"{precision} on {where}: quantized GEMM weights {QUANTIZED_BYTES[precision]:g} B ({scales}), "
                f"everything else and the GEMMs the policy keeps high {hp}")
    else:
        head = f"{precision}: every weight {precision}" + ("" if precision == "fp32" else ", norms and the policy's kept nodes fp32")
    kind = kv_cache_kind(precision, kv_cache)
    how = "the precision's default" if kv_cache == "auto" else "--kv-cache"
    return f"{head}; gen_head fp32; KV cache {kind}, {KV_CACHE_BYTES[kind]} B per value ({how})"


def min_context(cfg: EMMAConfig, image: int) -> int:
    """The shortest context that holds one image and one more token."""
    return cfg.num_visual_tokens(image, image) + 1


def plan_memory(cfg: EMMAConfig, precision: str, target: Target, context: int | None = None,
                image: int | None = None, cfg_mode: str = "batch", tasks: tuple[str, ...] = (),
                attention: str | None = None, kv_cache: str = "auto") -> MemoryPlan:
    """Weights, KV cache, activations and the fit on each of ``target``'s memory variants.
    ``kv_cache``: the cache's dtype (``auto``: the precision's default). Raises TargetError when the
    target cannot run ``precision`` (or an FP8 cache); ValueError for a context too short for one image."""
    precision = normalize_precision(precision)
    check_precision(target, precision)
    kind = kv_cache_kind(precision, kv_cache)
    check_kv_cache(target, kind)
    if cfg_mode not in ("batch", "sequential"):
        raise ValueError("cfg_mode must be 'batch' or 'sequential'")
    context = context or cfg.max_context
    image = image or cfg.image_size
    cfg.grid(image, image)  # a multiple of the cell
    if context < min_context(cfg, image):
        raise ValueError(f"--context {context} is shorter than one {image}px image ({cfg.num_visual_tokens(image, image)} tokens) plus a token")
    tasks = tuple(dict.fromkeys(tasks))
    gpu = bool(target.is_gpu)
    params, detail, weights, kv, acts, peak, total, phases = _totals(cfg, precision, context, image, cfg_mode, tasks, gpu, attention, kind)
    variants = []
    for mem in target.memory_gb:
        usable = mem - target.reserved_gb
        fits = total <= usable * GIB
        advice = "" if fits else _advice(cfg, precision, target, context, image, cfg_mode, usable, tasks, attention, kind)
        variants.append(VariantFit(mem, usable, fits, round(usable - total / GIB, 3), advice))
    return MemoryPlan(
        config=cfg.name, precision=precision, target=target.name, context=context, image=image, cfg_mode=cfg_mode,
        weights=weights, parameters={k: s.total for k, s in params.items()}, kv_cache=kv, activations=acts,
        activation_peak=peak, total=total, variants=variants, policy=_policy_line(precision, gpu, kv_cache),
        tasks=tasks, stored_once=shared_embedding_bytes(weights, precision, cfg, gpu),
        weights_detail={k: {**asdict(d), "total": d.total} for k, d in detail.items()}, kv_cache_dtype=kind,
        phases=phases, peak_phase=max(phases, key=phases.get),
    )


def _longest_context(cfg, precision, image, cfg_mode, budget, below: int, tasks=(), gpu=True, attention=None, kv_cache="auto") -> int | None:
    """The longest context below ``below`` (a multiple of 256 where possible) that fits ``budget``."""
    lo_ctx = min_context(cfg, image)
    fits = lambda c: _totals(cfg, precision, c, image, cfg_mode, tasks, gpu, attention, kv_cache)[-2] <= budget
    if below <= lo_ctx or not fits(lo_ctx):
        return None
    lo, hi = lo_ctx, below - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return max(lo_ctx, (lo // 256) * 256)


def _advice(cfg, precision, target, context, image, cfg_mode, usable_gb, tasks=(), attention=None, kv_cache="auto") -> str:
    """What to change so the plan fits ``usable_gb``: an 8-bit KV cache, a lower precision the target
    runs (the widest that fits), a shorter context, sequential guidance, or a combination of
    precision and context."""
    budget = usable_gb * GIB
    gpu = bool(target.is_gpu)
    total = lambda p, c, m=cfg_mode, kv=kv_cache: _totals(cfg, p, c, image, m, tasks, gpu, attention, kv)[-2]
    mine = total(precision, context)
    options = []
    if KV_CACHE_BYTES[kv_cache_kind(precision, kv_cache)] > 1 and total(precision, context, kv="int8") <= budget:
        options.append(f"--kv-cache int8 ({total(precision, context, kv='int8') / GIB:.1f} GiB)")
    lower = sorted(((total(p, context), p) for p in target.precisions if p != precision), reverse=True)
    lower = [(t, p) for t, p in lower if t < mine]  # widest first
    for t, p in lower:
        if t <= budget:
            options.append(f"--precision {p} ({t / GIB:.1f} GiB)")
            break
    c = _longest_context(cfg, precision, image, cfg_mode, budget, context, tasks, gpu, attention, kv_cache)
    if c is not None:
        options.append(f"--context {c} ({total(precision, c) / GIB:.1f} GiB)")
    if cfg_mode == "batch" and total(precision, context, "sequential") <= budget:
        options.append(f"--cfg-mode sequential ({total(precision, context, 'sequential') / GIB:.1f} GiB)")
    if not options:
        for _, p in lower:
            c = _longest_context(cfg, p, image, cfg_mode, budget, context, tasks, gpu, attention, kv_cache)
            if c is not None:
                options.append(f"--precision {p} --context {c} ({total(p, c) / GIB:.1f} GiB)")
                break
    if not options:
        lo_ctx = min_context(cfg, image)
        floor = min(total(p, lo_ctx, "sequential") for p in [precision] + [p for _, p in lower])
        return (f"does not fit at any precision or context {target.name} runs "
                f"(at least {floor / GIB:.1f} GiB): choose a larger memory variant")
    return "use " + ", or ".join(options)
