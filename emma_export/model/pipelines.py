"""Reference pipelines in PyTorch: the ground truth that the runtime is compared against.

The prefix of every request (prompt, images) runs as ONE forward pass over the mixed sequence with
the EMMA mask rule; decoding and denoising then reuse its KV cache. The runtime instead runs the
prefix chunk by chunk through the per-branch graphs, so the two sides check each other.
Initial noise is an explicit input, so another implementation can be fed identical noise.
The protocol pieces (sequence layout, token sampling rule, timestep schedule) come from the runtime
package, so both sides follow one definition; all tensor math here is the reference's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from emma_runtime import template
from emma_runtime.sampling import sample_token, timesteps
from emma_runtime.template import Image, SpecialIds, Text
from emma_runtime.trace import StepTrace

from .backbone import GEN, UND, KVCache, chunk_mask, full_mask
from .emma import EMMA


@dataclass
class Prefix:
    cache: KVCache
    length: int
    last_hidden: torch.Tensor  # (B, hidden) of the last prefix token
    visual_tokens: int  # image tokens fed to the backbone


@dataclass
class UnderstandResult:
    text: str
    token_ids: list[int]
    expert: int
    visual_tokens: int


@dataclass
class ImageResult:
    image: torch.Tensor  # (1, 3, H, W) in [-1, 1]
    latents: torch.Tensor  # (1, C, h, w), scaled
    visual_tokens: int
    trajectory: list[torch.Tensor] = field(default_factory=list)


def _as_image(x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x, dtype=np.float32)) if not isinstance(x, torch.Tensor) else x.float()
    if t.dim() == 3:
        t = t[None]
    return t


@torch.no_grad()
def run_prefix(model: EMMA, segments, images: dict[str, torch.Tensor], bidirectional: bool, expert: int | None = None) -> tuple[Prefix, int | None]:
    """One mixed-branch forward over the prefix. ``images`` maps an Image role to its pixels."""
    embeds, branches, image_ids = [], [], []
    chosen = None
    visual = 0
    for n, seg in enumerate(segments):
        if isinstance(seg, Text):
            ids = torch.tensor([seg.ids], dtype=torch.long)
            e = model.embed(ids)
            img_id = -1
        elif seg.role == "input":
            e, ch = model.und_image_tokens(images[seg.role], expert=expert)
            chosen = int(ch[0])
            img_id = n
        elif seg.role == "reference":
            e = model.reference_tokens(images[seg.role], branch=seg.branch)
            img_id = n
        else:
            raise ValueError(f"segment {seg} cannot be part of a prefix")
        if isinstance(seg, Image):
            visual += e.shape[1]
        br = UND if isinstance(seg, Text) or seg.branch == "und" else GEN
        embeds.append(e)
        branches.append(torch.full((1, e.shape[1]), br, dtype=torch.long))
        image_ids.append(torch.full((1, e.shape[1]), img_id, dtype=torch.long))
    x = torch.cat(embeds, dim=1)
    branch = torch.cat(branches, dim=1)
    img = torch.cat(image_ids, dim=1)
    S = x.shape[1]
    pos = torch.arange(S)[None]
    hidden, cache = model.llm(x, pos, branch, full_mask(img, bidirectional))
    return Prefix(cache, S, hidden[:, -1], visual), chosen


@torch.no_grad()
def understand(
    model: EMMA,
    tokenizer,
    image,
    prompt: str,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    expert: int | None = None,
    trace: StepTrace | None = None,
) -> UnderstandResult:
    sp = SpecialIds.from_tokenizer(tokenizer)
    segs = template.understand(sp, template.text_ids(tokenizer, prompt))
    prefix, chosen = run_prefix(model, segs, {"input": _as_image(image)}, bidirectional=False, expert=expert)
    rng = np.random.default_rng(seed)
    cache, pos = prefix.cache, prefix.length
    logits = model.lm_head(prefix.last_hidden)[0].numpy()
    if trace is not None:
        trace.add_logits(logits)
        if trace.keep_kv:
            trace.add_kv(*_cache_time_major(cache))
    out: list[int] = []
    for _ in range(max_new_tokens):
        tok = sample_token(logits, temperature, top_p, rng)
        if tok == sp.im_end:
            break
        out.append(tok)
        x = model.embed(torch.tensor([[tok]]))
        allow = chunk_mask(torch.ones(1, pos, dtype=torch.bool), 1, causal=True)
        hidden, new = model.llm(x, torch.tensor([[pos]]), UND, allow, cache)
        cache = cache.append(new.keys, new.values)
        pos += 1
        logits = model.lm_head(hidden[:, -1])[0].numpy()
        if trace is not None:
            trace.add_logits(logits)
            if trace.keep_kv:
                trace.add_kv(*_cache_time_major(cache))
    return UnderstandResult(tokenizer.decode(out).strip(), out, chosen, prefix.visual_tokens)


def _cache_time_major(cache: KVCache) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer (B, Hk, T, hd) -> the runtime's (T, layers, B, Hk, hd)."""
    k = torch.stack(cache.keys, dim=0).permute(3, 0, 1, 2, 4)
    v = torch.stack(cache.values, dim=0).permute(3, 0, 1, 2, 4)
    return k.float().numpy(), v.float().numpy()


