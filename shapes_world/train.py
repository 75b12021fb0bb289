"""Train a small EMMA on the shapes world (issue #10), with the reference model's own classes.

Three stages, one time budget (``minutes``); ``finetune_joint`` and ``finetune_decoder`` continue stage 2 or 3 on a
trained checkpoint:

1. **Autoencoder** (``ae_share`` of the budget): MSE reconstruction of train-split images, small
   batches, a light penalty that keeps the raw latents O(1), residual branches initialised to the
   identity. Then the latent scale is measured and stored as ``scaling_factor`` (scaled latents have
   unit variance, as flow matching from N(0, 1) expects).
2. **Everything else, all three tasks together** (the autoencoder frozen): each batch mixes
   understanding rows (next-token cross-entropy on the answer), generation rows (flow-matching
   velocity MSE on the latent grid, caption dropped with ``p_drop_caption`` for classifier-free
   guidance) and editing rows (reference image + instruction -> target latents; the instruction is
   dropped with ``p_drop_instruction`` and instruction and reference together with ``p_drop_all``,
   the three prefixes of the 3-way guidance). Each row's sequence is built from
   ``emma_runtime.template`` exactly as the pipelines build it, embedded by the model's own modules
   (``vision`` + ``und_adapter`` / ``gen_adapter``, ``embed``, ``target_tokens``), and the whole
   batch runs as ONE forward of the backbone with mixed branches and EMMA's mask rule
   (``full_mask``: causal text, bidirectional images in generation and editing, padding off).
3. **The decoder alone** (``dec_share`` of the budget; 0 by default; ``finetune_decoder`` runs it on
   a trained checkpoint): MSE with the encoder frozen, so the latents everything else was trained on
   do not move, while the decoder wins back the detail the smoothness term cost.

The data stream is ``world.make_example("train", i, seed)`` for i = 0, 1, 2, ...: fresh scenes at
every step, none of them held out. Initialisation (``build_model``), data and noise are drawn from
the seed; with ``ae_steps``/``steps`` given, the schedule is by step count and the run is repeatable
step for step; with only ``minutes``, each stage runs (and anneals its learning rate) by wall clock.

The router is fixed to the versatile expert (the shapes world has no charts or documents), and the
STEM expert is saved as a copy of the trained versatile one, so either route gives the same answer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from emma_runtime import template
from emma_runtime.images import psnr
from emma_runtime.template import Image, SpecialIds, Text

from emma_export.config import EMMAConfig, get_config
from emma_export.model.autoencoder import ResBlock
from emma_export.model.backbone import GEN, UND, full_mask
from emma_export.model.emma import EMMA, build_model
from . import world


@dataclass
class TrainSettings:
    minutes: float = 15.0
    seed: int = 0
    config: str = "shapes"
    ae_share: float = 0.35  # fraction of the budget for the autoencoder
    ae_steps: int | None = None  # fixed step counts (repeatable runs, smoke tests); else by time
    steps: int | None = None
    # small batches, many steps: the 32x autoencoder learns per step, not per image (8 scenes + their
    # shifted copies with the smoothness term on)
    ae_batch: int = 8
    ae_lr: float = 1e-3
    ae_latent_penalty: float = 1e-3  # keeps the raw latents O(1)
    ae_latent_noise: float = 0.0  # if > 0: the decoder sees z + noise * std_c(z) in the second half
    # Translation smoothness: each image is also rendered with its shapes moved by up to ``ae_shift_px``
    # pixels and the latents of the pair are pulled together (weight ``ae_shift_weight``, relative to the
    # latents' variance over the batch, so shrinking every latent together does not pay). Without it the
    # +-2 px jitter of one caption's scenes spreads their scaled latents over 31% (one shape) to 58% (two
    # shapes) of the latents' whole variance (``jitter_share``): flow matching then has to fit hundreds of
    # far-apart modes per caption, and two-shape captions come out as mixtures.
    # At a constant 0.1 the reconstruction stalls near 23 dB (the decoder cannot resolve what the term
    # pulls together), so the weight follows the cosine schedule down to ``ae_shift_floor`` of itself:
    # the latent layout forms early, the last stretch buys back the detail.
    ae_shift_weight: float = 0.1
    ae_shift_floor: float = 0.1
    ae_shift_px: int = 2
    # Decoder-only fine-tune after the joint stage (``dec_share`` of the budget; also on its own, on a
    # trained checkpoint: ``finetune_decoder``). The smoothness term costs detail the encoder still
    # carries; with the encoder frozen the latents, and so every other component, stay exactly as
    # trained, and plain MSE buys the detail back.
    dec_share: float = 0.0
    dec_steps: int | None = None  # fixed step count instead (repeatable runs, smoke tests)
    dec_batch: int = 16
    dec_lr: float = 3e-4
    # if > 0: the decoder sees z + noise * std_c(z), so latents a sampler lands slightly off the
    # encoder's manifold still decode to crisp edges
    dec_latent_noise: float = 0.0
    batch_und: int = 24
    # Questions that bind a colour word to an image region (colour, shape, presence) learn slowest:
    # trained alone they reach ~80% in a minute, at an even share of a mixed batch they sat at
    # chance after four. The structural ones (count, size, position) learn quickly at any share.
    question_weights: dict = field(default_factory=lambda: {"colour": 2.0, "shape": 2.0, "presence": 2.0, "count": 0.5})
    batch_gen: int = 20
    batch_edit: int = 20
    lr: float = 1.5e-3
    weight_decay: float = 0.01
    warmup: int = 30
    fm_weight: float = 1.0
    p_short_caption: float = 0.3  # otherwise the detailed caption (sizes, position)
    p_drop_caption: float = 0.1
    p_drop_instruction: float = 0.1
    p_drop_all: float = 0.1
    measure_n: int = 256  # images for the latent scale and the validation PSNR
    threads: int | None = 2
    log_every: int = 25
    progress: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainReport:
    out: Path
    seconds: float
    ae_seconds: float
    joint_seconds: float
    ae_steps: int
    steps: int
    scaling_factor: float
    ae_val_psnr: float
    history: list[dict] = field(default_factory=list)
    # ``jitter_share`` of one- and two-shape scenes after the autoencoder stage
    jitter_share: dict[str, float] = field(default_factory=dict)
    # the decoder-only stage (``dec_share``); val PSNR after it
    dec_steps: int = 0
    dec_seconds: float = 0.0
    dec_val_psnr: float | None = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        return d


# ---- data -------------------------------------------------------------------------------------


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) images -> (B, 3, H, W) float in [-1, 1] (the runtime's ``to_model``)."""
    a = np.stack(images).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()


