#!/usr/bin/env python
"""Write random upstream checkpoint folders (Qwen3, SigLIP, DC-AE) shaped for an EMMA config.

    python scripts/make_tiny_upstream.py OUT_DIR [--config tiny] [--seed 0]
    python scripts/make_tiny_upstream.py OUT_DIR --config emma-4b --synthetic   # 4B-sized, streamed

Default mode builds the real upstream models (transformers ``Qwen3ForCausalLM`` and
``SiglipVisionModel``, diffusers ``AutoencoderDC``) with random weights of a useful scale and saves them
with ``save_pretrained`` (the Qwen3 folder sharded, with an index, to exercise that path), plus a
byte-level ``tokenizer.json`` with EMMA's special tokens in the Qwen3 folder. Output:
``OUT_DIR/qwen3``, ``OUT_DIR/siglip``, ``OUT_DIR/dcae``; then

    emma-export init --llm OUT_DIR/qwen3 --vision OUT_DIR/siglip --ae OUT_DIR/dcae --config tiny --out CKPT

``--synthetic`` writes the same folder layout without building any model: key names and shapes come
from meta-device models and random tensors are streamed one at a time into sharded safetensors (bf16),
so a 4B-sized set needs little memory (used to measure ``init``'s peak RSS).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from emma_export.config import EMMAConfig, get_config  # noqa: E402
from emma_export.tokenizer import byte_level_tokenizer  # noqa: E402


def qwen3_config_dict(cfg: EMMAConfig) -> dict:
    l = cfg.llm
    return dict(
        vocab_size=l.vocab_size,
        hidden_size=l.hidden_size,
        intermediate_size=l.intermediate_size,
        num_hidden_layers=l.num_hidden_layers,
        num_attention_heads=l.num_attention_heads,
        num_key_value_heads=l.num_key_value_heads,
        head_dim=l.head_dim,
        hidden_act=l.hidden_act,
        max_position_embeddings=l.max_position_embeddings,
        rms_norm_eps=l.rms_norm_eps,
        rope_theta=l.rope_theta,
        tie_word_embeddings=l.tie_word_embeddings,
        attention_bias=False,
    )


def siglip_config_dict(cfg: EMMAConfig) -> dict:
    v = cfg.vision
    return dict(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads,
        num_channels=v.num_channels,
        image_size=v.image_size,
        patch_size=v.patch_size,
        hidden_act=v.hidden_act,
        layer_norm_eps=v.layer_norm_eps,
        vision_use_head=False,
    )


def dcae_config_dict(cfg: EMMAConfig) -> dict:
    # EMMA's AutoencoderConfig fields are AutoencoderDC's constructor arguments.
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg.ae).items()}


def _qwen3_from_dict(c: dict):
    import transformers

    c = dict(c)
    theta = c.pop("rope_theta", 1_000_000.0)
    hf = transformers.Qwen3Config(**c)
    # transformers >= 5 keeps RoPE settings in rope_parameters; older versions in rope_theta
    if getattr(hf, "rope_parameters", None) is not None:
        hf.rope_parameters = {**hf.rope_parameters, "rope_theta": theta}
    else:  # pragma: no cover - transformers 4.x
        hf.rope_theta = theta
    return transformers.Qwen3ForCausalLM, hf


def _qwen3(cfg: EMMAConfig):
    return _qwen3_from_dict(qwen3_config_dict(cfg))


def _siglip(cfg: EMMAConfig):
    import transformers

    return transformers.SiglipVisionModel, transformers.SiglipVisionConfig(**siglip_config_dict(cfg))


@torch.no_grad()
def _scale_weights(model: torch.nn.Module, seed: int) -> None:
    """Random weights at a scale where every tensor matters (norm gains around 1, not exactly 1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        n = torch.randn(p.shape, generator=g)
        leaf = name.rsplit(".", 1)[-1]
        if p.dim() == 1 and ("norm" in name or leaf == "weight"):
            p.copy_(1.0 + 0.2 * n) if leaf == "weight" else p.copy_(0.1 * n)
        elif leaf == "bias":
            p.copy_(0.1 * n)
        elif "position_embedding" in name:
            p.copy_(0.5 * n)
        elif "embed_tokens" in name:
            p.copy_(n)
        else:
            fan_in = math.prod(p.shape[1:]) if p.dim() > 1 else 1
            p.copy_(n / math.sqrt(fan_in))


def _skip_init():
    """transformers' own random init is skipped where it can be: _scale_weights overwrites every parameter
    (at the published widths the default init alone took most of the build time)."""
    try:
        from transformers.initialization import no_init_weights

        return no_init_weights()
    except ImportError:  # pragma: no cover - transformers 4.x
        import contextlib

        return contextlib.nullcontext()


def make_upstream(out_dir: str | Path, qwen3: dict, siglip: dict, dcae: dict, seed: int = 0, shard_llm: bool = True) -> dict[str, Path]:
    """Build and save random upstream models from the upstream libraries' own config dicts
    (``Qwen3Config``, ``SiglipVisionConfig``, ``AutoencoderDC`` arguments), independent of any EMMA config."""
    import diffusers
    import transformers

    out = Path(out_dir)
    dirs = {"llm": out / "qwen3", "vision": out / "siglip", "ae": out / "dcae"}
    torch.manual_seed(seed)

    cls, hf = _qwen3_from_dict(qwen3)
    with _skip_init():
        qwen = cls(hf).eval()
    _scale_weights(qwen, seed)
    if hf.tie_word_embeddings:
        qwen.tie_weights()
    # Sharded with an index (a few shards for tiny), as real Qwen3 checkpoints are.
    qwen.save_pretrained(dirs["llm"], max_shard_size="300KB" if shard_llm else "50GB")
    byte_level_tokenizer(hf.vocab_size).save(str(dirs["llm"] / "tokenizer.json"))
    del qwen

    with _skip_init():
        siglip_model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**siglip)).eval()
    _scale_weights(siglip_model, seed + 1)
    siglip_model.save_pretrained(dirs["vision"])
    del siglip_model

    ae = diffusers.AutoencoderDC(**dcae).eval()
    _scale_weights(ae, seed + 2)
    ae.save_pretrained(dirs["ae"])
    return dirs


