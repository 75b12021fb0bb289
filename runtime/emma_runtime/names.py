"""Component names: the one registry both sides read (the runtime owns the manifest schema, so the
names live beside it; the exporter's component classes take theirs from here).

The understanding encoder has ``num_experts`` experts, one graph each: ``expert(i)``.
"""

from __future__ import annotations

AE_ENCODER = "ae_encoder"
AE_DECODER = "ae_decoder"
UND_TRUNK = "und_trunk"  # trunk + router
UND_ADAPTER = "und_adapter"
GEN_ADAPTER = "gen_adapter"  # with the timestep embedding
EMBED_TOKENS = "embed_tokens"
BACKBONE_UND = "backbone_und"
BACKBONE_GEN = "backbone_gen"
LM_HEAD = "lm_head"
GEN_HEAD = "gen_head"
_EXPERT = "und_expert_"

FIXED = (AE_ENCODER, AE_DECODER, UND_TRUNK, UND_ADAPTER, GEN_ADAPTER, EMBED_TOKENS, BACKBONE_UND, BACKBONE_GEN, LM_HEAD, GEN_HEAD)
BACKBONES = (BACKBONE_UND, BACKBONE_GEN)


def expert(i: int) -> str:
    return f"{_EXPERT}{i}"


def is_expert(name: str) -> bool:
    return name.startswith(_EXPERT) and name[len(_EXPERT):].isdigit()


def backbone(branch: str) -> str:
    """The backbone graph of a branch ("und" or "gen")."""
    return {"und": BACKBONE_UND, "gen": BACKBONE_GEN}[branch]


# ---- the backbone graphs' KV-cache IO, one pair of tensors per layer -----------------------------
# standard graphs: past_key_i (batch, kv_heads, past, head_dim) in, new_key_i (batch, kv_heads, seq,
# head_dim) out; "gqa" graphs (ONNX Runtime's GroupQueryAttention): past_key_i (batch, kv_heads,
# capacity, head_dim) in and present_key_i out, bound to the same buffer (written in place).
ATTENTION_STANDARD, ATTENTION_GQA = "standard", "gqa"
ATTENTIONS = (ATTENTION_STANDARD, ATTENTION_GQA)
SEQLENS_K, TOTAL_SEQUENCE_LENGTH = "seqlens_k", "total_sequence_length"


def past_kv(i: int) -> tuple[str, str]:
    return f"past_key_{i}", f"past_value_{i}"


def new_kv(i: int) -> tuple[str, str]:
    return f"new_key_{i}", f"new_value_{i}"


def present_kv(i: int) -> tuple[str, str]:
    return f"present_key_{i}", f"present_value_{i}"


UNDERSTAND, GENERATE, EDIT = "understand", "generate", "edit"
TASKS = (UNDERSTAND, GENERATE, EDIT)


def for_task(task: str, num_experts: int, reference_branch: str = "gen") -> tuple[str, ...]:
    """The components the runtime's ``task`` pipeline runs (pipelines.py), in registry order.

    understand: the image through the trunk, the router's expert (any of them), the autoencoder's
    latents and the Und adapter; text through the embedding; the Und backbone; the LM head.
    generate: the prompt (embedding, Und backbone), then the denoising loop (Gen adapter on the noisy
    latents, Gen backbone, Gen head) and the decoder. edit: generate's, plus the reference image
    through the trunk, expert 0 (forced), the encoder and the adapter of ``reference_branch``."""
    text = {EMBED_TOKENS, BACKBONE_UND}
    denoise = {BACKBONE_GEN, GEN_ADAPTER, GEN_HEAD, AE_DECODER}
    if task == UNDERSTAND:
        need = text | {UND_TRUNK, AE_ENCODER, UND_ADAPTER, LM_HEAD} | {expert(i) for i in range(num_experts)}
    elif task == GENERATE:
        need = text | denoise
    elif task == EDIT:
        need = text | denoise | {UND_TRUNK, expert(0), AE_ENCODER, UND_ADAPTER if reference_branch == "und" else GEN_ADAPTER}
    else:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    return tuple(n for n in required(num_experts) if n in need)


def required(num_experts: int, tasks: tuple[str, ...] | None = None, reference_branch: str = "gen") -> tuple[str, ...]:
    """Every component a bundle of a model with ``num_experts`` experts must have; with ``tasks``
    (a task-subset bundle), those its tasks' pipelines run."""
    every = FIXED + tuple(expert(i) for i in range(num_experts))
    if not tasks:
        return every
    need = {n for t in tasks for n in for_task(t, num_experts, reference_branch)}
    return tuple(n for n in every if n in need)
