"""Conformance of the EMMA reference with the upstream implementations it is initialised from.

Comparisons (fp32, eager attention upstream):

- ``text_logits``: EMMA's Und branch + LM head against ``Qwen3ForCausalLM`` logits for a prompt.
- ``text_decode``: token-by-token decode with EMMA's KV cache against Qwen3 with its past key values.
- ``vision_native`` / ``vision_nonsquare``: trunk + versatile expert (before the 2x2 pixel shuffle) against
  ``SiglipVisionModel``'s ``last_hidden_state``, at the native size and at a non-square size with
  interpolated position embeddings.
- ``ae_encode[_nonsquare]`` / ``ae_decode[_nonsquare]``: EMMA's ``ae.encode`` / ``ae.decode`` (scaled latents)
  against ``AutoencoderDC.encode(x).latent * scaling_factor`` / ``AutoencoderDC.decode(z / scaling_factor).sample``.

A row passes when ``max_abs <= 1e-5 * max(1, max |reference|)``.
transformers and diffusers are needed here (the ``upstream`` extra), never at runtime.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .model.backbone import UND, chunk_mask, full_mask

__all__ = [
    "RTOL",
    "ConformanceRow",
    "ConformanceReport",
    "UpstreamModels",
    "load_upstream_models",
    "compare",
    "compare_text",
    "compare_vision",
    "compare_autoencoder",
    "compare_ae",
    "check_model",
    "run_conformance",
]

RTOL = 1e-5  # max abs error relative to the output scale


@dataclass(frozen=True)
class ConformanceRow:
    component: str
    max_abs: float
    rel_l2: float
    tolerance: float
    passed: bool
    shape: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


@dataclass
class ConformanceReport:
    config: str
    checkpoint: str | None
    rows: list[ConformanceRow] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.passed for r in self.rows)

    @property
    def failures(self) -> list[str]:
        return [r.component for r in self.rows if not r.passed]

    def row(self, component: str) -> ConformanceRow:
        for r in self.rows:
            if r.component == component:
                return r
        raise KeyError(component)

    def to_dict(self) -> dict:
        return {
            "config": self.config,
            "checkpoint": self.checkpoint,
            "passed": self.passed,
            "rows": [r.to_dict() for r in self.rows],
        }


def compare(component: str, ours: torch.Tensor, ref: torch.Tensor, rtol: float = RTOL) -> ConformanceRow:
    if tuple(ours.shape) != tuple(ref.shape):
        raise ValueError(f"{component}: shape {tuple(ours.shape)} != upstream {tuple(ref.shape)}")
    a, b = ours.detach().double(), ref.detach().double()
    max_abs = (a - b).abs().max().item()
    rel_l2 = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
    tol = rtol * max(1.0, b.abs().max().item())
    return ConformanceRow(component, max_abs, rel_l2, tol, bool(max_abs <= tol), tuple(ref.shape))


# ---- upstream models --------------------------------------------------------------------------------


@dataclass
class UpstreamModels:
    qwen: object  # transformers.Qwen3ForCausalLM
    siglip: object  # transformers.SiglipVisionModel
    dcae: object  # diffusers.AutoencoderDC


def _require(name: str):
    try:
        return __import__(name)
    except ImportError:
        raise ImportError(
            f"conformance needs {name} (pip install 'emma-deploy[upstream]'); it is never a runtime dependency"
        ) from None


def load_upstream_models(llm_dir: str | Path, vision_dir: str | Path, ae_dir: str | Path) -> UpstreamModels:
    transformers = _require("transformers")
    diffusers = _require("diffusers")
    qwen = transformers.Qwen3ForCausalLM.from_pretrained(
        str(llm_dir), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    siglip = transformers.SiglipVisionModel.from_pretrained(
        str(vision_dir), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    dcae = diffusers.AutoencoderDC.from_pretrained(str(ae_dir), torch_dtype=torch.float32, low_cpu_mem_usage=False).eval()
    return UpstreamModels(qwen, siglip, dcae)


# ---- comparisons ----------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def compare_text(model, qwen, batch: int = 2, prompt: int = 12, decode: int = 4, seed: int = 0) -> list[ConformanceRow]:
    """Prompt logits, then ``decode`` single-token steps against the growing KV cache."""
    vocab = model.cfg.llm.vocab_size
    ids = torch.randint(0, vocab, (batch, prompt + decode), generator=_gen(seed))
    pre = ids[:, :prompt]

    def emma_step(tokens, start, past):
        B, S = tokens.shape
        pos = torch.arange(start, start + S)[None].expand(B, S)
        if past is None:
            allow = full_mask(torch.full((B, S), -1, dtype=torch.long), bidirectional=False)
        else:
            allow = chunk_mask(torch.ones(B, past.length, dtype=torch.bool), S, causal=True)
        hidden, new = model.llm(model.embed(tokens), pos, UND, allow, past)
        cache = new if past is None else past.append(new.keys, new.values)
        return model.lm_head(hidden), cache

    # transformers >= 5.2x names the cache argument/output ``cache``; older versions ``past_key_values``
    cache_arg = "cache" if "cache" in inspect.signature(qwen.forward).parameters else "past_key_values"

    ours, cache = emma_step(pre, 0, None)
    ref_out = qwen(input_ids=pre, use_cache=True)
    rows = [compare("text_logits", ours, ref_out.logits)]

    past = getattr(ref_out, cache_arg)
    ours_steps, ref_steps = [], []
    for i in range(decode):
        tok = ids[:, prompt + i : prompt + i + 1]
        o, cache = emma_step(tok, prompt + i, cache)
        r = qwen(input_ids=tok, use_cache=True, **{cache_arg: past})
        past = getattr(r, cache_arg)
        ours_steps.append(o)
        ref_steps.append(r.logits)
    rows.append(compare("text_decode", torch.cat(ours_steps, 1), torch.cat(ref_steps, 1)))
    return rows


def _pixels(b: int, h: int, w: int, seed: int) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=_gen(seed)) * 2 - 1


@torch.no_grad()
def compare_vision(model, siglip, expert: int = 0, seed: int = 1) -> list[ConformanceRow]:
    """Trunk + expert ``expert`` tokens (before the pixel shuffle) against SigLIP's last hidden state."""
    cfg = model.cfg
    native = cfg.vision.image_size
    cell = cfg.cell
    h, w = 4 * cell, 3 * cell
    if (h, w) == (native, native):  # pragma: no cover - only for a config whose native size is 4x3 cells
        h, w = 5 * cell, 3 * cell
    rows = []
    for name, (hh, ww), interp in (("vision_native", (native, native), False), ("vision_nonsquare", (h, w), True)):
        px = _pixels(2, hh, ww, seed)
        th, _ = model.vision.trunk(px)
        ours = model.vision.experts[expert].forward_tokens(th)
        ref = siglip(pixel_values=px, interpolate_pos_encoding=interp).last_hidden_state
        rows.append(compare(name, ours, ref))
    return rows