class Stream:
    """Fresh train-split examples, ``make_example('train', i, seed)`` for i = 0, 1, ..."""

    def __init__(self, seed: int):
        self.seed = seed
        self.i = 0

    def take(self, n: int) -> list[world.Example]:
        out = [world.make_example("train", self.i + k, self.seed) for k in range(n)]
        self.i += n
        return out


def shifted(scene: world.Scene, px: int, rng: np.random.Generator) -> world.Scene:
    """The scene with every shape moved by up to ``px`` pixels each way (a shape stays put where the move
    would leave the image or make two shapes touch)."""
    shapes = list(scene.shapes)
    for i, sh in enumerate(shapes):
        dx, dy = (int(v) for v in rng.integers(-px, px + 1, size=2))
        moved = shapes.copy()
        moved[i] = dataclasses.replace(sh, cx=sh.cx + dx, cy=sh.cy + dy)
        try:
            world.validate(dataclasses.replace(scene, shapes=tuple(moved)))
        except ValueError:
            continue
        shapes = moved
    return dataclasses.replace(scene, shapes=tuple(shapes))




def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 (the runtime's ``to_uint8``)."""
    return np.round(np.clip((x.detach().permute(0, 2, 3, 1).numpy() + 1.0) * 127.5, 0, 255)).astype(np.uint8)


# ---- schedule ---------------------------------------------------------------------------------


class Clock:
    """Progress in [0, 1] of a stage: by step count when ``steps`` is given, else by wall clock."""

    def __init__(self, seconds: float, steps: int | None):
        self.seconds = max(seconds, 1e-6)
        self.steps = steps
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def progress(self, step: int) -> float:
        if self.steps is not None:
            return min(step / max(self.steps, 1), 1.0)
        return min(self.elapsed() / self.seconds, 1.0)

    def done(self, step: int) -> bool:
        if self.steps is not None:
            return step >= self.steps
        return self.elapsed() >= self.seconds


def lr_at(base: float, step: int, progress: float, warmup: int) -> float:
    warm = min(1.0, (step + 1) / max(warmup, 1))
    return base * warm * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _optimizer(params, lr: float, wd: float) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98)
    )


def _descend(opt: torch.optim.Optimizer, loss: torch.Tensor, params, clip: float) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()


def _ema(prev: float | None, value: float) -> float:
    """The loss shown in the bar and the log: smoothed over ~20 steps."""
    return value if prev is None else 0.95 * prev + 0.05 * value


class _Bar:
    def __init__(self, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(desc=desc, unit="step", dynamic_ncols=True)
            except ImportError:  # pragma: no cover
                self.bar = None

    def update(self, **post) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if post:
                self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in post.items()}, refresh=False)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- stage 1: autoencoder ---------------------------------------------------------------------


