"""The precision policy: for a bundle precision and a target, what each component becomes and what in
it stays at higher precision. This is the one place these decisions live; the build records
``Plan.describe()`` per component in ``Manifest.precision_policy`` and ``Plan.precision`` in each
component's ``precision``.

What stays higher, and why (measured on tiny; see calibration/README.md and the build report):
- Norms (LayerNorm, RMSNorm: Pow/ReduceMean/Sqrt) and Softmax are never quantized: only GEMMs and
  convolutions are (``op_types_to_quantize``). Quantizing Model Optimizer's default set (Add, Mul,
  Pow, Sigmoid too: residual adds and RMSNorm's x^2) tripled the backbone's INT8 error. In fp16
  graphs they are kept fp32, as is every node the overflow check finds above the fp16 range.
- The router (trunk): an argmax over two logits decides which expert runs; a flipped decision costs
  far more than its tiny GEMMs save. Kept at the graph's high precision (fp32 on cpu).
- The timestep MLP (gen_adapter): its embedding is added to every Gen token at every step; a few
  kFLOPs. Kept high.
- The Gen head: a hidden -> latent-channels projection whose output is integrated over every Euler
  step; too narrow for tensor cores (Model Optimizer skips N < 16 anyway). The component stays fp32.
- The AE decoder's first and last convolutions and its last (full-resolution) up block: kept high
  (INT8 decoder rel L2 0.077 -> 0.064 on tiny, held-out feeds; they are the layers nearest the
  pixels). FP8 is unchanged by it (0.075): Model Optimizer already leaves those convolutions out.
- INT8 attention GEMMs (Q.K^T, P.V) are not quantized (see ``plan``); FP8 ones are (FP8 fused
  attention on Ada/Hopper).
- INT8 backbone_gen keeps its SwiGLU down projections high: their input (silu(gate) * up) carries the
  outliers; on the trained shapes checkpoint the component measured rel L2 0.11 (> 0.1) with them
  quantized, 0.026 without. The Und branch and FP8 keep them quantized (within tolerance).
- INT8 autoencoder: its EfficientViT linear-attention blocks (MatMuls of two activations) and the
  full-resolution stage beside the pixels (encoder down_blocks.0; decoder up_blocks.1, next to the
  edges above) stay high. Measured on small (random weights) on verify's held-out images: encoder rel
  L2 0.161 -> 0.051, decoder 0.190 -> 0.088 (tolerance 0.1).
- INT8 trunk at small widths (vision hidden <= 256): the attention projections and the patch
  embedding stay high (small: rel L2 0.225 -> 0.079); real widths unmeasured, quantized.
- The trunk's position-embedding resampling (bicubic matrices, MatMul with constants) is not
  quantized: exact interpolation weights.
- The token embedding is a Gather: nothing to quantize; it stays at the high precision.
- The LM head is quantized with the backbone at INT8 and FP8 (the largest single GEMM of decoding),
  except past the slice threshold (emma-4b's 1.56 GB table): kept high there (``_large_head``);
  INT4 weight-only keeps it at the high precision (AWQ on the tied embedding hurts token agreement,
  and Model Optimizer excludes it by default).
- INT4 weight-only applies to the backbone (memory-bound decoding); the vision tower, adapters and
  autoencoder are compute-bound and stay at the high precision in an int4w bundle.

High precision (the dtype of everything that is not quantized): fp32 on the ``cpu`` target (ONNX
Runtime's CPU provider has few fp16 kernels: fp16 there means Casts around most nodes, and its FP8
path dequantizes to fp32 anyway); fp16 on GPU targets (TensorRT's strongly typed networks run what
the graph says: an fp32 remainder would run in fp32).

INT8 on the cpu target: weights quantized to 7 bits (``reduce_range``). ONNX Runtime fuses Q/DQ
into u8 x s8 integer GEMMs; on AVX2 without VNNI (this Zen 1 CPU) the pairwise int16 accumulation
saturates with full-range weights (und_trunk rel L2 0.19 vs 0.03 without the fusion); 7-bit weights
cannot saturate (0.046). Activation Q/DQ are rewritten from int8 to uint8 (zero point 128, the same
mapping): ONNX Runtime only fuses u8-activation DQ -> MatMul into its integer kernel on this CPU, and
without it 56 of 72 MatMuls ran in fp32 on weights dequantized every call (int8 0.57x the speed of
fp32; after it 1.5x faster). GPU targets keep full-range INT8 weights and signed activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from emma_runtime import names

from ..precision import PRECISIONS, QUANTIZED  # noqa: F401 - re-exported for the quantizer's callers

# node-name patterns (regular expressions, re.search) of the exported graphs
_NORMS = (r"norm",)
_ATTN_BMM = (r"/self_attn/MatMul(_\d+)?$",)
_ROUTER = (r"/trunk/router/",)
_POS_RESAMPLE = (r"/trunk/embeddings/MatMul",)
_TIMESTEP = (r"/gen_adapter/timestep/",)
_DECODER_EDGES = (r"/decoder/conv_in/", r"/decoder/conv_out/", r"/decoder/norm_out/", r"/decoder/up_blocks\.0/")
# the autoencoder's EfficientViT blocks (ReLU linear attention: activation x activation products)
_AE_ATTN = (r"/attn/",)
# Its product chain (ReLU, the ones row, both MatMuls, the division: everything of the block but its
# convolutions and norm): sums over every pixel, float32 in the model and in diffusers' DC-AE, fp16
# overflows. Measured: emma-4b's fp8 encoder, this chain in fp16, reached 65504 in its first MatMul and
# wrote NaN latents on every held-out image (ae_encoder and ae_decoder rel L2 inf).
_AE_ATTN_CHAIN = (r"/attn/(?!Conv)[A-Za-z]+(_\d+)?$",)
_AE_ATTN_PRODUCTS = (r"/attn/MatMul(_\d+)?$",)
_TRUNK_ATTN_PROJ = (r"/trunk/layers\.\d+/self_attn/",)
_PATCH_EMBED = (r"/trunk/embeddings/patch_embedding/",)
_DOWN_PROJ = (r"/down_proj/",)
_ATTN_PROJ = (r"/self_attn/",)
_GEMM_OPS = ["MatMul", "Gemm", "Conv"]


@dataclass(frozen=True)
class Plan:
    component: str
    precision: str  # recorded in the manifest for the component
    method: str  # none | fp16 | bf16-weights | bf16-autocast | modelopt-int8 | modelopt-fp8 | modelopt-int4
    high_precision: str  # fp32 | fp16: dtype of what is not quantized
    exclude: tuple[str, ...] = ()  # node patterns not quantized
    keep_fp32: tuple[str, ...] = ()  # node patterns kept fp32 in a half-precision graph
    keep_fp32_ops: tuple[str, ...] = ()
    calibration_method: str = ""
    reduce_range: bool = False
    block_size: int | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def calibrated(self) -> bool:
        return self.method.startswith("modelopt")

    def describe(self) -> str:
        parts = [f"{self.precision}"]
        if self.method == "none":
            parts.append("exported graph unchanged")
        elif self.method == "fp16":
            parts.append("fp16 weights and compute, float32 IO (onnxconverter-common)")
        elif self.method == "bf16-weights":
            parts.append("bf16 weight storage, Cast to fp32, fp32 compute (ORT CPU has no bf16 kernels)")
        elif self.method == "bf16-autocast":
            parts.append("bf16 compute (Model Optimizer autocast) for TensorRT; ORT CPU cannot run it")
        else:
            int4 = "INT4 round-to-nearest weight-only" if self.calibration_method.startswith("rtn") else "INT4 AWQ weight-only"
            kind = {"modelopt-int8": "INT8 Q/DQ", "modelopt-fp8": "FP8 E4M3 Q/DQ", "modelopt-int4": int4}[self.method]
            what = "GEMM weights" if self.method == "modelopt-int4" else "GEMMs/convs"
            parts.append(f"{kind} on {what} (Model Optimizer, {self.calibration_method} calibration on real feeds)")
            parts.append(f"rest {self.high_precision}")
            if self.block_size:
                parts.append(f"block {self.block_size}")
            if self.reduce_range:
                parts.append("7-bit weights (reduce_range: ORT x86 u8s8 saturation), uint8 activations (ORT integer kernels)")
        if self.exclude:
            parts.append("kept high: " + ", ".join(self.exclude))
        if self.keep_fp32 or self.keep_fp32_ops:
            parts.append("kept fp32: " + ", ".join(self.keep_fp32_ops + self.keep_fp32))
        parts.extend(self.notes)
        return "; ".join(parts)


def _large_head(cfg) -> bool:
    """Whether the LM head's fp32 table passes ``EMMA_SLICE_QUANTIZE_BYTES`` (1e9), past which Model
    Optimizer is not given a graph whole: the head has no layers to slice. (Not lowered with
    ``EMMA_STREAM_BYTES``, which the tests set to 0 to send tiny graphs down the streamed paths.)"""
    from ..export.external_data import bytes_from_env
    from .sliced import DEFAULT_THRESHOLD, ENV

    return 4 * cfg.llm.vocab_size * cfg.llm.hidden_size > bytes_from_env(ENV, DEFAULT_THRESHOLD)


def _streamed_backbone(cfg) -> bool:
    """Whether a backbone's fp32 weights pass the threshold past which it is quantized layer by layer
    (``sliced.threshold()``): one branch's projections and MLP per layer, as the export holds them."""
    from .sliced import threshold

    l = cfg.llm
    q, kv = l.num_attention_heads * l.head_dim, l.num_key_value_heads * l.head_dim
    per_layer = 2 * l.hidden_size * q + 2 * l.hidden_size * kv + 3 * l.hidden_size * l.intermediate_size
    return 4 * per_layer * l.num_hidden_layers > threshold()


