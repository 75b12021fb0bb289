"""Calibration data: every component's inputs captured while the REFERENCE pipelines run on real data.

Recipes (calibration/README.md): varied prompts from ``calibration/prompts.txt`` and real photographs
from scikit-image's bundled samples (``skimage.data``: nothing is downloaded), resized to several
sizes. The PyTorch pipelines of ``emma_export/model/pipelines.py`` run on them (understanding with the
router's choice and with expert 1 forced on some images, text-to-image with classifier-free guidance,
editing, and a plain autoencode), while hooks on the modules that ``components.py`` wraps record each
component's inputs in the exact IO layout of its ONNX graph:

- image components: the module's own inputs (pixels, trunk grid, latents, und features, timestep);
- ``lm_head`` gets (B, 1, hidden) where the reference passes (B, hidden);
- the (standard) backbone graphs take one branch's chunk against each layer's cached keys/values,
  ``past_key_i`` (batch, kv_heads, past, head_dim) (``components._BackboneModule``). The reference runs a
  request's prefix as ONE mixed-branch pass; it is cut at its segment boundaries (as the runtime
  chunks it), each chunk fed the real keys/values of everything before it. Decode steps and denoising
  steps (every timestep of the Euler trajectory) are recorded as they run, and the denoising steps of
  the guidance prefixes are also merged into one right-padded batch, as the runtime batches them.

Calibration sets are stored one ``.npz`` per component, keys ``"<sample index>/<input name>"``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from emma_runtime import names

from ..components import all_components  # noqa: F401 - callers import it from here
from ..config import EMMAConfig

ROOT = Path(__file__).resolve().parents[2]
CALIBRATION_DIR = ROOT / "calibration"
PROMPTS_FILE = CALIBRATION_DIR / "prompts.txt"

# scikit-image sample photographs bundled with the package (no download). Documents also go
# through the STEM expert. VERIFY_IMAGES are never calibrated on: verify's real feeds come from them.
PHOTOS = ("astronaut", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "camera", "moon", "grass", "gravel", "brick")
DOCUMENTS = ("page",)
VERIFY_IMAGES = ("coffee", "coins", "text")

Feed = dict[str, np.ndarray]


# ---- inputs: prompts and images -------------------------------------------------------------------

def load_prompts(path: Path = PROMPTS_FILE) -> dict[str, list[str]]:
    """``[section]`` headers (understand, generate, edit) and one prompt per line; '#' starts a comment."""
    out: dict[str, list[str]] = {}
    section = None
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
            out.setdefault(section, [])
        elif section is None:
            raise ValueError(f"{path}: prompt before any [section] header")
        else:
            out[section].append(line)
    for need in ("understand", "generate", "edit"):
        if not out.get(need):
            raise ValueError(f"{path}: section [{need}] is missing or empty")
    return out


def sample_names() -> list[str]:
    return list(PHOTOS) + list(DOCUMENTS) + list(VERIFY_IMAGES)


def load_photo(name: str) -> np.ndarray:
    """A scikit-image sample as (H, W, 3) uint8 (greyscale ones repeated over RGB)."""
    from skimage import data

    a = np.asarray(getattr(data, name)())
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    return np.ascontiguousarray(a[..., :3]).astype(np.uint8)


def to_model_image(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Center-crop to the aspect ratio, resize (bicubic), -> (1, 3, H, W) float32 in [-1, 1]."""
    from PIL import Image

    h, w = rgb.shape[:2]
    target = width / height
    if w / h > target:
        nw = max(1, int(round(h * target)))
        x0 = (w - nw) // 2
        rgb = rgb[:, x0 : x0 + nw]
    else:
        nh = max(1, int(round(w / target)))
        y0 = (h - nh) // 2
        rgb = rgb[y0 : y0 + nh]
    im = Image.fromarray(rgb).resize((width, height), Image.BICUBIC)
    return (np.asarray(im, np.float32) / 127.5 - 1.0).transpose(2, 0, 1)[None].copy()


def image_sizes(cfg: EMMAConfig) -> list[tuple[int, int]]:
    """The default size and two other aspect ratios (multiples of the 32-pixel cell)."""
    c, s = cfg.cell, cfg.image_size
    r = lambda v: max(c, int(round(v / c)) * c)
    sizes = [(s, s), (r(s * 1.5), s), (r(s * 0.75), r(s * 1.5))]
    return list(dict.fromkeys(sizes))


# ---- capture --------------------------------------------------------------------------------------

def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().float().numpy().copy() if t.is_floating_point() else t.detach().cpu().numpy().copy()


def _layer_feeds(keys: list[torch.Tensor], values: list[torch.Tensor], stop: int) -> dict[str, np.ndarray]:
    """Each layer's first ``stop`` cached positions under its ``past_key_i``/``past_value_i`` name."""
    out = {}
    for i, (k, v) in enumerate(zip(keys, values)):
        kn, vn = names.past_kv(i)
        out[kn] = k[:, :, :stop].float().numpy().copy()
        out[vn] = v[:, :, :stop].float().numpy().copy()
    return out