def train_autoencoder(model: EMMA, s: TrainSettings, seconds: float, log: Callable[[dict], None]) -> tuple[int, float]:
    ae = model.ae
    ae.train()
    # Residual branches start as the identity (zero RMSNorm gain): the DC-AE shortcuts (space-to-channel
    # averages, channel-repeat upsampling) then make the untrained autoencoder a sensible linear one.
    for m in ae.modules():
        if isinstance(m, ResBlock):
            torch.nn.init.zeros_(m.norm.weight)
    for p in ae.parameters():
        p.requires_grad_(True)
    opt = _optimizer(ae.parameters(), s.ae_lr, 0.0)
    stream = Stream(s.seed * 7 + 1)
    gen = torch.Generator().manual_seed(s.seed * 7 + 2)
    rng = np.random.default_rng(s.seed * 7 + 6)
    clock = Clock(seconds, s.ae_steps)
    bar = _Bar("autoencoder", s.progress)
    step = 0
    ema = None
    while not clock.done(step):
        prog = clock.progress(step)
        for g in opt.param_groups:
            g["lr"] = lr_at(s.ae_lr, step, prog, s.warmup)
        exs = stream.take(s.ae_batch)
        x = to_tensor([e.image for e in exs])
        if s.ae_shift_weight > 0:
            x = torch.cat([x, to_tensor([world.render(shifted(e.scene, s.ae_shift_px, rng)) for e in exs])])
        z = ae.encoder(x)
        zin = z
        if prog >= 0.5 and s.ae_latent_noise > 0:
            std = z.detach().std(dim=(0, 2, 3), keepdim=True)
            zin = z + s.ae_latent_noise * std * torch.randn(z.shape, generator=gen)
        y = ae.decoder(zin)
        # Plain MSE (what PSNR measures): an L1 term's constant-size gradients on the ~90% background
        # pixels drown the shapes' signal and stall training at the "coloured blob" stage.
        rec = F.mse_loss(y, x)
        loss = rec + s.ae_latent_penalty * z.pow(2).mean()
        if s.ae_shift_weight > 0:
            za, zb = z.chunk(2)
            w = s.ae_shift_weight * (s.ae_shift_floor + (1.0 - s.ae_shift_floor) * 0.5 * (1.0 + math.cos(math.pi * prog)))
            loss = loss + w * (za - zb).pow(2).mean() / z.detach().var(dim=0).mean().clamp_min(1e-6)
        _descend(opt, loss, ae.parameters(), 10.0)
        step += 1
        ema = _ema(ema, rec.item())
        bar.update(loss=ema)
        if step % s.log_every == 0:
            log({"stage": "ae", "step": step, "loss": ema, "t": clock.elapsed()})
    bar.close()
    ae.eval()
    for p in ae.parameters():
        p.requires_grad_(False)
    return step, clock.elapsed()


def train_decoder(model: EMMA, s: TrainSettings, seconds: float, log: Callable[[dict], None], stream_seed: int | None = None) -> tuple[int, float]:
    """MSE reconstruction with the encoder frozen: only ``ae.decoder`` moves."""
    ae = model.ae
    ae.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    dec = ae.decoder
    dec.train()
    for p in dec.parameters():
        p.requires_grad_(True)
    opt = _optimizer(dec.parameters(), s.dec_lr, 0.0)
    stream = Stream(s.seed * 7 + 8 if stream_seed is None else stream_seed)
    gen = torch.Generator().manual_seed(stream.seed + 1)
    clock = Clock(seconds, s.dec_steps)
    bar = _Bar("decoder", s.progress)
    step = 0
    ema = None
    while not clock.done(step):
        for g in opt.param_groups:
            g["lr"] = lr_at(s.dec_lr, step, clock.progress(step), s.warmup)
        x = to_tensor([e.image for e in stream.take(s.dec_batch)])
        with torch.no_grad():
            z = ae.encoder(x)
            if s.dec_latent_noise > 0:
                z = z + s.dec_latent_noise * z.std(dim=(0, 2, 3), keepdim=True) * torch.randn(z.shape, generator=gen)
        rec = F.mse_loss(dec(z), x)
        _descend(opt, rec, dec.parameters(), 10.0)
        step += 1
        ema = _ema(ema, rec.item())
        bar.update(loss=ema)
        if step % s.log_every == 0:
            log({"stage": "decoder", "step": step, "loss": ema, "t": clock.elapsed()})
    bar.close()
    dec.eval()
    for p in dec.parameters():
        p.requires_grad_(False)
    return step, clock.elapsed()


@torch.no_grad()
def measure_latents(model: EMMA, seed: int, n: int = 256) -> tuple[float, float]:
    """(1 / std of the raw latents over ``n`` train images, reconstruction PSNR on ``n`` val images)."""
    ex = world.dataset("train", n, seed=seed + 12345)
    z = model.ae.encoder(to_tensor([e.image for e in ex]))
    scale = float(1.0 / z.std())
    val = world.dataset("val", n, seed=seed)
    x = to_tensor([e.image for e in val])
    y = model.ae.decoder(model.ae.encoder(x))
    a, b = to_uint8(x), to_uint8(y)
    return scale, float(np.mean([psnr(a[i], b[i], cap=100.0) for i in range(len(val))]))


