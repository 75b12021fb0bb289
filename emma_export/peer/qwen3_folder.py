"""The Und branch of an EMMA model written as a Hugging Face Qwen3 folder: the inverse of ``init``'s key map.

Text tokens only ever run the Und branch, embedding and LM head, which is exactly a Qwen3: per layer the
shared Q/K (and q/k norms) in the shallow layers, the ``.und.`` copies elsewhere; EMMA's LM head owns the
final norm (``lm_head.norm`` is Qwen3's ``model.norm``) and its weight is the token embedding (tied). A
decoder built from this folder by another toolchain computes the same logits as EMMA's understanding
path, so it is a like-for-like peer for the decode benchmark.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import EMMAConfig
from ..weights.keymap import expected_upstream_keys, map_qwen3_key

# The tokenizer's end-of-sequence: the chat template's end of turn (config.SPECIAL_TOKENS).
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"


@dataclass(frozen=True)
class Qwen3Folder:
    path: Path
    config: dict
    tensors: int
    weight_bytes: int  # every tensor written, the tied embedding once


def und_source_key(qwen3_key: str, cfg: EMMAConfig) -> str:
    """The EMMA tensor a Qwen3 tensor is read from: the shared one, else the Und branch's copy."""
    targets = map_qwen3_key(qwen3_key, cfg.llm)
    if len(targets) == 1:
        return targets[0]
    und = [t for t in targets if ".und." in t]
    if len(und) != 1:  # the key map changed shape: fail here rather than write a wrong folder
        raise ValueError(f"Qwen3 key {qwen3_key!r} maps to {targets}, none (or several) of them the Und branch's")
    return und[0]


def und_state_dict(model) -> dict[str, torch.Tensor]:
    """Qwen3 key -> tensor (the EMMA model's own storage, not copied)."""
    cfg: EMMAConfig = model.cfg
    sd = model.state_dict()
    out = {k: sd[und_source_key(k, cfg)] for k in expected_upstream_keys(cfg, sd)["llm"]}
    if not cfg.llm.tie_word_embeddings:
        # EMMA's LM head is the embedding either way; an untied Qwen3 needs it written out
        out["lm_head.weight"] = sd["llm.embed_tokens.weight"]
    return out


def qwen3_config(cfg: EMMAConfig, eos_id: int, pad_id: int, dtype: torch.dtype = torch.float32) -> dict:
    l = cfg.llm
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": l.hidden_size,
        "intermediate_size": l.intermediate_size,
        "num_hidden_layers": l.num_hidden_layers,
        "num_attention_heads": l.num_attention_heads,
        "num_key_value_heads": l.num_key_value_heads,
        "head_dim": l.head_dim,
        "hidden_act": l.hidden_act,
        "rms_norm_eps": l.rms_norm_eps,
        "rope_theta": l.rope_theta,
        "rope_scaling": None,
        "vocab_size": l.vocab_size,
        "tie_word_embeddings": l.tie_word_embeddings,
        "max_position_embeddings": l.max_position_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": l.num_hidden_layers,
        "use_cache": True,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def write_qwen3_folder(model, out_dir: str | Path, tokenizer_json: str) -> Qwen3Folder:
    """config.json, model.safetensors, tokenizer.json and tokenizer_config.json (builders load a tokenizer)."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    cfg: EMMAConfig = model.cfg
    tok = Tokenizer.from_str(tokenizer_json)
    eos_id, pad_id = tok.token_to_id(EOS_TOKEN), tok.token_to_id(PAD_TOKEN)
    if eos_id is None or pad_id is None:
        raise ValueError(f"tokenizer has no {EOS_TOKEN} / {PAD_TOKEN} token: not an EMMA tokenizer")
    tensors = {k: v.detach().contiguous() for k, v in und_state_dict(model).items()}
    dtype = tensors["model.embed_tokens.weight"].dtype
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    conf = qwen3_config(cfg, eos_id, pad_id, dtype)
    (out / "config.json").write_text(json.dumps(conf, indent=2))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "tokenizer.json").write_text(tokenizer_json)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "model_max_length": cfg.max_context,
    }, indent=2))
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return Qwen3Folder(out, conf, len(tensors), nbytes)


def write_bundle_qwen3(bundle, out_dir: str | Path, checkpoint: str | None = None, model=None) -> Qwen3Folder:
    """The bundle's reference weights (``model``, else its checkpoint or seed) as a Qwen3 folder, with its
    tokenizer."""
    if model is None:
        from ..verify import reference_model

        model = reference_model(bundle, checkpoint)
    file, digest = bundle.manifest.tokenizer
    return write_qwen3_folder(model, out_dir, bytes(bundle.read(file, digest)).decode("utf-8"))


__all__ = ["Qwen3Folder", "und_source_key", "und_state_dict", "qwen3_config", "write_qwen3_folder", "write_bundle_qwen3"]