@dataclass
class Capture:
    """Hooks that record each component's graph inputs while the reference model runs."""

    model: object
    feeds: dict[str, list[Feed]] = field(default_factory=dict)
    _segment_lengths: list[int] | None = None
    _gen_group: list[Feed] = field(default_factory=list)

    def add(self, name: str, feed: Feed) -> None:
        self.feeds.setdefault(name, []).append(feed)

    @contextlib.contextmanager
    def active(self):
        from ..model import pipelines as ref
        from ..model.backbone import GEN, UND

        m = self.model
        handles = []
        pre = lambda mod, fn: handles.append(mod.register_forward_pre_hook(fn))
        pre(m.vision.trunk, lambda _m, a: self.add("und_trunk", {"pixel_values": _np(a[0])}))
        for i, ex in enumerate(m.vision.experts):
            pre(ex, lambda _m, a, i=i: self.add(names.expert(i), {"trunk_hidden": _np(a[0])}))
        pre(m.und_adapter, lambda _m, a: self.add("und_adapter", {"und_features": _np(a[0]), "latents": _np(a[1])}))
        pre(m.gen_adapter, lambda _m, a: self.add("gen_adapter", {"und_features": _np(a[0]), "latents": _np(a[1]), "timestep": _np(a[2])}))
        pre(m.llm.embed_tokens, lambda _m, a: self.add("embed_tokens", {"input_ids": _np(a[0])}))

        def head(name):
            def hook(_m, a):
                h = a[0] if a[0].dim() == 3 else a[0][:, None]
                self.add(name, {"hidden_states": _np(h)})
            return hook

        pre(m.lm_head, head("lm_head"))
        pre(m.gen_head, head("gen_head"))
        handles.append(m.llm.register_forward_hook(self._backbone_hook(UND, GEN), with_kwargs=True))

        ae_encode, ae_decode = m.ae.encode, m.ae.decode

        def encode(image):
            self.add("ae_encoder", {"image": _np(image)})
            return ae_encode(image)

        def decode(latents):
            self.add("ae_decoder", {"latents": _np(latents)})
            return ae_decode(latents)

        m.ae.encode, m.ae.decode = encode, decode
        run_prefix = ref.run_prefix

        def run_prefix_hooked(model, segments, images, bidirectional, expert=None):
            self._flush_gen_group()
            lens = []
            for seg in segments:
                if hasattr(seg, "ids"):
                    lens.append(len(seg.ids))
                else:
                    img = images[seg.role]
                    gh, gw = model.cfg.grid(img.shape[-2], img.shape[-1])
                    lens.append(gh * gw)
            self._segment_lengths = lens
            try:
                return run_prefix(model, segments, images, bidirectional, expert)
            finally:
                self._segment_lengths = None

        ref.run_prefix = run_prefix_hooked
        try:
            yield self
        finally:
            self._flush_gen_group()
            ref.run_prefix = run_prefix
            del m.ae.encode, m.ae.decode
            for h in handles:
                h.remove()

    def _backbone_hook(self, UND: int, GEN: int):
        def hook(_m, args, kwargs, output):
            names = ("hidden", "position_ids", "branch", "allow", "past")
            a = dict(zip(names, args))
            a.update(kwargs)
            x, pos, branch, allow, past = a["hidden"], a["position_ids"], a["branch"], a["allow"], a.get("past")
            _, new = output
            cfg = self.model.cfg.llm
            B = x.shape[0]
            if isinstance(branch, int) or (torch.is_tensor(branch) and branch.dim() == 0):
                b = int(branch)
                P = past.length if past is not None else 0
                empty = np.zeros((B, cfg.num_key_value_heads, 0, cfg.head_dim), np.float32)
                feed = {"inputs_embeds": _np(x), "position_ids": _np(pos).astype(np.int64), "attention_mask": _np(allow).astype(bool)}
                if P:
                    feed.update(_layer_feeds(past.keys, past.values, P))
                else:
                    feed.update({n: empty.copy() for i in range(cfg.num_hidden_layers) for n in names.past_kv(i)})
                name = "backbone_und" if b == UND else "backbone_gen"
                self.add(name, feed)
                if b == GEN and P:
                    self._group_gen(feed)
                return
            # A mixed-branch prefix: cut at segment boundaries, each chunk against the real cache before it.
            self._flush_gen_group()
            S = x.shape[1]
            lens = self._segment_lengths or _runs(branch[0].tolist())
            start = 0
            for n in lens:
                a0, a1 = start, start + n
                start = a1
                if n == 0:
                    continue
                b = int(branch[0, a0])
                feed = {
                    "inputs_embeds": _np(x[:, a0:a1]), "position_ids": _np(pos[:, a0:a1]).astype(np.int64),
                    "attention_mask": _np(allow[:, a0:a1, :a1]).astype(bool), **_layer_feeds(new.keys, new.values, a0),
                }
                self.add("backbone_und" if b == UND else "backbone_gen", feed)
            assert start == S, f"segments cover {start} of {S} prefix tokens"
        return hook

    # The guidance prefixes of one denoising step, merged into one right-padded batch (runtime's CFG batch).
    def _group_gen(self, feed: Feed) -> None:
        g = self._gen_group
        if g and not np.array_equal(g[-1]["inputs_embeds"], feed["inputs_embeds"]):
            self._flush_gen_group()
        self._gen_group.append(feed)

    def _flush_gen_group(self) -> None:
        g, self._gen_group = self._gen_group, []
        if len(g) < 2:
            return
        first = names.past_kv(0)[0]
        P = max(f[first].shape[2] for f in g)
        S = g[0]["inputs_embeds"].shape[1]
        layers = [n for n in g[0] if n.startswith(("past_key_", "past_value_"))]
        masks, pos = [], []
        for f in g:  # each prefix left-aligned, padded to the longest (as KVCache.stack lays them out)
            p = f[first].shape[2]
            m = np.zeros((1, S, P + S), bool)
            m[:, :, :p] = f["attention_mask"][:, :, :p]
            m[:, :, P:] = f["attention_mask"][:, :, p:]
            masks.append(m)
            pos.append(f["position_ids"])
        merged = {"inputs_embeds": np.concatenate([f["inputs_embeds"] for f in g]), "position_ids": np.concatenate(pos),
                  "attention_mask": np.concatenate(masks)}
        for n in layers:
            merged[n] = np.concatenate([np.pad(f[n], ((0, 0), (0, 0), (0, P - f[n].shape[2]), (0, 0))) for f in g])
        self.add("backbone_gen", merged)