@torch.no_grad()
def jitter_share(model: EMMA, n_shapes: int, scenes: int = 12, copies: int = 32, seed: int = 3) -> float:
    """How much of the scaled latents' variance (1 by construction) the world's position jitter alone
    makes: val scenes of ``n_shapes`` shapes, each re-drawn ``copies`` times with fresh jitter around the
    same anchors (the same caption), the per-element latent variance over the copies, averaged.

    This is the spread flow matching must fit for ONE caption; a large share means the caption's images
    lie far apart in latent space (see ``TrainSettings.ae_shift_weight``)."""
    rng = np.random.default_rng(seed)
    chosen = [e for e in world.dataset("val", 16 * scenes, seed=seed) if len(e.scene.shapes) == n_shapes][:scenes]
    shares = []
    for e in chosen:
        images = []
        for _ in range(copies):
            shapes = tuple(
                dataclasses.replace(sh, cx=c[0], cy=c[1])
                for sh, c in zip(
                    e.scene.shapes,
                    (world.anchor_centre(p, e.scene.width, e.scene.height, rng) for p in world.scene_positions(e.scene)),
                )
            )
            images.append(world.render(dataclasses.replace(e.scene, shapes=shapes)))
        shares.append(float(model.ae.encode(to_tensor(images)).var(dim=0).mean()))
    return float(np.mean(shares))


def set_scaling_factor(model: EMMA, scale: float) -> EMMA:
    ae_cfg = dataclasses.replace(model.cfg.ae, scaling_factor=float(scale))
    model.cfg = dataclasses.replace(model.cfg, ae=ae_cfg)
    model.ae.cfg = ae_cfg
    return model


# ---- stage 2: the three tasks together --------------------------------------------------------


@dataclass
class Row:
    segments: list  # template segments
    task: str  # "und" | "gen" | "edit"
    bidirectional: bool
    answer: tuple[int, ...] = ()  # understanding: answer ids + im_end
    image: int = -1  # index into the batch's und / reference images
    target: int = -1  # index into the batch's target latents


