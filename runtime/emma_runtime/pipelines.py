"""EMMA's three tasks stitched from a bundle's components: understand, generate, edit.

The prefix of a request (prompt, images) runs chunk by chunk through the per-branch backbone graphs
into one preallocated KV cache and is computed once; decoding appends one token at a time, and
every denoising step runs only the target image's tokens against the cached prefix.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import template
from .backends import make_backend
from .bundle import Bundle, BundleError
from .images import ImageError, load_image
from .kv_cache import KVCache
from .limits import Limits, RequestError
from .sampling import initial_noise, sample_token, timesteps
from .template import Image, SpecialIds, Text


class NonFiniteError(BundleError):
    """A component produced NaN or Inf (broken weights, an overflow in low precision): the task stops."""


@dataclass
class UnderstandOutput:
    text: str
    token_ids: list[int]
    expert: int
    visual_tokens: int
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class ImageOutput:
    image: np.ndarray  # (1, 3, H, W) in [-1, 1]
    latents: np.ndarray  # (1, C, h, w)
    visual_tokens: int  # image tokens fed to the backbone (prefix images + target)
    timings: dict[str, float] = field(default_factory=dict)


class _Progress:
    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, leave=False)
            except ImportError:
                self.bar = None

    def update(self) -> None:
        if self.bar:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar:
            self.bar.close()


class Pipeline:
    def __init__(self, bundle: Bundle, backend, quiet: bool = True, cfg_mode: str = "batch", limits: Limits | None = None):
        self.bundle = bundle
        self.dims = bundle.manifest.model
        self.backend = backend
        self.quiet = quiet
        # "batch" (the guidance prefixes as one padded batch per step) is the default: measured on the
        # 2-core CPU with the small fp32 bundle, 1.08x faster for generate and 1.05-1.16x for edit than
        # one call per prefix (emma-bench's cfg_batch_vs_sequential), and fewer launches on a GPU.
        if cfg_mode not in ("batch", "sequential"):
            raise ValueError("cfg_mode must be 'batch' or 'sequential'")
        self.cfg_mode = cfg_mode
        self.limits = limits or Limits.for_manifest(bundle.manifest)
        self.tokenizer = bundle.tokenizer()
        try:
            self.special = SpecialIds.from_tokenizer(self.tokenizer)
        except ValueError as e:
            raise BundleError(f"{bundle.root / bundle.manifest.tokenizer[0]}: {e}") from None
        # The cache holds what the backbone graphs emit (fp32, or fp16 for a half-precision bundle).
        try:
            kv = bundle.manifest.components["backbone_und"].tensor("new_keys")
        except BundleError as e:
            raise BundleError(f"{bundle.root}: backbone_und: {e}") from None
        self.kv_dtype = np.dtype(kv.dtype)
        # Every graph is opened now, from the bytes its checksum was computed on: nothing the bundle
        # folder holds later (a graph swapped after load) is ever read.
        self._sessions: dict[str, object] = {name: backend.open(bundle, name) for name in bundle.manifest.components}

    @classmethod
    def load(cls, path: str | Path, backend: str = "ort", provider: str | None = None, quiet: bool = True, cfg_mode: str = "batch",
             limits: Limits | None = None) -> "Pipeline":
        # Paths are checked here; contents are hashed as each graph is opened (once, from the same bytes).
        return cls(Bundle.load(path, check_files=False), make_backend(backend, provider), quiet=quiet, cfg_mode=cfg_mode, limits=limits)

    def session(self, name: str):
        return self._sessions[name]

    def warmup(self) -> None:
        """Sessions open when the pipeline is made; kept for callers that time a warm start."""

    # ---- components -----------------------------------------------------------------------------
    def _run(self, name: str, outputs=None, **inputs):
        return self.session(name).run(inputs, outputs)

    def _finite(self, name: str, a: np.ndarray) -> np.ndarray:
        a_host = self.backend.to_host(a)
        if not np.isfinite(a_host).all():
            raise NonFiniteError(f"{name} produced NaN or Inf: the bundle's weights or this precision overflow; nothing was written")
        return a

    def embed(self, ids: list[int]) -> np.ndarray:
        return self._run("embed_tokens", input_ids=np.asarray([ids], dtype=np.int64))["inputs_embeds"]

    def und_features(self, image: np.ndarray, expert: int | None = None) -> tuple[np.ndarray, int]:
        """Trunk, router, then only the chosen expert (expert 0 is forced for generation and editing)."""
        out = self._run("und_trunk", pixel_values=image)
        chosen = int(np.argmax(out["router_logits"][0])) if expert is None else expert
        feats = self._run(f"und_expert_{chosen}", trunk_hidden=out["trunk_hidden"])["und_features"]
        return feats, chosen

    def latents(self, image: np.ndarray) -> np.ndarray:
        return self._run("ae_encoder", image=image)["latents"]

    def decode(self, latents: np.ndarray) -> np.ndarray:
        self._finite("the denoising loop (backbone_gen / gen_head)", latents)
        return self._finite("ae_decoder", self._run("ae_decoder", latents=latents.astype(np.float32))["image"])

    def und_image_embeds(self, image: np.ndarray) -> tuple[np.ndarray, int]:
        feats, chosen = self.und_features(image)
        return self._run("und_adapter", und_features=feats, latents=self.latents(image))["image_embeds"], chosen

    def reference_embeds(self, image: np.ndarray) -> np.ndarray:
        feats, _ = self.und_features(image, expert=0)
        lat = self.latents(image)
        if self.dims.reference_branch == "und":
            return self._run("und_adapter", und_features=feats, latents=lat)["image_embeds"]
        return self._run("gen_adapter", und_features=feats, latents=lat, timestep=np.zeros(1, np.float32))["image_embeds"]

    def target_embeds(self, x: np.ndarray, t: float) -> np.ndarray:
        # Noise has no understanding features: that slice of the fused input is zero.
        _, _, h, w = x.shape
        zeros = np.zeros((1, h, w, self.dims.und_feature_dim), np.float32)
        return self._run("gen_adapter", und_features=zeros, latents=x, timestep=np.full(1, t, np.float32))["image_embeds"]

    # ---- backbone -------------------------------------------------------------------------------
    def run_chunk(self, cache: KVCache, embeds: np.ndarray, branch: str, causal: bool, commit: bool = True) -> np.ndarray:
        """Runs S new tokens against the cache; their keys/values land in the cache's next slot."""
        B, S, _ = embeds.shape
        P = cache.length
        pos = cache.positions[:, None] + np.arange(S, dtype=np.int64)[None]
        inner = np.tril(np.ones((S, S), bool)) if causal else np.ones((S, S), bool)
        mask = np.concatenate([np.broadcast_to(cache.valid[:, None, :P], (B, S, P)), np.broadcast_to(inner, (B, S, S))], axis=2)
        k_slot, v_slot = cache.slot(S)
        k_past, v_past = cache.past()
        out = self._run(
            f"backbone_{branch}",
            outputs={"new_keys": k_slot, "new_values": v_slot},
            inputs_embeds=embeds, position_ids=pos, attention_mask=mask, past_keys=k_past, past_values=v_past,
        )
        if commit:
            cache.commit(S)
        return out["hidden_states"]

    def prefill(self, segments, images: dict[str, np.ndarray], gen_task: bool, extra: int) -> tuple[KVCache, np.ndarray, dict]:
        """Chunked prefill of the prefix segments into a new B=1 cache with ``extra`` spare slots."""
        embedded = []
        info = {"expert": None, "visual_tokens": 0}
        for seg in segments:
            if isinstance(seg, Text):
                embedded.append((self.embed(list(seg.ids)), "und", True))
            elif seg.role == "input":
                e, info["expert"] = self.und_image_embeds(images["input"])
                info["visual_tokens"] += e.shape[1]
                embedded.append((e, seg.branch, not gen_task))
            elif seg.role == "reference":
                e = self.reference_embeds(images["reference"])
                info["visual_tokens"] += e.shape[1]
                embedded.append((e, seg.branch, not gen_task))
        total = sum(e.shape[1] for e, _, _ in embedded) + extra
        if total > self.dims.max_context:
            raise RequestError(f"request needs {total} positions, more than the model's context of {self.dims.max_context}")
        cache = KVCache.allocate(self.backend, self.dims, 1, total, self.kv_dtype)
        hidden = None
        for e, branch, causal in embedded:
            hidden = self.run_chunk(cache, e, branch, causal)
        return cache, hidden[:, -1:], info

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        return self._finite("lm_head (backbone_und)", self._run("lm_head", hidden_states=hidden)["logits"][0, -1])

    # ---- tasks ----------------------------------------------------------------------------------
    def _prompt_ids(self, prompt: str) -> list[int]:
        return template.text_ids(self.tokenizer, self.limits.prompt(prompt))

    def _image(self, image) -> np.ndarray:
        if isinstance(image, (str, Path, bytes, bytearray)) or hasattr(image, "read"):
            try:
                return load_image(image, self.dims.cell, fit=self.limits.fit)
            except ImageError as e:
                raise RequestError(str(e)) from None
        a = np.asarray(image, dtype=np.float32)
        if a.ndim != 4 or a.shape[:2] != (1, 3):
            raise RequestError(f"image array must be (1, 3, H, W) in [-1, 1], got {a.shape}")
        self.limits.image_size(int(a.shape[2]), int(a.shape[3]))
        if not np.isfinite(a).all():
            raise RequestError("image array holds NaN or Inf")
        return a

    def understand(self, image, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> UnderstandOutput:
        self.bundle.require_task("understand")
        L = self.limits
        max_new_tokens, seed = L.new_tokens(max_new_tokens), L.seed(seed)
        temperature = L.number("temperature", temperature, 0.0, L.max_temperature)
        top_p = L.number("top_p", top_p, 0.0, 1.0, open_lo=True)
        t0 = time.perf_counter()
        img = self._image(image)
        segs = template.understand(self.special, self._prompt_ids(prompt))
        cache, hidden, info = self.prefill(segs, {"input": img}, gen_task=False, extra=max_new_tokens)
        t1 = time.perf_counter()
        rng = np.random.default_rng(seed)
        logits = self.logits(hidden)
        out: list[int] = []
        bar = _Progress(max_new_tokens, "decode", not self.quiet)
        for _ in range(max_new_tokens):
            tok = sample_token(logits, temperature, top_p, rng)
            if tok == self.special.im_end:
                break
            out.append(tok)
            hidden = self.run_chunk(cache, self.embed([tok]), "und", True)
            logits = self.logits(hidden)
            bar.update()
        bar.close()
        t2 = time.perf_counter()
        text = self.tokenizer.decode(out).strip()  # word-merging tokenizers decode with a leading space
        timings = {"prefill_s": t1 - t0, "decode_s": t2 - t1, "tokens": len(out),
                   "decode_per_token_s": (t2 - t1) / max(len(out), 1)}
        return UnderstandOutput(text, out, info["expert"], info["visual_tokens"], timings)

    def _denoise(self, prefixes: list[tuple[KVCache, float]], noise: np.ndarray, steps: int, shift: float) -> np.ndarray:
        """Euler flow matching; the guided velocity is sum_k w_k v_k over the prefixes."""
        _, C, h, w = noise.shape
        L = h * w
        weights = np.array([wk for _, wk in prefixes], np.float32)
        if self.cfg_mode == "batch" and len(prefixes) > 1:
            caches = [KVCache.stack([c for c, _ in prefixes], extra=L)]
        else:
            caches = [c for c, _ in prefixes]
        x = noise.astype(np.float32).copy()
        ts = timesteps(steps, shift)
        bar = _Progress(steps, "denoise", not self.quiet)
        for i in range(steps):
            tokens = self.target_embeds(x, float(ts[i]))
            vs = []
            for cache in caches:
                emb = np.ascontiguousarray(np.broadcast_to(tokens, (cache.batch,) + tokens.shape[1:]))
                hidden = self.run_chunk(cache, emb, "gen", causal=False, commit=False)
                vs.append(self._run("gen_head", hidden_states=hidden)["velocity"])
            v = np.concatenate(vs, axis=0)  # (K, L, C), one row per prefix
            v = np.tensordot(weights, v, axes=1)  # (L, C)
            x = x + np.float32(ts[i + 1] - ts[i]) * v.T.reshape(1, C, h, w)
            bar.update()
        bar.close()
        return x

    def _sampler(self, steps: int | None, shift: float | None, seed: int) -> tuple[int, float, int]:
        """None takes the bundle's default; anything given is checked, never silently replaced."""
        L = self.limits
        steps = L.steps(self.dims.steps if steps is None else steps)
        shift = L.number("shift", self.dims.shift if shift is None else shift, 0.0, L.max_shift, open_lo=True)
        return steps, shift, L.seed(seed)

    def generate(self, prompt: str, height: int | None = None, width: int | None = None, steps: int | None = None,
                 cfg: float | None = None, shift: float | None = None, seed: int = 0, noise: np.ndarray | None = None) -> ImageOutput:
        self.bundle.require_task("generate")
        d, L = self.dims, self.limits
        H, W = L.image_size(d.default_image_size if height is None else height, d.default_image_size if width is None else width)
        steps, shift, seed = self._sampler(steps, shift, seed)
        cfg = L.number("cfg", d.cfg if cfg is None else cfg, -L.max_guidance, L.max_guidance)
        prompt = L.prompt(prompt)
        h, w = H // d.cell, W // d.cell
        noise = initial_noise(seed, d.latent_channels, h, w) if noise is None else noise
        t0 = time.perf_counter()
        prefix = lambda ids: template.split_prefix(template.generate(self.special, ids))[0]
        cond, _, _ = self.prefill(prefix(self._prompt_ids(prompt)), {}, True, h * w)
        prefixes = [(cond, 1.0)]
        if cfg != 1.0:
            uncond, _, _ = self.prefill(prefix([]), {}, True, h * w)
            prefixes = [(cond, cfg), (uncond, 1.0 - cfg)]
        t1 = time.perf_counter()
        lat = self._denoise(prefixes, noise, steps, shift)
        t2 = time.perf_counter()
        img = self.decode(lat)
        t3 = time.perf_counter()
        return ImageOutput(img, lat, h * w, {"prefill_s": t1 - t0, "denoise_s": t2 - t1, "step_s": (t2 - t1) / steps, "decode_s": t3 - t2})

    def edit(self, image, prompt: str, steps: int | None = None, cfg_text: float | None = None, cfg_image: float | None = None,
             shift: float | None = None, seed: int = 0, noise: np.ndarray | None = None) -> ImageOutput:
        self.bundle.require_task("edit")
        d, L = self.dims, self.limits
        steps, shift, seed = self._sampler(steps, shift, seed)
        s_txt = L.number("cfg_text", d.cfg_text if cfg_text is None else cfg_text, -L.max_guidance, L.max_guidance)
        s_img = L.number("cfg_image", d.cfg_image if cfg_image is None else cfg_image, -L.max_guidance, L.max_guidance)
        prompt = L.prompt(prompt)
        img = self._image(image)
        h, w = img.shape[2] // d.cell, img.shape[3] // d.cell
        noise = initial_noise(seed, d.latent_channels, h, w) if noise is None else noise
        t0 = time.perf_counter()
        rb = d.reference_branch
        pre = lambda ids, ref: template.split_prefix(template.edit(self.special, ids, ref, rb))[0]
        images = {"reference": img}
        full, _, info = self.prefill(pre(self._prompt_ids(prompt), True), images, True, h * w)
        img_only, _, _ = self.prefill(pre([], True), images, True, h * w)
        none, _, _ = self.prefill(pre([], False), images, True, h * w)
        t1 = time.perf_counter()
        lat = self._denoise([(full, s_txt), (img_only, s_img - s_txt), (none, 1.0 - s_img)], noise, steps, shift)
        t2 = time.perf_counter()
        out = self.decode(lat)
        t3 = time.perf_counter()
        return ImageOutput(out, lat, info["visual_tokens"] + h * w,
                           {"prefill_s": t1 - t0, "denoise_s": t2 - t1, "step_s": (t2 - t1) / steps, "decode_s": t3 - t2})