def high_precision_for(target_is_gpu: bool) -> str:
    return "fp16" if target_is_gpu else "fp32"


def plan(component: str, precision: str, target_is_gpu: bool, cfg=None) -> Plan:
    """The plan for one component of a bundle of ``precision`` on a cpu (False) or GPU (True) target."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    hp = high_precision_for(target_is_gpu)
    c = component

    def high(why: str) -> Plan:
        """The component at the high precision (fp32 on cpu, fp16 on GPU)."""
        if hp == "fp32":
            return Plan(c, "fp32", "none", "fp32", notes=(why,))
        return _fp16(c, notes=(why,))

    if precision == "fp32":
        return Plan(c, "fp32", "none", "fp32")
    if c == "gen_head":
        return Plan(c, "fp32", "none", "fp32", notes=("Gen head kept fp32: velocity integrated over every step, N too narrow for tensor cores",))
    if precision == "fp16":
        return _fp16(c)
    if precision == "bf16":
        keep = _ROUTER + _TIMESTEP
        if target_is_gpu:
            return Plan(c, "bf16", "bf16-autocast", "bf16", keep_fp32=_NORMS + keep, keep_fp32_ops=("Softmax", "LayerNormalization"))
        return Plan(c, "bf16", "bf16-weights", "fp32", keep_fp32=keep)

    if c == "embed_tokens":
        return high("a Gather: nothing to quantize")
    if c == "lm_head" and precision in ("int8", "fp8") and cfg is not None and _large_head(cfg):
        # Model Optimizer's ONNX PTQ measured 12.7x its weight bytes in RSS on a single MatMul (0.39 GB
        # of weights: 5.34 GB; scripts/lm_head_probe.py), about 20 GB for emma-4b's 1.56 GB head, and
        # its own LLM recipes leave the LM head out. Kept high, it shares the embedding's table.
        return high("LM head kept high past the slice threshold (tied: one table with the embedding)")
    if precision == "int4w":
        if c in names.BACKBONES:
            # 128 (the usual AWQ block) for real widths; tiny's 64-wide layers get 16 (measured on tiny:
            # backbone_und rel L2 0.24 at 32, 0.16 at 16; AWQ finds little to protect in random weights)
            bs = 128 if cfg is None else max(16, min(128, cfg.llm.hidden_size // 4))
            exclude = _ATTN_BMM
            if cfg is not None and cfg.llm.hidden_size <= 256:
                # Small widths: the attention projections too stay high, INT4 goes to the SwiGLU MLP
                # (2/3 of the weights). Measured on the trained shapes checkpoint (held-out n=100): all
                # GEMMs INT4 cost generation 8 and editing 6 points against fp32; block 16 instead of
                # 32 did not help (-10); MLP only: -2 / +3. Real widths keep the usual AWQ on everything.
                exclude = exclude + _ATTN_PROJ
            # Past the streaming threshold (emma-4b) round-to-nearest: AWQ's clip search costs about 7
            # minutes per emma-4b layer (four hours a backbone), and only round-to-nearest is replayed
            # from two layers onto the rest (``replay.py``). Measured on small's widths, 2+2 layers, random
            # weights and feeds (scripts/scale_probe.py): rel L2 0.339 / 0.439 against AWQ's 0.284 / 0.387.
            method = "rtn_dq" if cfg is not None and _streamed_backbone(cfg) else "awq_clip"
            # Model Optimizer leaves an int4 graph fp32 around its weights: with fp16 elsewhere our pass
            # follows, keeping what the fp16 precision keeps (one rule for both)
            half = _fp16(c) if hp == "fp16" else Plan(c, "fp32", "none", "fp32")
            return Plan(c, "int4w", "modelopt-int4", hp, exclude=exclude, calibration_method=method, block_size=bs,
                        keep_fp32=half.keep_fp32, keep_fp32_ops=half.keep_fp32_ops)
        if c == "lm_head":
            return high("LM head kept high in int4w (AWQ on the tied embedding hurts token agreement)")
        return high("int4 weight-only is for the memory-bound backbone; this component is compute-bound")

    if precision == "fp8" and c == "gen_adapter":
        # Measured on the trained shapes checkpoint, one component at a time, held-out n=400: FP8 here
        # cost generation 2.25 points (the whole fp8 bundle 3.75); the adapter is a few small GEMMs
        # on the latent grid, so keeping it high costs nothing worth having.
        return high("Gen adapter kept high in fp8: E4M3 on the latent-grid projection costs generation accuracy")
    # int8 / fp8: GEMMs and convolutions
    method = "modelopt-int8" if precision == "int8" else "modelopt-fp8"
    exclude: tuple[str, ...] = ()
    if c == "und_trunk":
        exclude = _ROUTER + _POS_RESAMPLE
    elif c == "gen_adapter":
        exclude = _TIMESTEP
    elif c == "ae_decoder":
        exclude = _DECODER_EDGES
    elif c == "ae_encoder":
        exclude = (r"/encoder/conv_in/",)
        if precision in ("int8", "fp8"):
            # The layers that write the latents: the deepest stage and conv_out. On the trained shapes
            # checkpoint INT8 there missed the tolerance on held-out scenes (rel L2 0.103-0.138 > 0.1);
            # keeping the last stage high measured 0.044 (conv_out alone: no change). FP8 there cost the
            # autoencoder 1.48 dB of held-out PSNR (n=400, encoder alone in fp8, 38.3 dB decoder).
            last = len(cfg.ae.encoder_block_out_channels) - 1 if cfg is not None else None
            exclude = exclude + (r"/encoder/conv_out/",) + ((rf"/encoder/down_blocks\.{last}/",) if last is not None else ())
    keep: tuple[str, ...] = ()
    keep_ops: tuple[str, ...] = ()
    if c in (names.AE_ENCODER, names.AE_DECODER):
        # activation x activation products, fp32 in the model: not quantized, and with fp16 elsewhere
        # the whole chain and the norms stay fp32 as in the fp16 precision (``_fp16``)
        exclude = exclude + _AE_ATTN_PRODUCTS
        if hp == "fp16":
            half = _fp16(c)
            keep, keep_ops = half.keep_fp32, half.keep_fp32_ops
    if precision == "int8" and c in (names.AE_ENCODER, names.AE_DECODER):
        # Measured on small (random weights, verify's held-out images, rel L2 of the component): INT8
        # missed the tolerance in both (encoder 0.161, decoder 0.190). Kept high: the linear-attention
        # blocks (their MatMuls multiply two activations; encoder 0.161 -> 0.152, decoder 0.190 -> 0.097)
        # and the full-resolution stage next to the pixels (encoder down_blocks.0: -> 0.051 with the
        # attention; decoder up_blocks.1, the next one after the edges already kept: -> 0.088).
        stage = (r"/encoder/down_blocks\.0/",) if c == names.AE_ENCODER else (r"/decoder/up_blocks\.1/",)
        exclude = exclude + _AE_ATTN + stage
    if precision == "int8" and c == names.UND_TRUNK and (cfg is None or cfg.vision.hidden_size <= 256):
        # Small widths (as int4w's rule): on small INT8 missed the tolerance (rel L2 0.225 on verify's
        # held-out images); the attention projections high measured 0.102, with the patch embedding
        # also high 0.079 (q/k alone 0.209, v/out alone 0.133, the MLPs 0.206). Real widths unmeasured.
        exclude = exclude + _TRUNK_ATTN_PROJ + _PATCH_EMBED
    if precision == "int8" and (c in (names.UND_TRUNK, *names.BACKBONES) or names.is_expert(c)):
        # INT8 attention GEMMs (scores, P.V): TensorRT has no INT8 fused attention to gain from, and
        # ONNX Runtime's fused integer kernels return garbage on them when the KV cache is empty
        # (backbone rel L2 1e35 on a first chunk).
        exclude = exclude + _ATTN_BMM
    if precision == "int8" and c in names.BACKBONES:
        # The SwiGLU down projections' inputs (silu(gate) * up) carry the outliers: on trained shapes
        # checkpoints INT8 missed the tolerance with them quantized (backbone_gen rel L2 0.11 on one,
        # backbone_und 0.106 on the next; 0.026 / 0.021 without).
        exclude = exclude + _DOWN_PROJ
    return Plan(c, precision, method, hp, exclude=exclude, calibration_method="max",
                reduce_range=(precision == "int8" and not target_is_gpu), keep_fp32=keep, keep_fp32_ops=keep_ops)


def _fp16(c: str, notes: tuple[str, ...] = ()) -> Plan:
    keep = _NORMS + _ROUTER + _TIMESTEP
    if c in (names.AE_ENCODER, names.AE_DECODER):
        keep = keep + _AE_ATTN_CHAIN
    if c == "ae_decoder":
        keep = keep + (r"/decoder/conv_out/",)
    return Plan(c, "fp16", "fp16", "fp16", keep_fp32=keep, keep_fp32_ops=("Softmax", "LayerNormalization"),
                notes=notes + ("plus every node the overflow check finds above 65504/4 on real feeds",))


def gemm_ops() -> list[str]:
    return list(_GEMM_OPS)