class BatchBuilder:
    """Rows of the three tasks -> one padded mixed-branch batch for ``model.llm``."""

    def __init__(self, model: EMMA, tokenizer, s: TrainSettings, rng: random.Random, gen: torch.Generator):
        self.model = model
        self.tok = tokenizer
        self.sp = SpecialIds.from_tokenizer(tokenizer)
        self.s = s
        self.rng = rng
        self.gen = gen

    def ids(self, text: str) -> list[int]:
        return template.text_ids(self.tok, text)

    def rows(self, und: list[world.Example], gen: list[world.Example], edit: list[world.Example]):
        s, rng, sp = self.s, self.rng, self.sp
        rows: list[Row] = []
        und_images, ref_images, target_images = [], [], []
        for ex in und:
            by_type: dict[str, list[world.QA]] = {}
            for qa in ex.qas:
                by_type.setdefault(qa.qtype, []).append(qa)
            types = sorted(by_type)
            qtype = rng.choices(types, weights=[s.question_weights.get(t, 1.0) for t in types])[0]
            qa = rng.choice(by_type[qtype])
            segs = template.understand(sp, self.ids(qa.question))
            rows.append(Row(segs, "und", False, tuple(self.ids(qa.answer)) + (sp.im_end,), image=len(und_images)))
            und_images.append(ex.image)
        for ex in gen:
            text = ex.caption if rng.random() < s.p_short_caption else ex.caption_detailed
            if rng.random() < s.p_drop_caption:
                text = ""
            segs = template.generate(sp, self.ids(text))
            rows.append(Row(segs, "gen", True, target=len(target_images)))
            target_images.append(ex.image)
        for ex in edit:
            pair = rng.choice(list(ex.edits))
            u = rng.random()
            if u < s.p_drop_all:
                segs = template.edit(sp, [], False, self.model.cfg.reference_branch)
            elif u < s.p_drop_all + s.p_drop_instruction:
                segs = template.edit(sp, [], True, self.model.cfg.reference_branch)
            else:
                segs = template.edit(sp, self.ids(pair.instruction), True, self.model.cfg.reference_branch)
            has_ref = any(isinstance(g, Image) and g.role == "reference" for g in segs)
            rows.append(Row(segs, "edit", True, image=len(ref_images) if has_ref else -1, target=len(target_images)))
            if has_ref:
                ref_images.append(ex.image)
            target_images.append(world.render(pair.target_scene))
        return rows, und_images, ref_images, target_images

    def forward(self, rows: list[Row], und_images, ref_images, target_images) -> dict[str, torch.Tensor]:
        """One forward of the whole batch; returns the losses."""
        m = self.model
        nu, nr = len(und_images), len(ref_images)
        with torch.no_grad():  # the autoencoder is frozen
            lat = m.ae.encode(to_tensor(und_images + ref_images + target_images))
        lat_und, lat_ref, x0 = lat[:nu], lat[nu : nu + nr], lat[nu + nr :]
        und_tok = ref_tok = None
        if nu + nr:
            feats, _ = m.vision(to_tensor(und_images + ref_images), expert=0)
            if nu:
                und_tok = m.und_adapter(feats[:nu], lat_und)
            if nr:
                if m.cfg.reference_branch == "und":
                    ref_tok = m.und_adapter(feats[nu:], lat_ref)
                else:
                    ref_tok = m.gen_adapter(feats[nu:], lat_ref, torch.zeros(nr))
        # flow matching: x_t = (1 - t) x0 + t noise, v = noise - x0; t on the sampler's shifted grid
        nt = x0.shape[0]
        noise = torch.randn(x0.shape, generator=self.gen)
        u = torch.rand(nt, generator=self.gen)
        sh = m.cfg.sampler.shift
        t = sh * u / (1.0 + (sh - 1.0) * u)
        xt = (1.0 - t)[:, None, None, None] * x0 + t[:, None, None, None] * noise
        v_target = (noise - x0).flatten(2).transpose(1, 2)  # (N, L, C), row-major over the grid
        tgt_tok = m.target_tokens(xt, t) if nt else None

        # text: one embedding call for every text segment (and answer) of the batch
        texts: list[tuple[int, ...]] = []
        for r in rows:
            texts += [g.ids for g in r.segments if isinstance(g, Text)]
            if r.answer:
                texts.append(r.answer)
        flat = torch.tensor([i for ids in texts for i in ids], dtype=torch.long)
        emb = m.embed(flat[None])[0]
        text_emb = list(torch.split(emb, [len(ids) for ids in texts]))

        seqs, branches, imgs, targets_ce, fm_pos = [], [], [], [], []
        k = 0
        for r in rows:
            parts, br, im, ce = [], [], [], []
            n = 0
            for si, g in enumerate(list(r.segments) + ([Text(r.answer)] if r.answer else [])):
                if isinstance(g, Text):
                    e = text_emb[k]
                    k += 1
                    b, iid = UND, -1
                elif g.role == "input":
                    e, b, iid = und_tok[r.image], (UND if g.branch == "und" else GEN), si
                elif g.role == "reference":
                    e, b, iid = ref_tok[r.image], (UND if g.branch == "und" else GEN), si
                else:  # target
                    e, b, iid = tgt_tok[r.target], GEN, si
                    fm_pos.append((len(seqs), n, r.target))
                parts.append(e)
                br += [b] * e.shape[0]
                im += [iid] * e.shape[0]
                n += e.shape[0]
            if r.answer:
                # position p predicts token p + 1: the answer (and im_end) from <|assistant|> on
                start = n - len(r.answer)
                ce = [(start - 1 + j, a) for j, a in enumerate(r.answer)]
            seqs.append(torch.cat(parts))
            branches.append(br)
            imgs.append(im)
            targets_ce.append(ce)
        B, S = len(seqs), max(x.shape[0] for x in seqs)
        D = m.cfg.llm.hidden_size
        x = torch.zeros(B, S, D)
        branch = torch.full((B, S), UND, dtype=torch.long)
        img = torch.full((B, S), -1, dtype=torch.long)
        valid = torch.zeros(B, S, dtype=torch.bool)
        for b, (e, br, im) in enumerate(zip(seqs, branches, imgs)):
            L = e.shape[0]
            x[b, :L] = e
            branch[b, :L] = torch.tensor(br)
            img[b, :L] = torch.tensor(im)
            valid[b, :L] = True
        bidir = torch.tensor([r.bidirectional for r in rows])
        allow = torch.where(
            bidir[:, None, None], full_mask(img, True, valid), full_mask(img, False, valid)
        )
        pos = torch.arange(S)[None].expand(B, S)
        hidden, _ = m.llm(x, pos, branch, allow)

        out: dict[str, torch.Tensor] = {}
        ce_idx = [(b, p, a) for b, ce in enumerate(targets_ce) for p, a in ce]
        if ce_idx:
            bi = torch.tensor([c[0] for c in ce_idx])
            pi = torch.tensor([c[1] for c in ce_idx])
            ai = torch.tensor([c[2] for c in ce_idx])
            logits = m.lm_head(hidden[bi, pi])
            out["ce"] = F.cross_entropy(logits, ai)
            with torch.no_grad():
                out["tok_acc"] = (logits.argmax(-1) == ai).float().mean()
        if fm_pos:
            L = x0.shape[2] * x0.shape[3]
            rows_h = torch.stack([hidden[b, p : p + L] for b, p, _ in fm_pos])
            v = m.gen_head(rows_h)
            vt = v_target[torch.tensor([ti for _, _, ti in fm_pos])]
            task = [rows[b].task for b, _, _ in fm_pos]
            per = ((v - vt) ** 2).mean(dim=(1, 2))
            out["fm"] = per.mean()
            for name in ("gen", "edit"):
                sel = torch.tensor([tk == name for tk in task])
                if sel.any():
                    out[f"fm_{name}"] = per[sel].mean().detach()
        return out