def _runs(branch_row: list[int]) -> list[int]:
    out, n = [], 0
    for i, b in enumerate(branch_row):
        if i and b != branch_row[i - 1]:
            out.append(n)
            n = 0
        n += 1
    return out + [n]


# ---- recipes --------------------------------------------------------------------------------------

@dataclass
class Recipe:
    """How much of the calibration corpus to run (``full``: everything; the tests use ``quick``)."""

    images: int = len(PHOTOS) + len(DOCUMENTS)
    understand_prompts: int = 3
    generate_prompts: int = 8
    edit_prompts: int = 6
    max_new_tokens: int = 6
    sizes: int = 3
    held_out: bool = False  # the verify images, prompts from the end of each section, other noise seeds
    # denoising steps of each generation and edit (None: the model's sampler): emma-4b's reference
    # reads every decoder layer's weights on every backbone call (streamed_reference), so its
    # recipe runs a short trajectory (still from pure noise to the image)
    steps: int | None = None

    @classmethod
    def named(cls, name: str) -> "Recipe":
        if name == "full":
            return cls()
        if name == "quick":
            return cls(images=8, understand_prompts=2, generate_prompts=4, edit_prompts=3, max_new_tokens=4, sizes=2)
        if name == "verify":
            return cls(images=len(VERIFY_IMAGES), understand_prompts=2, generate_prompts=3, edit_prompts=3,
                       max_new_tokens=4, sizes=3, held_out=True)
        if name == "scale":  # emma-4b: about 25 backbone calls in all (issue 23)
            return cls(images=2, understand_prompts=1, generate_prompts=1, edit_prompts=1, max_new_tokens=2, sizes=1, steps=3)
        if name == "scale-verify":
            return cls(images=1, understand_prompts=1, generate_prompts=1, edit_prompts=1, max_new_tokens=2, sizes=1, steps=2, held_out=True)
        raise ValueError(f"unknown calibration recipe {name!r} (full, quick, scale, verify, scale-verify)")