def make_tiny_upstream(out_dir: str | Path, config_name: str = "tiny", seed: int = 0, shard_llm: bool = True) -> dict[str, Path]:
    """Build and save random upstream models matching EMMA config ``config_name``; returns the folders."""
    cfg = get_config(config_name)
    return make_upstream(out_dir, qwen3_config_dict(cfg), siglip_config_dict(cfg), dcae_config_dict(cfg), seed, shard_llm)


# ---- synthetic (streamed) -------------------------------------------------------------------------


def _meta_state(make) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    with torch.device("meta"):
        m = make()
    return {k: (tuple(v.shape), v.dtype) for k, v in m.state_dict().items()}


def make_synthetic_upstream(
    out_dir: str | Path,
    config_name: str = "emma-4b",
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    shard_bytes: int = 4 * 1024**3,
) -> dict[str, Path]:
    """Upstream folders with the key names and shapes of the real models, random values, written
    tensor by tensor (no model is materialised). Qwen3 in ``dtype``; SigLIP and DC-AE too."""
    import diffusers

    from emma_export.init_checkpoint import ShardedSafetensorsWriter

    cfg = get_config(config_name)
    out = Path(out_dir)
    dirs = {"llm": out / "qwen3", "vision": out / "siglip", "ae": out / "dcae"}
    qcls, qcfg = _qwen3(cfg)
    scls, scfg = _siglip(cfg)
    states = {
        "llm": (_meta_state(lambda: qcls(qcfg)), qcfg.to_dict()),
        "vision": (_meta_state(lambda: scls(scfg)), scfg.to_dict()),
        "ae": (_meta_state(lambda: diffusers.AutoencoderDC(**dcae_config_dict(cfg))), {"_class_name": "AutoencoderDC", **dcae_config_dict(cfg)}),
    }
    if cfg.llm.tie_word_embeddings:
        states["llm"][0].pop("lm_head.weight", None)
    g = torch.Generator().manual_seed(seed)
    for src, (state, config) in states.items():
        d = dirs[src]
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(config, indent=2, default=str))
        entries = [(k, dtype if dt.is_floating_point else dt, shape) for k, (shape, dt) in state.items()]
        w = ShardedSafetensorsWriter(d, entries, shard_bytes)
        for k, dt, shape in entries:
            if dt.is_floating_point:
                # biases zero and norm scales one, as the real models start: every 1-D tensor at 1.0 put a
                # +1 on every channel of every SigLIP projection and LayerNorm, and the fp8 vision trunk
                # of emma-4b measured rel L2 0.181 from it (0.0894 on seeded weights, biases zero)
                t = torch.empty(shape, dtype=torch.float32)
                if len(shape) > 1:
                    t.normal_(0.0, 0.02, generator=g)
                else:
                    t.fill_(0.0 if k.rsplit(".", 1)[-1] == "bias" else 1.0)
                t = t.to(dt)
            else:
                t = torch.zeros(shape, dtype=dt)
            w.write(k, t)
            del t
        w.close()
    byte_level_tokenizer(cfg.llm.vocab_size).save(str(dirs["llm"] / "tokenizer.json"))
    return dirs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--synthetic", action="store_true", help="stream random tensors without building models")
    args = ap.parse_args(argv)
    if args.synthetic:
        dirs = make_synthetic_upstream(args.out_dir, args.config, args.seed)
    else:
        dirs = make_tiny_upstream(args.out_dir, args.config, args.seed)
    for k, d in dirs.items():
        print(f"{k}: {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