def _trainable(model: EMMA) -> list[torch.nn.Parameter]:
    skip = {id(p) for p in model.ae.parameters()}
    skip |= {id(p) for p in model.vision.trunk.router.parameters()}
    for e in model.vision.experts[1:]:
        skip |= {id(p) for p in e.parameters()}
    return [p for p in model.parameters() if id(p) not in skip]


def init_adapters_for_scratch(model: EMMA) -> None:
    """Adapters (and the timestep MLP) at std 1/sqrt(fan_in) instead of the LLM's 0.02.

    At 0.02 a 128-wide adapter's output is ~0.05 per channel against the fixed 2D sin-cos positions'
    ~0.7: the image content drowns in the position code, and training collapses it further (a linear
    probe read a single shape's colour from the trained adapter's tokens 52% of the time, from the
    features going in 94-97%). Upstream-initialised models keep 0.02; this is for training from scratch.
    """
    gen = torch.Generator().manual_seed(1234)
    for ad in (model.und_adapter, model.gen_adapter):
        for mod in ad.modules():
            if isinstance(mod, torch.nn.Linear):
                with torch.no_grad():
                    mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * mod.weight.shape[1] ** -0.5)
                    mod.bias.zero_()


def fix_router(model: EMMA) -> None:
    """Every image to expert 0 (versatile): constant router logits (1, 0, ...)."""
    r = model.vision.trunk.router
    with torch.no_grad():
        r.fc2.weight.zero_()
        r.fc2.bias.zero_()
        r.fc2.bias[0] = 1.0
    for p in r.parameters():
        p.requires_grad_(False)


def copy_versatile_expert(model: EMMA) -> None:
    with torch.no_grad():
        for e in model.vision.experts[1:]:
            e.load_state_dict(model.vision.experts[0].state_dict())


class WeightAverage:
    """An exponential moving average of the trainable weights (``decay`` per step, warmed up over the
    first steps): the last step's weights carry the last few batches' noise, which a sampler integrates
    over every step. On the shipped checkpoint's fine-tune the two measured within 2 points of each
    other on val (generation 0.83 / 0.81, editing 0.81 / 0.83, n=100)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params = params
        self.decay = decay
        self.avg = [p.detach().clone() for p in params]
        self.n = 0

    @torch.no_grad()
    def update(self) -> None:
        self.n += 1
        d = min(self.decay, (1.0 + self.n) / (10.0 + self.n))
        for a, p in zip(self.avg, self.params):
            a.lerp_(p.detach(), 1.0 - d)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for a, p in zip(self.avg, self.params):
            p.copy_(a)


def train_joint(model: EMMA, tokenizer, s: TrainSettings, seconds: float, log: Callable[[dict], None],
                stream_seed: int | None = None, average: float = 0.0,
                keep_last: Callable[[EMMA], None] | None = None) -> tuple[int, float]:
    """The three tasks together. ``stream_seed`` (a continued run) draws scenes, rows and noise the first
    run did not; ``average`` > 0 leaves the model holding the EMA of its weights at that decay, after
    handing the last step's weights to ``keep_last``."""
    params = _trainable(model)
    for p in params:
        p.requires_grad_(True)
    opt = _optimizer(params, s.lr, s.weight_decay)
    base = s.seed * 7 + 3 if stream_seed is None else stream_seed
    stream = Stream(base)
    builder = BatchBuilder(model, tokenizer, s, random.Random(base + 1), torch.Generator().manual_seed(base + 2))
    wa = WeightAverage(params, average) if average > 0 else None
    model.train()
    model.ae.eval()
    clock = Clock(seconds, s.steps)
    bar = _Bar("und+gen+edit", s.progress)
    step = 0
    ema: dict[str, float] = {}
    while not clock.done(step):
        for g in opt.param_groups:
            g["lr"] = lr_at(s.lr, step, clock.progress(step), s.warmup)
        exs = stream.take(s.batch_und + s.batch_gen + s.batch_edit)
        und, gen, edit = exs[: s.batch_und], exs[s.batch_und : s.batch_und + s.batch_gen], exs[s.batch_und + s.batch_gen :]
        losses = builder.forward(*builder.rows(und, gen, edit))
        loss = losses.get("ce", torch.zeros(())) + s.fm_weight * losses.get("fm", torch.zeros(()))
        _descend(opt, loss, params, 1.0)
        if wa is not None:
            wa.update()
        step += 1
        for k_, v_ in losses.items():
            ema[k_] = _ema(ema.get(k_), float(v_.detach()))
        bar.update(**{k_: ema[k_] for k_ in ("ce", "tok_acc", "fm_gen", "fm_edit") if k_ in ema})
        if step % s.log_every == 0:
            log({"stage": "joint", "step": step, **ema, "t": clock.elapsed()})
    bar.close()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if wa is not None:
        if keep_last is not None:
            keep_last(model)
        wa.copy_to_model()
    return step, clock.elapsed()