@torch.no_grad()
def compare_autoencoder(model, dcae, seed: int = 2) -> list[ConformanceRow]:
    """EMMA's scaled encode/decode against AutoencoderDC with its own scaling_factor."""
    return compare_ae(model.ae, dcae, model.cfg.cell, seed)


@torch.no_grad()
def compare_ae(ae, dcae, cell: int, seed: int = 2) -> list[ConformanceRow]:
    """``ae`` (EMMA's Autoencoder) against ``dcae`` on a square and a non-square image of 2x2 and 2x3 cells."""
    s = float(dcae.config.scaling_factor)
    rows = []
    for suffix, (h, w) in (("", (2 * cell, 2 * cell)), ("_nonsquare", (2 * cell, 3 * cell))):
        x = _pixels(1, h, w, seed)
        ref_latent = dcae.encode(x).latent
        rows.append(compare(f"ae_encode{suffix}", ae.encode(x), ref_latent * s))
        z = ref_latent * s  # decode the upstream's own (scaled) latent
        rows.append(compare(f"ae_decode{suffix}", ae.decode(z), dcae.decode(z / s).sample))
    return rows


def check_model(model, up: UpstreamModels, checkpoint: str | None = None) -> ConformanceReport:
    model.eval()
    rep = ConformanceReport(model.cfg.name, checkpoint)
    rep.rows += compare_text(model, up.qwen)
    rep.rows += compare_vision(model, up.siglip)
    rep.rows += compare_autoencoder(model, up.dcae)
    return rep


def run_conformance(
    llm_dir: str | Path,
    vision_dir: str | Path,
    ae_dir: str | Path,
    checkpoint: str | Path | None = None,
    config_name: str | None = None,
    seed: int = 0,
    choices=None,
) -> ConformanceReport:
    """Without ``checkpoint``: initialise EMMA from the upstream folders in memory (as ``init`` does)
    and compare. With it: check that EMMA checkpoint against the upstream models (its config must
    match the upstream configs; a config derived by ``init`` from these upstream folders does).
    ``choices``: EMMA's own choices for an in-memory init from upstream folders no named config fits."""
    from .init_checkpoint import init_model
    from .weights.upstream import UpstreamSet, derive_config

    if checkpoint is None:
        model = init_model(llm_dir, vision_dir, ae_dir, config_name, seed, choices)
    else:
        from .weights.checkpoint import load_checkpoint, read_config

        ck_cfg = read_config(checkpoint)
        if config_name is not None and ck_cfg.name != config_name:
            raise ValueError(f"{checkpoint}: checkpoint config is '{ck_cfg.name}', not '{config_name}'")
        ups = UpstreamSet.open(llm_dir, vision_dir, ae_dir)
        derive_config(ups.llm.config, ups.vision.config, ups.ae.config, ck_cfg)
        model = load_checkpoint(checkpoint)
    up = load_upstream_models(llm_dir, vision_dir, ae_dir)
    return check_model(model, up, None if checkpoint is None else str(checkpoint))