def capture(model, tokenizer, recipe: Recipe | str = "full", prompts_file: Path = PROMPTS_FILE, world=None,
            tasks: tuple[str, ...] = ()) -> dict[str, list[Feed]]:
    """Runs the reference pipelines on the calibration corpus (the model's own ``world``'s when it has
    one, see emma_export.worlds); returns component -> list of feeds. ``tasks``: only those pipelines
    (a task-subset bundle); empty: all of them."""
    from ..model import pipelines as ref

    recipe = Recipe.named(recipe) if isinstance(recipe, str) else recipe
    cfg = model.cfg
    seed0 = 5000 if recipe.held_out else 0
    if world is not None:
        c = world.calibration_corpus(recipe)
        names, photos, prompts, sizes = c.names, c.photos, c.prompts, c.sizes
    else:
        prompts = load_prompts(prompts_file)
        if recipe.held_out:
            prompts = {k: v[::-1] for k, v in prompts.items()}
            names = list(VERIFY_IMAGES)[: recipe.images]
        else:
            names = _interleave(list(PHOTOS), list(DOCUMENTS))[: recipe.images]
        sizes = image_sizes(cfg)[: recipe.sizes]
        photos = {n: load_photo(n) for n in names}
    cap = Capture(model)
    und_p, gen_p, edit_p = prompts["understand"], prompts["generate"], prompts["edit"]
    run = lambda task: not tasks or task in tasks
    with cap.active(), torch.no_grad():
        for i, n in enumerate(names if run("understand") else []):
            H, W = sizes[i % len(sizes)]
            img = torch.from_numpy(to_model_image(photos[n], H, W))
            # Router's choice; expert 1 (STEM) forced on documents and on every third photograph,
            # so both experts see real images whatever the router prefers.
            force = 1 if (n in DOCUMENTS or n == "text" or i % 3 == 1) else None
            for k in range(recipe.understand_prompts):
                p = und_p[(i * recipe.understand_prompts + k) % len(und_p)]
                ref.understand(model, tokenizer, img, p, max_new_tokens=recipe.max_new_tokens, expert=force if k == 0 else None)
            model.ae.decode(model.ae.encode(img))  # autoencode: real latents into the decoder
        for j in range(recipe.generate_prompts if run("generate") else 0):
            H, W = sizes[j % len(sizes)]
            gh, gw = cfg.grid(H, W)
            noise = torch.from_numpy(np.random.default_rng(seed0 + 1000 + j).standard_normal((1, cfg.ae.latent_channels, gh, gw)).astype(np.float32))
            ref.generate(model, tokenizer, gen_p[j % len(gen_p)], noise, steps=recipe.steps)
        for j in range(recipe.edit_prompts if run("edit") else 0):
            n = names[j % len(names)]
            H, W = sizes[(j + 1) % len(sizes)]
            gh, gw = cfg.grid(H, W)
            img = torch.from_numpy(to_model_image(photos[n], H, W))
            noise = torch.from_numpy(np.random.default_rng(seed0 + 2000 + j).standard_normal((1, cfg.ae.latent_channels, gh, gw)).astype(np.float32))
            ref.edit(model, tokenizer, img, edit_p[j % len(edit_p)], noise, steps=recipe.steps)
    return cap.feeds


def _interleave(a: list[str], b: list[str]) -> list[str]:
    """Photographs with a document every few images, so a short recipe still has documents."""
    out, bi = [], 0
    for i, x in enumerate(a):
        out.append(x)
        if i % 3 == 2 and bi < len(b):
            out.append(b[bi])
            bi += 1
    return out + b[bi:]


def select(feeds: list[Feed], limit: int | None) -> list[Feed]:
    """At most ``limit`` feeds, evenly spaced over the capture order (keeps every recipe and timestep);
    the largest feed first (Model Optimizer infers GEMM shapes from the first sample)."""
    if limit is not None and len(feeds) > limit:
        idx = np.unique(np.linspace(0, len(feeds) - 1, limit).round().astype(int))
        feeds = [feeds[i] for i in idx]
    big = max(range(len(feeds)), key=lambda i: sum(v.size for v in feeds[i].values()))
    return [feeds[big]] + feeds[:big] + feeds[big + 1 :]


def split_holdout(feeds: list[Feed], every: int = 5) -> tuple[list[Feed], list[Feed]]:
    """Every ``every``-th feed held out (for parity checks on real data), the rest for calibration."""
    hold = [f for i, f in enumerate(feeds) if i % every == every - 1]
    calib = [f for i, f in enumerate(feeds) if i % every != every - 1]
    return calib, hold


def save(feeds: dict[str, list[Feed]], out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, lst in feeds.items():
        f = out_dir / f"{name}.npz"
        np.savez_compressed(f, **{f"{i:05d}/{k}": v for i, d in enumerate(lst) for k, v in d.items()})
        files[name] = f
    return files


def load(path: str | Path) -> list[Feed]:
    out: dict[int, Feed] = {}
    with np.load(path, allow_pickle=False) as z:
        for key in z.files:
            i, name = key.split("/", 1)
            out.setdefault(int(i), {})[name] = z[key]
    return [out[i] for i in sorted(out)]


def load_dir(path: str | Path) -> dict[str, list[Feed]]:
    return {f.stem: load(f) for f in sorted(Path(path).glob("*.npz"))}


def check_complete(cfg: EMMAConfig, feeds: dict[str, list[Feed]], tasks: tuple[str, ...] = ()) -> None:
    from ..components import components_for

    missing = [c.name for c in components_for(cfg, tasks) if not feeds.get(c.name)]
    if missing:
        raise ValueError(f"calibration captured nothing for {missing}")