# ---- entry point ------------------------------------------------------------------------------


def train(out: str | Path, settings: TrainSettings | None = None, cfg: EMMAConfig | None = None, echo: Callable[[str], None] = print) -> TrainReport:
    """Train and write ``out/model.safetensors`` (fp16), ``tokenizer.json``, ``config.json`` and
    ``train.json`` (settings, step counts, loss history)."""
    from emma_export.tokenizer import word_merging_tokenizer
    from emma_export.weights.checkpoint import save_checkpoint

    s = settings or TrainSettings()
    out = Path(out)
    if s.threads:
        torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    cfg = cfg or get_config(s.config)
    model = build_model(cfg, seed=s.seed, zero_gen_head=True)
    init_adapters_for_scratch(model)
    fix_router(model)
    tok = word_merging_tokenizer(world.vocabulary(), cfg.llm.vocab_size)
    history, log = _logger(s, echo)

    t0 = time.perf_counter()
    total = s.minutes * 60.0
    ae_steps, ae_s = train_autoencoder(model, s, total * s.ae_share, log)
    scale, val_psnr = measure_latents(model, s.seed, s.measure_n)
    set_scaling_factor(model, scale)
    jitter = {f"{k}_shape": jitter_share(model, k, scenes=4 if s.measure_n < 64 else 12) for k in (1, 2)}
    echo(
        f"autoencoder: {ae_steps} steps in {ae_s:.0f} s, val PSNR {val_psnr:.2f} dB, scaling_factor {scale:.4f}, "
        f"jitter share of the latent variance {jitter['1_shape']:.3f} (one shape) / {jitter['2_shape']:.3f} (two)"
    )
    remaining = max(total * (1.0 - s.dec_share) - (time.perf_counter() - t0), 1.0)
    steps, joint_s = train_joint(model, tok, s, remaining, log)
    last = next((h for h in reversed(history) if h.get("stage") == "joint"), {})
    echo(f"joint: {steps} steps in {joint_s:.0f} s " + "  ".join(f"{k}={v:.4f}" for k, v in last.items() if k not in ("stage", "step", "t")))
    copy_versatile_expert(model)
    dec_steps, dec_s, dec_psnr = 0, 0.0, None
    if s.dec_share > 0 or s.dec_steps:
        dec_steps, dec_s = train_decoder(model, s, max(total - (time.perf_counter() - t0), 1.0), log)
        dec_psnr = measure_latents(model, s.seed, s.measure_n)[1]
        echo(f"decoder: {dec_steps} steps in {dec_s:.0f} s, val PSNR {val_psnr:.2f} -> {dec_psnr:.2f} dB")

    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, out / "model.safetensors", dtype=torch.float16)
    tok.save(str(out / "tokenizer.json"))
    (out / "config.json").write_text(model.cfg.to_json() + "\n")
    _write_world(out)
    rep = TrainReport(out, time.perf_counter() - t0, ae_s, joint_s, ae_steps, steps, scale, val_psnr, history, jitter,
                      dec_steps, dec_s, dec_psnr)
    (out / "train.json").write_text(
        json.dumps({"settings": s.to_dict(), **{k: v for k, v in rep.to_dict().items() if k != "out"}}, indent=1) + "\n"
    )
    return rep


# ---- continuing a trained checkpoint ----------------------------------------------------------


def _load_trained(src: Path, s: TrainSettings) -> EMMA:
    from emma_export.weights.checkpoint import load_checkpoint

    if s.threads:
        torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    return load_checkpoint(src / "model.safetensors").float().eval()


def _logger(s: TrainSettings, echo: Callable[[str], None]) -> tuple[list[dict], Callable[[dict], None]]:
    history: list[dict] = []

    def log(rec: dict) -> None:
        history.append(rec)
        if not s.progress:
            echo("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))

    return history, log


def _save_trained(model: EMMA, src: Path, folder: Path) -> None:
    """fp16 weights, and the source's tokenizer and config beside them."""
    import shutil

    from emma_export.weights.checkpoint import save_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, folder / "model.safetensors", dtype=torch.float16)
    if src.resolve() != folder.resolve():
        for name in ("tokenizer.json", "config.json"):
            shutil.copyfile(src / name, folder / name)
    _write_world(folder)