@torch.no_grad()
def velocity(model: EMMA, prefix: Prefix, x: torch.Tensor, t: float) -> torch.Tensor:
    """The target tokens of one denoising step against the cached prefix -> velocity (B, C, h, w)."""
    B, C, h, w = x.shape
    tokens = model.target_tokens(x, torch.full((B,), t, dtype=x.dtype))
    L = tokens.shape[1]
    pos = torch.arange(prefix.length, prefix.length + L)[None].expand(B, L)
    allow = chunk_mask(torch.ones(B, prefix.length, dtype=torch.bool), L, causal=False)
    hidden, _ = model.llm(tokens, pos, GEN, allow, prefix.cache)
    v = model.gen_head(hidden)  # (B, L, C), row-major over the grid
    return v.transpose(1, 2).reshape(B, C, h, w)


def _euler(model: EMMA, prefixes: list[Prefix], weights: list[float], noise: torch.Tensor, steps: int, shift: float,
           trace: StepTrace | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Euler flow matching; the guided velocity is sum_k weights[k] * v_k over the prefixes."""
    x = noise.clone()
    ts = timesteps(steps, shift)
    traj = []
    for i in range(steps):
        v = sum(wk * velocity(model, p, x, float(ts[i])) for wk, p in zip(weights, prefixes))
        x = x + float(ts[i + 1] - ts[i]) * v
        traj.append(x)
        if trace is not None:
            trace.add_step(float(ts[i]), v.numpy(), x.numpy())
    return x, traj


def _check_noise(model: EMMA, noise: torch.Tensor) -> torch.Tensor:
    if noise.dim() != 4 or noise.shape[:2] != (1, model.cfg.ae.latent_channels):
        raise ValueError(f"noise must be (1, {model.cfg.ae.latent_channels}, h, w), got {tuple(noise.shape)}")
    return noise


@torch.no_grad()
def generate(model: EMMA, tokenizer, prompt: str, noise, steps: int | None = None, cfg_scale: float | None = None, shift: float | None = None,
             trace: StepTrace | None = None) -> ImageResult:
    s = model.cfg.sampler
    steps, cfg_scale, shift = steps or s.steps, s.cfg if cfg_scale is None else cfg_scale, shift or s.shift
    noise = _check_noise(model, torch.as_tensor(np.asarray(noise, dtype=np.float32)))
    sp = SpecialIds.from_tokenizer(tokenizer)
    enc = lambda p: template.text_ids(tokenizer, p)
    cond, _ = run_prefix(model, template.split_prefix(template.generate(sp, enc(prompt)))[0], {}, True)
    if cfg_scale == 1.0:
        prefixes, weights = [cond], [1.0]
    else:
        uncond, _ = run_prefix(model, template.split_prefix(template.generate(sp, []))[0], {}, True)
        prefixes, weights = [cond, uncond], [cfg_scale, 1.0 - cfg_scale]
    lat, traj = _euler(model, prefixes, weights, noise, steps, shift, trace)
    L = noise.shape[2] * noise.shape[3]
    return ImageResult(model.ae.decode(lat), lat, cond.visual_tokens + L, traj)


@torch.no_grad()
def edit(
    model: EMMA,
    tokenizer,
    image,
    prompt: str,
    noise,
    steps: int | None = None,
    cfg_text: float | None = None,
    cfg_image: float | None = None,
    shift: float | None = None,
    trace: StepTrace | None = None,
) -> ImageResult:
    """InstructPix2Pix-style guidance over three prefixes: (reference, instruction), (reference, ""),
    ("", no reference): v = v_u + s_img (v_img - v_u) + s_txt (v_full - v_img)."""
    s = model.cfg.sampler
    steps, shift = steps or s.steps, shift or s.shift
    s_txt = s.cfg_text if cfg_text is None else cfg_text
    s_img = s.cfg_image if cfg_image is None else cfg_image
    noise = _check_noise(model, torch.as_tensor(np.asarray(noise, dtype=np.float32)))
    sp = SpecialIds.from_tokenizer(tokenizer)
    enc = lambda p: template.text_ids(tokenizer, p)
    imgs = {"reference": _as_image(image)}
    rb = model.cfg.reference_branch
    full, _ = run_prefix(model, template.split_prefix(template.edit(sp, enc(prompt), True, rb))[0], imgs, True)
    img_only, _ = run_prefix(model, template.split_prefix(template.edit(sp, [], True, rb))[0], imgs, True)
    none, _ = run_prefix(model, template.split_prefix(template.edit(sp, [], False, rb))[0], imgs, True)
    weights = [s_txt, s_img - s_txt, 1.0 - s_img]
    lat, traj = _euler(model, [full, img_only, none], weights, noise, steps, shift, trace)
    L = noise.shape[2] * noise.shape[3]
    return ImageResult(model.ae.decode(lat), lat, full.visual_tokens + L, traj)
