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

from . import names, template
from .backends import make_backend
from .bundle import Bundle, BundleError
from .images import ImageError, load_image
from .kv_cache import KVCache, dequantize, storage_dtype
from .limits import Limits, RequestError
from .sampling import initial_noise, sample_token, timesteps
from .template import Image, SpecialIds, Text
from .trace import StepTrace


@dataclass(frozen=True)
class _Embedded:
    """An image already through its encoders and adapter (what ``prefill`` would compute from it)."""

    embeds: np.ndarray


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
        # The cache holds what the backbone graphs take: float32 or float16, or 8-bit (int8, FP8 bytes
        # as uint8) for a bundle built with --kv-cache int8|fp8 (the graphs quantize and dequantize).
        try:
            und = bundle.manifest.components[names.BACKBONE_UND] if names.BACKBONE_UND in bundle.manifest.components \
                else bundle.manifest.components[names.BACKBONE_GEN]
            kv = und.tensor(names.past_kv(0)[0])
        except (BundleError, KeyError) as e:
            raise BundleError(f"{bundle.root}: backbone: {e}") from None
        self.kv_type = kv.dtype  # the manifest's name (float8e4m3fn has no numpy dtype)
        self.kv_dtype = storage_dtype(kv.dtype)
        self.attention = {n: c.attention for n, c in bundle.manifest.components.items() if n in names.BACKBONES}
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

    # ---- components -----------------------------------------------------------------------------
    def _run(self, name: str, outputs=None, **inputs):
        return self.session(name).run(inputs, outputs)

    def _finite(self, name: str, a: np.ndarray) -> np.ndarray:
        a_host = self.backend.to_host(a)
        if not np.isfinite(a_host).all():
            raise NonFiniteError(f"{name} produced NaN or Inf: the bundle's weights or this precision overflow; nothing was written")
        return a

    def embed(self, ids: list[int]) -> np.ndarray:
        return self._run(names.EMBED_TOKENS, input_ids=np.asarray([ids], dtype=np.int64))["inputs_embeds"]

    def und_features(self, image: np.ndarray, expert: int | None = None) -> tuple[np.ndarray, int]:
        """Trunk, router, then only the chosen expert (expert 0 is forced for generation and editing)."""
        out = self._run(names.UND_TRUNK, pixel_values=image)
        chosen = int(np.argmax(out["router_logits"][0])) if expert is None else expert
        feats = self._run(names.expert(chosen), trunk_hidden=out["trunk_hidden"])["und_features"]
        return feats, chosen

    def latents(self, image: np.ndarray) -> np.ndarray:
        return self._run(names.AE_ENCODER, image=image)["latents"]

    def decode(self, latents: np.ndarray) -> np.ndarray:
        self._finite("the denoising loop (backbone_gen / gen_head)", latents)
        return self._finite("ae_decoder", self._run(names.AE_DECODER, latents=latents.astype(np.float32))["image"])

    def und_image_embeds(self, image: np.ndarray) -> tuple[np.ndarray, int]:
        feats, chosen = self.und_features(image)
        return self._run(names.UND_ADAPTER, und_features=feats, latents=self.latents(image))["image_embeds"], chosen

    def reference_embeds(self, image) -> np.ndarray:
        if isinstance(image, _Embedded):  # computed once for every guidance prefix of an edit
            return image.embeds
        feats, _ = self.und_features(image, expert=0)
        lat = self.latents(image)
        if self.dims.reference_branch == "und":
            return self._run(names.UND_ADAPTER, und_features=feats, latents=lat)["image_embeds"]
        return self._run(names.GEN_ADAPTER, und_features=feats, latents=lat, timestep=np.zeros(1, np.float32))["image_embeds"]

    def target_embeds(self, x: np.ndarray, t: float) -> np.ndarray:
        # Noise has no understanding features: that slice of the fused input is zero.
        _, _, h, w = x.shape
        zeros = np.zeros((1, h, w, self.dims.und_feature_dim), np.float32)
        return self._run(names.GEN_ADAPTER, und_features=zeros, latents=x, timestep=np.full(1, t, np.float32))["image_embeds"]

    # ---- backbone -------------------------------------------------------------------------------
    def run_chunk(self, cache: KVCache, embeds: np.ndarray, branch: str, causal: bool, commit: bool = True,
                  chunk_valid: np.ndarray | None = None) -> np.ndarray:
        """Runs S new tokens against the cache; with ``commit`` their keys/values land at each row's
        length. ``chunk_valid`` (B, S): a right-padded chunk (the server's batched prefill): row b has
        ``chunk_valid[b].sum()`` real tokens, then padding that nothing attends to and that is never
        counted in the row's length (always committed)."""
        B, S, _ = embeds.shape
        counts = np.full(B, S, np.int64) if chunk_valid is None else chunk_valid.sum(axis=1).astype(np.int64)
        if commit or chunk_valid is not None:
            cache.check_room(counts)
        pos = cache.positions[:, None] + np.arange(S, dtype=np.int64)[None]
        name = names.backbone(branch)
        if self.attention[name] == names.ATTENTION_GQA:
            if not causal or not commit:
                raise ValueError(f"{name} is a gqa graph: it runs causal chunks that are committed")
            if B > 1 and S > 1 and cache.lengths.any():
                raise ValueError(f"{name} is a gqa graph: a batch of multi-token chunks must start from an empty cache")
            # The graph writes each row's chunk at its length, into the very buffers it reads.
            out = self._run(name, outputs=cache.presents, inputs_embeds=embeds,  # RoPE positions: the slots
                            seqlens_k=(cache.lengths + counts - 1).astype(np.int32),
                            total_sequence_length=np.array(cache.length + S, np.int32), **cache.feeds)
            cache.commit(counts)
            return out["hidden_states"]
        C = cache.capacity
        inner = np.tril(np.ones((S, S), bool)) if causal else np.ones((S, S), bool)
        inner = np.broadcast_to(inner, (B, S, S)) if chunk_valid is None else inner[None] & chunk_valid[:, None, :]
        mask = np.concatenate([np.broadcast_to(cache.valid[:, None, :], (B, S, C)), inner], axis=2)
        out = self._run(name, inputs_embeds=embeds, position_ids=pos, attention_mask=mask, **cache.feeds)
        if commit or chunk_valid is not None:
            cache.write(out, counts)
            cache.commit(counts)
        return out["hidden_states"]

    def prefill(self, segments, images: dict[str, np.ndarray], gen_task: bool, extra: int) -> tuple[KVCache, np.ndarray, dict]:
        """Chunked prefill of the prefix segments into a new B=1 cache. ``extra``: the tokens that will
        follow (counted against the model's context); an understanding request's decoded tokens are
        committed, so it gets room for them; a denoising target never is, so a generation gets none."""
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
        cache = KVCache.allocate(self.backend, self.dims, 1, total - (extra if gen_task else 0), self.kv_dtype)
        hidden = None
        for e, branch, causal in embedded:
            hidden = self.run_chunk(cache, e, branch, causal)
        return cache, hidden[:, -1:], info

    def velocity(self, cache: KVCache, target: np.ndarray) -> np.ndarray:
        """The Gen head's velocity for the noisy target's tokens against each cache row's prefix (the
        target attends to itself bidirectionally and is not committed: every step replaces it)."""
        hidden = self.run_chunk(cache, target, "gen", causal=False, commit=False)
        return self._run(names.GEN_HEAD, hidden_states=hidden)["velocity"]

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        return self._finite("lm_head (backbone_und)", self._run(names.LM_HEAD, hidden_states=hidden)["logits"][0, -1])

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

    def understand(self, image, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                   trace: StepTrace | None = None) -> UnderstandOutput:
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
        if trace is not None:
            trace.add_logits(logits)
            if trace.keep_kv:
                trace.add_kv(*self._cache_on_host(cache))
        out: list[int] = []
        bar = _Progress(max_new_tokens, "decode", not self.quiet)
        for _ in range(max_new_tokens):
            tok = sample_token(logits, temperature, top_p, rng)
            if tok == self.special.im_end:
                break
            out.append(tok)
            hidden = self.run_chunk(cache, self.embed([tok]), "und", True)
            logits = self.logits(hidden)
            if trace is not None:
                trace.add_logits(logits)
                if trace.keep_kv:
                    trace.add_kv(*self._cache_on_host(cache))
            bar.update()
        bar.close()
        t2 = time.perf_counter()
        text = self.tokenizer.decode(out).strip()  # word-merging tokenizers decode with a leading space
        timings = {"prefill_s": t1 - t0, "decode_s": t2 - t1, "tokens": len(out),
                   "decode_per_token_s": (t2 - t1) / max(len(out), 1)}
        return UnderstandOutput(text, out, info["expert"], info["visual_tokens"], timings)

    def _cache_on_host(self, cache: KVCache):
        """(length, layers, batch, kv_heads, head_dim) keys and values (StepTrace's layout): what the cache
        holds, as float32 (an 8-bit cache dequantized with its per-layer scales)."""
        k, v = cache.to_host()
        n = cache.length
        kv = self.bundle.manifest.kv_cache
        if kv is not None and kv.quantized:
            k = np.stack([dequantize(k[i], kv.key_scales[i], kv.dtype) for i in range(len(k))])
            v = np.stack([dequantize(v[i], kv.value_scales[i], kv.dtype) for i in range(len(v))])
        return k[:, :, :, :n].transpose(3, 0, 1, 2, 4), v[:, :, :, :n].transpose(3, 0, 1, 2, 4)

    def _denoise(self, prefixes: list[tuple[KVCache, float]], noise: np.ndarray, steps: int, shift: float,
                 trace: StepTrace | None = None) -> np.ndarray:
        """Euler flow matching; the guided velocity is sum_k w_k v_k over the prefixes."""
        _, C, h, w = noise.shape
        weights = np.array([wk for _, wk in prefixes], np.float32)
        if self.cfg_mode == "batch" and len(prefixes) > 1:
            caches = [KVCache.stack([c for c, _ in prefixes])]
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
                vs.append(self.velocity(cache, emb))
            v = np.concatenate(vs, axis=0)  # (K, L, C), one row per prefix
            v = np.tensordot(weights, v, axes=1).T.reshape(1, C, h, w)  # guided velocity
            x = x + np.float32(ts[i + 1] - ts[i]) * v
            if trace is not None:
                trace.add_step(float(ts[i]), v, x)
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
                 cfg: float | None = None, shift: float | None = None, seed: int = 0, noise: np.ndarray | None = None,
                 trace: StepTrace | None = None) -> ImageOutput:
        self.bundle.require_task("generate")
        d, L = self.dims, self.limits
        H, W = L.image_size(d.default_image_size if height is None else height, d.default_image_size if width is None else width)
        steps, shift, seed = self._sampler(steps, shift, seed)
        cfg = L.number("cfg", d.cfg if cfg is None else cfg, -L.max_guidance, L.max_guidance)
        prompt = L.prompt(prompt)
        h, w = H // d.cell, W // d.cell
        noise = initial_noise(seed, d.latent_channels, h, w) if noise is None else noise
        t0 = time.perf_counter()
        prefixes = self.generate_prefixes(prompt, h, w, cfg)
        t1 = time.perf_counter()
        lat = self._denoise(prefixes, noise, steps, shift, trace)
        t2 = time.perf_counter()
        img = self.decode(lat)
        t3 = time.perf_counter()
        return ImageOutput(img, lat, h * w, {"prefill_s": t1 - t0, "denoise_s": t2 - t1, "step_s": (t2 - t1) / steps, "decode_s": t3 - t2})

    def edit(self, image, prompt: str, steps: int | None = None, cfg_text: float | None = None, cfg_image: float | None = None,
             shift: float | None = None, seed: int = 0, noise: np.ndarray | None = None, trace: StepTrace | None = None) -> ImageOutput:
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
        prefixes, ref_tokens = self.edit_prefixes(img, prompt, s_txt, s_img)
        t1 = time.perf_counter()
        lat = self._denoise(prefixes, noise, steps, shift, trace)
        t2 = time.perf_counter()
        out = self.decode(lat)
        t3 = time.perf_counter()
        return ImageOutput(out, lat, ref_tokens + h * w,
                           {"prefill_s": t1 - t0, "denoise_s": t2 - t1, "step_s": (t2 - t1) / steps, "decode_s": t3 - t2})

    # ---- batched steps across requests (emma_runtime.serve's scheduler) --------------------------
    # Each method runs several requests' work as one batch on the same graphs the single-request
    # tasks above use; the scheduler checks every request's inputs before it gets here.
    def prefill_understand_batch(self, images: np.ndarray, prompts: list[list[int]], extra: list[int]) -> tuple[KVCache, np.ndarray, list[int]]:
        """``understand``'s prefill for B requests whose images have one size: the vision trunk,
        encoder and adapter run once on the (B, 3, H, W) batch, each row's chosen expert on its rows,
        and each row's whole prefix is one right-padded causal chunk of the backbone.
        -> (cache with room for each row's ``extra`` tokens, each row's last hidden (B, 1, D), experts).
        Rows are gathered and padded on the host (a copy of small arrays; views with ONNX Runtime)."""
        B = len(prompts)
        host = self.backend.to_host
        trunk = self._run(names.UND_TRUNK, pixel_values=images)
        experts = [int(e) for e in np.argmax(host(trunk["router_logits"]), axis=1)]
        trunk_hidden = host(trunk["trunk_hidden"])
        feats = None
        for e in sorted(set(experts)):
            rows = [i for i, x in enumerate(experts) if x == e]
            f = host(self._run(names.expert(e), trunk_hidden=np.ascontiguousarray(trunk_hidden[rows]))["und_features"])
            if feats is None:
                feats = np.empty((B,) + f.shape[1:], f.dtype)
            feats[rows] = f
        image_embeds = host(self._run(names.UND_ADAPTER, und_features=feats, latents=self.latents(images))["image_embeds"])
        # The whole prefix runs as one causal chunk per row (a single request runs it as three): one
        # backbone call instead of three, measured to give the single request's tokens (docs/serving.md).
        parts = []  # per row: the prefix's embeddings, (n_i, D)
        for i, ids in enumerate(prompts):
            row = []
            for seg in template.understand(self.special, ids):
                row.append(image_embeds[i] if isinstance(seg, Image) else None)
                if isinstance(seg, Text):
                    row[-1] = list(seg.ids)
            parts.append(row)
        text_ids = [ids for row in parts for ids in row if isinstance(ids, list)]
        width = max(len(t) for t in text_ids)
        ids = np.full((len(text_ids), width), self.special.pad, np.int64)
        for k, t in enumerate(text_ids):
            ids[k, : len(t)] = t
        text_embeds = iter(host(self._run(names.EMBED_TOKENS, input_ids=ids)["inputs_embeds"]))
        rows = []
        for row in parts:
            rows.append(np.concatenate([e if not isinstance(e, list) else next(text_embeds)[: len(e)] for e in row], axis=0))
        lengths = np.array([len(r) for r in rows])
        if (lengths + np.asarray(extra)).max() > self.dims.max_context:
            raise RequestError(f"request needs {int((lengths + np.asarray(extra)).max())} positions, more than the model's context of {self.dims.max_context}")
        S = int(lengths.max())
        embeds = np.zeros((B, S, rows[0].shape[1]), rows[0].dtype)
        valid = np.zeros((B, S), bool)
        for i, r in enumerate(rows):
            embeds[i, : len(r)] = r
            valid[i, : len(r)] = True
        cache = KVCache.allocate(self.backend, self.dims, B, S + max(extra), self.kv_dtype)
        hidden = self.run_chunk(cache, embeds, "und", True, chunk_valid=valid)
        return cache, host(hidden)[np.arange(B), lengths - 1][:, None], experts

    def decode_rows(self, cache: KVCache, tokens: list[int]) -> np.ndarray:
        """One understanding decode step for every row of ``cache``: -> next-token logits (B, vocab)."""
        emb = self._run(names.EMBED_TOKENS, input_ids=np.asarray(tokens, np.int64)[:, None])["inputs_embeds"]
        hidden = self.run_chunk(cache, emb, "und", True)
        return self.logits_rows(hidden)

    def logits_rows(self, hidden: np.ndarray) -> np.ndarray:
        logits = self._run(names.LM_HEAD, hidden_states=np.ascontiguousarray(self.backend.to_host(hidden)))["logits"]
        return self._finite("lm_head (backbone_und)", self.backend.to_host(logits)[:, -1])

    def generate_prefixes(self, prompt: str, h: int, w: int, cfg: float) -> list[tuple[KVCache, float]]:
        """``generate``'s guidance prefixes with their weights (each a B=1 cache with room for h*w)."""
        prefix = lambda ids: template.split_prefix(template.generate(self.special, ids))[0]
        cond, _, _ = self.prefill(prefix(self._prompt_ids(prompt)), {}, True, h * w)
        if cfg == 1.0:
            return [(cond, 1.0)]
        uncond, _, _ = self.prefill(prefix([]), {}, True, h * w)
        prefixes = [(cond, cfg), (uncond, 1.0 - cfg)]
        return prefixes

    def edit_prefixes(self, img: np.ndarray, prompt: str, s_txt: float, s_img: float) -> tuple[list[tuple[KVCache, float]], int]:
        """``edit``'s three guidance prefixes with their weights, and the reference's token count."""
        d = self.dims
        h, w = img.shape[2] // d.cell, img.shape[3] // d.cell
        pre = lambda ids, ref: template.split_prefix(template.edit(self.special, ids, ref, d.reference_branch))[0]
        # the reference's trunk, expert, encoder and adapter run once for both prefixes that hold it
        images = {"reference": _Embedded(self.reference_embeds(img))}
        full, _, info = self.prefill(pre(self._prompt_ids(prompt), True), images, True, h * w)
        img_only, _, _ = self.prefill(pre([], True), images, True, h * w)
        none, _, _ = self.prefill(pre([], False), images, True, h * w)
        return [(full, s_txt), (img_only, s_img - s_txt), (none, 1.0 - s_img)], info["visual_tokens"]

    def denoise_rows(self, cache: KVCache, members: list[tuple[np.ndarray, np.ndarray, float, float]]) -> list[np.ndarray]:
        """One Euler step for several requests of one latent size at once. ``cache`` stacks every
        member's guidance prefixes in order; a member is (x (1, C, h, w), weights (K,), t, t_next),
        its K prefix rows all see its own noisy target. -> each member's next x."""
        xs = np.concatenate([x for x, _, _, _ in members], axis=0)
        R, C, h, w = xs.shape
        zeros = np.zeros((R, h, w, self.dims.und_feature_dim), np.float32)
        ts = np.array([t for _, _, t, _ in members], np.float32)
        tokens = self.backend.to_host(self._run(names.GEN_ADAPTER, und_features=zeros, latents=xs, timestep=ts)["image_embeds"])
        emb = np.repeat(tokens, [len(wk) for _, wk, _, _ in members], axis=0)
        v_all = self.backend.to_host(self.velocity(cache, emb))
        out, start = [], 0
        for x, wk, t, t_next in members:
            v = np.tensordot(wk, v_all[start : start + len(wk)], axes=1)
            start += len(wk)
            out.append(x + np.float32(t_next - t) * v.T.reshape(1, C, h, w))
        return out