def _write_world(folder: Path) -> None:
    """The checkpoint names its world: builds calibrate on shapes and report the world's task figures."""
    from emma_export.worlds import WORLD_FILE

    (folder / WORLD_FILE).write_text(json.dumps({"world": "shapes"}) + "\n")


def _past_records(src: Path) -> dict:
    return json.loads((src / "train.json").read_text()) if (src / "train.json").exists() else {}


def _append_record(meta: dict, out: Path, key: str, rec: dict, history: list[dict]) -> None:
    """The source's train.json (``meta``) with ``rec`` appended under ``key`` and the stage's history,
    written atomically to ``out``."""
    meta.setdefault(key, []).append(rec)
    meta.setdefault("history", []).extend(history)
    tmp = out / "train.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    tmp.replace(out / "train.json")


def finetune_decoder(src: str | Path, out: str | Path, settings: TrainSettings, echo: Callable[[str], None] = print) -> dict:
    """The decoder-only stage on a trained checkpoint (``settings.minutes`` of it): ``out`` gets the
    checkpoint with the new decoder, the same tokenizer and config, and ``train.json`` with a
    ``decoder_finetune`` record (settings, steps, val PSNR before and after) and the stage's history.
    Every other weight is copied bit for bit (fp16 in, fp16 out)."""
    s = settings
    src, out = Path(src), Path(out)
    model = _load_trained(src, s)
    _, before = measure_latents(model, s.seed, s.measure_n)
    history, log = _logger(s, echo)
    # a stream the first run's stages did not draw from (different seed offset)
    steps, secs = train_decoder(model, s, s.minutes * 60.0, log, stream_seed=s.seed * 7 + 9)
    _, after = measure_latents(model, s.seed, s.measure_n)
    echo(f"decoder: {steps} steps in {secs:.0f} s, val PSNR {before:.2f} -> {after:.2f} dB")
    _save_trained(model, src, out)
    rec = {"settings": {"minutes": s.minutes, "seed": s.seed, "dec_batch": s.dec_batch, "dec_lr": s.dec_lr,
                        "dec_latent_noise": s.dec_latent_noise},
           "steps": steps, "seconds": secs, "val_psnr_before": before, "val_psnr_after": after}
    _append_record(_past_records(src), out, "decoder_finetune", rec, history)
    return rec


def finetune_joint(src: str | Path, out: str | Path, settings: TrainSettings, average: float = 0.0,
                   echo: Callable[[str], None] = print) -> dict:
    """The joint stage continued on a trained checkpoint for ``settings.minutes`` (a fresh warm-up and
    cosine schedule from ``settings.lr``, the batch mix of ``settings``, a data stream the first run
    did not draw): the autoencoder, and so every latent and ``scaling_factor``, stay bit for bit.
    ``average`` > 0 saves the EMA of the weights at that decay instead of the last step's (those go to
    ``out/last/``, so the two can be compared on val). ``out`` gets the checkpoint, the same tokenizer
    and config, and ``train.json`` with a ``joint_finetune`` record and the stage's history appended."""
    from tokenizers import Tokenizer

    s = settings
    src, out = Path(src), Path(out)
    model = _load_trained(src, s)
    fix_router(model)
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    history, log = _logger(s, echo)

    def save(m: EMMA, folder: Path) -> None:
        copy_versatile_expert(m)
        _save_trained(m, src, folder)

    # a stream neither the first run's stages (+3, the decoder fine-tune +9) nor an earlier continuation drew
    meta = _past_records(src)
    n_done = len(meta.get("joint_finetune", []))
    steps, secs = train_joint(model, tok, s, s.minutes * 60.0, log, stream_seed=s.seed * 7 + 11 + 3 * n_done, average=average,
                              keep_last=lambda m: save(m, out / "last"))
    last = next((h for h in reversed(history) if h.get("stage") == "joint"), {})
    final = {k: v for k, v in last.items() if k not in ("stage", "step", "t")}
    echo(f"joint fine-tune: {steps} steps in {secs:.0f} s " + "  ".join(f"{k}={v:.4f}" for k, v in final.items()))
    save(model, out)
    rec = {"settings": {"minutes": s.minutes, "seed": s.seed, "lr": s.lr, "batch_und": s.batch_und, "batch_gen": s.batch_gen,
                        "batch_edit": s.batch_edit, "average": average, "steps": s.steps},
           "steps": steps, "seconds": secs, "final": final}
    _append_record(meta, out, "joint_finetune", rec, [{**h, "stage": "joint_finetune"} for h in history])
    return rec
