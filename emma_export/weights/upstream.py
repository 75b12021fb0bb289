"""Upstream checkpoint folders (Qwen3, SigLIP, DC-AE) in their own format, and the EMMA config they imply.

A folder holds ``config.json`` and safetensors weights: ``model.safetensors`` (transformers),
``diffusion_pytorch_model.safetensors`` (diffusers) or a sharded ``*.safetensors.index.json``. Pickled
``.bin`` weights are refused. Tensors are read one at a time with plain file reads (no mmap), so reading
a 4B checkpoint never maps more than the tensor being copied.

No transformers or diffusers import happens here: their configs are read as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from ..config import CONFIGS, EMMAConfig, LLMConfig, SamplerConfig, get_config

__all__ = [
    "UpstreamError",
    "ConfigMismatchError",
    "SafetensorsFile",
    "UpstreamFolder",
    "UpstreamSet",
    "llm_config_from_qwen3",
    "derive_config",
    "EmmaChoices",
    "config_from_upstream",
    "resolve_config",
    "check_tied_lm_head",
]

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}

_WEIGHT_NAMES = ("model", "diffusion_pytorch_model")


class UpstreamError(ValueError):
    pass


class ConfigMismatchError(UpstreamError):
    """The upstream configs disagree with the requested EMMA config; ``field`` is the first such field."""

    def __init__(self, field: str, expected: Any, found: Any, config_name: str, where: str):
        self.field, self.expected, self.found = field, expected, found
        super().__init__(
            f"{field}: config '{config_name}' has {expected!r}, but the upstream {where} gives {found!r}"
        )


# ---- safetensors, read without mmap -----------------------------------------------------------------


class SafetensorsFile:
    """Header of one safetensors file; tensors are read on demand with ``readinto``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                raw = f.read(8)
                if len(raw) != 8:
                    raise UpstreamError(f"{self.path}: truncated safetensors file")
                (n,) = struct.unpack("<Q", raw)
                if n > 100 * 2**20:
                    raise UpstreamError(f"{self.path}: implausible safetensors header size {n}")
                header = json.loads(f.read(n))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UpstreamError(f"{self.path}: not a readable safetensors file ({e})") from None
        self.data_start = 8 + n
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries: dict[str, dict] = header
        for k, e in header.items():
            if e.get("dtype") not in ST_DTYPES:
                raise UpstreamError(f"{self.path}: tensor {k!r} has unsupported dtype {e.get('dtype')!r}")

    def keys(self) -> list[str]:
        # file order (by offset): sequential reads
        return sorted(self.entries, key=lambda k: self.entries[k]["data_offsets"][0])

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return ST_DTYPES[self.entries[key]["dtype"]]

    def nbytes(self, key: str) -> int:
        a, b = self.entries[key]["data_offsets"]
        return b - a

    def get(self, key: str) -> torch.Tensor:
        return self.get_rows(key, None, None)

    def get_rows(self, key: str, start: int | None, stop: int | None) -> torch.Tensor:
        """Rows ``start:stop`` along dim 0 (the whole tensor when both are None)."""
        e = self.entries[key]
        shape, dtype = list(e["shape"]), ST_DTYPES[e["dtype"]]
        a, b = e["data_offsets"]
        if start is not None or stop is not None:
            rows = shape[0]
            start, stop = max(0, start or 0), min(rows, rows if stop is None else stop)
            row_bytes = (b - a) // rows if rows else 0
            a, b = a + start * row_bytes, a + stop * row_bytes
            shape[0] = stop - start
        buf = torch.empty(b - a, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + a)
            got = f.readinto(memoryview(buf.numpy()))
        if got != b - a:
            raise UpstreamError(f"{self.path}: tensor {key!r} is truncated")
        if dtype == torch.bool:
            return buf.view(torch.bool).reshape(shape)
        return buf.view(dtype).reshape(shape)


# ---- folders --------------------------------------------------------------------------------------


class UpstreamFolder:
    """One upstream model folder: ``config.json`` plus safetensors weights (single file or sharded)."""

    def __init__(self, path: str | Path, what: str = "upstream"):
        self.path = Path(path)
        self.what = what
        if not self.path.is_dir():
            raise UpstreamError(f"{what} folder {self.path} does not exist")
        cfg_file = self.path / "config.json"
        if not cfg_file.exists():
            raise UpstreamError(f"{what} folder {self.path} has no config.json")
        try:
            self.config: dict[str, Any] = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise UpstreamError(f"{cfg_file}: invalid JSON ({e})") from None
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        for stem in _WEIGHT_NAMES:
            index = self.path / f"{stem}.safetensors.index.json"
            single = self.path / f"{stem}.safetensors"
            if index.exists():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise UpstreamError(f"{index}: not a safetensors index ({e})") from None
                for name in sorted(set(weight_map.values())):
                    f = self.path / name
                    if not f.exists():
                        raise UpstreamError(f"{index}: shard {name} is missing")
                    self.files[name] = SafetensorsFile(f)
                for k, name in weight_map.items():
                    if k not in self.files[name].entries:
                        raise UpstreamError(f"{index}: tensor {k!r} is not in shard {name}")
                self.where = dict(weight_map)
                break
            if single.exists():
                self.files[single.name] = SafetensorsFile(single)
                self.where = {k: single.name for k in self.files[single.name].entries}
                break
        else:
            bins = sorted(p.name for p in self.path.glob("*.bin"))
            hint = f" (found {bins[0]}: pickled weights are not read; convert to safetensors)" if bins else ""
            raise UpstreamError(
                f"{what} folder {self.path} has no model.safetensors, diffusion_pytorch_model.safetensors "
                f"or sharded index{hint}"
            )

    def keys(self) -> list[str]:
        out = []
        for name, f in self.files.items():
            out += [k for k in f.keys() if self.where.get(k) == name]
        return out

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def file(self, key: str) -> SafetensorsFile:
        try:
            return self.files[self.where[key]]
        except KeyError:
            raise UpstreamError(f"{self.what} folder {self.path} has no tensor {key!r}") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self.file(key).shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.file(key).dtype(key)

    def get(self, key: str) -> torch.Tensor:
        return self.file(key).get(key)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self.shape(k) for k in self.keys()}


@dataclasses.dataclass
class UpstreamSet:
    llm: UpstreamFolder
    vision: UpstreamFolder
    ae: UpstreamFolder

    @classmethod
    def open(cls, llm_dir: str | Path, vision_dir: str | Path, ae_dir: str | Path) -> "UpstreamSet":
        return cls(
            UpstreamFolder(llm_dir, "Qwen3 (--llm)"),
            UpstreamFolder(vision_dir, "SigLIP (--vision)"),
            UpstreamFolder(ae_dir, "DC-AE (--ae)"),
        )

    def folder(self, source: str) -> UpstreamFolder:
        return getattr(self, source)

    def shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        return {s: self.folder(s).shapes() for s in ("llm", "vision", "ae")}

    def items(self) -> Iterator[tuple[str, UpstreamFolder]]:
        yield from (("llm", self.llm), ("vision", self.vision), ("ae", self.ae))


# ---- configs --------------------------------------------------------------------------------------


def _qwen3_rope_theta(d: Mapping[str, Any]) -> float:
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling")
    for p in (params, scaling or {}):
        rope_type = p.get("rope_type", p.get("type", "default"))
        if rope_type not in (None, "default"):
            raise UpstreamError(f"Qwen3 config: RoPE type {rope_type!r} is not supported (EMMA uses default RoPE)")
    if "rope_theta" in params:
        return float(params["rope_theta"])
    return float(d.get("rope_theta", 10000.0))


def llm_config_from_qwen3(d: Mapping[str, Any], shared_layers: int, decoupled_layers: int) -> LLMConfig:
    """LLMConfig from a Qwen3 ``config.json`` dict, split into ``shared_layers`` + ``decoupled_layers``.

    The caller checks ``num_hidden_layers``; unsupported Qwen3 features (biases, sliding window,
    scaled RoPE) raise. Missing fields take Qwen3Config's defaults.
    """
    if "text_config" in d and isinstance(d["text_config"], Mapping):
        d = d["text_config"]
    mt = d.get("model_type", "qwen3")
    if mt != "qwen3":
        raise UpstreamError(f"--llm: model_type {mt!r} is not 'qwen3'")
    if d.get("attention_bias", False):
        raise UpstreamError("Qwen3 config: attention_bias=true is not supported (EMMA's projections have no bias)")
    if d.get("use_sliding_window", False):
        raise UpstreamError("Qwen3 config: use_sliding_window=true is not supported")
    hidden = int(d.get("hidden_size", 4096))
    heads = int(d.get("num_attention_heads", 32))
    head_dim = d.get("head_dim", 128)  # Qwen3Config's default (not hidden / heads)
    return LLMConfig(
        hidden_size=hidden,
        intermediate_size=int(d.get("intermediate_size", 22016)),
        num_attention_heads=heads,
        num_key_value_heads=int(d.get("num_key_value_heads", heads) or heads),
        head_dim=int(head_dim if head_dim is not None else hidden // heads),
        shared_layers=int(shared_layers),
        decoupled_layers=int(decoupled_layers),
        vocab_size=int(d.get("vocab_size", 151936)),
        rope_theta=_qwen3_rope_theta(d),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        hidden_act=str(d.get("hidden_act", "silu")),
    )


def _siglip_vision_dict(d: Mapping[str, Any]) -> Mapping[str, Any]:
    mt = d.get("model_type", "siglip_vision_model")
    if mt.startswith("siglip2"):
        raise UpstreamError(
            f"--vision: model_type {mt!r} (SigLIP2 NaFlex, linear patch embedding) is not supported; "
            "use a fixed-resolution SigLIP2 checkpoint (model_type 'siglip')"
        )
    if mt not in ("siglip", "siglip_vision_model"):
        raise UpstreamError(f"--vision: model_type {mt!r} is not a SigLIP model")
    if "vision_config" in d and isinstance(d["vision_config"], Mapping):
        return d["vision_config"]
    return d


def _norm(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(_norm(x) for x in v)
    return v


def _first_diff(prefix: str, expected: Any, found: Any) -> tuple[str, Any, Any] | None:
    for f in dataclasses.fields(expected):
        a, b = _norm(getattr(expected, f.name)), _norm(getattr(found, f.name))
        if a != b:
            return f"{prefix}.{f.name}", a, b
    return None


def derive_config(
    llm_cfg: Mapping[str, Any],
    vision_cfg: Mapping[str, Any],
    ae_cfg: Mapping[str, Any],
    base: EMMAConfig,
    where: Mapping[str, str] | None = None,
) -> EMMAConfig:
    """The EMMA config the upstream configs imply, with ``base`` supplying what they cannot
    (layer splits, router, adapters, sampler...). Raises :class:`ConfigMismatchError` naming the first
    field (in EMMAConfig order: ae, vision, llm) where the upstream disagrees with ``base``."""
    from ..model.autoencoder import autoencoder_config_from_diffusers
    from ..model.vision import vision_config_from_siglip

    where = dict(where or {})
    src = {k: where.get(k, d) for k, d in (("ae", "DC-AE config"), ("vision", "SigLIP config"), ("llm", "Qwen3 config"))}

    def mismatch(diff):
        field, a, b = diff
        raise ConfigMismatchError(field, a, b, base.name, src[field.split(".")[0]])

    ae = autoencoder_config_from_diffusers(dict(ae_cfg))
    if (d := _first_diff("ae", base.ae, ae)) is not None:
        mismatch(d)

    v = _siglip_vision_dict(vision_cfg)
    n_vit = int(v.get("num_hidden_layers", 12))
    if n_vit != base.vision.num_hidden_layers:
        mismatch(("vision.num_hidden_layers (trunk_layers + expert_layers)", base.vision.num_hidden_layers, n_vit))
    # plain fields first, so that e.g. a patch-14 SigLIP is reported as vision.patch_size, not as a
    # consequence of it (vision_config_from_siglip rejects image sizes that are not a patch multiple)
    for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_channels", "image_size", "patch_size"):
        if name in v:
            found = v[name][0] if isinstance(v[name], (list, tuple)) and len(set(v[name])) == 1 else v[name]
            if _norm(found) != getattr(base.vision, name):
                mismatch((f"vision.{name}", getattr(base.vision, name), _norm(found)))
    vision = vision_config_from_siglip(
        v, base.vision.trunk_layers, base.vision.expert_layers, base.vision.num_experts, base.vision.router_hidden
    )
    vision = dataclasses.replace(vision, shuffle=base.vision.shuffle)
    if (d := _first_diff("vision", base.vision, vision)) is not None:
        mismatch(d)

    q = llm_cfg["text_config"] if isinstance(llm_cfg.get("text_config"), Mapping) else llm_cfg
    n_llm = int(q.get("num_hidden_layers", 32))
    if n_llm != base.llm.num_hidden_layers:
        mismatch(("llm.num_hidden_layers (shared_layers + decoupled_layers)", base.llm.num_hidden_layers, n_llm))
    llm = llm_config_from_qwen3(llm_cfg, base.llm.shared_layers, base.llm.decoupled_layers)
    if (d := _first_diff("llm", base.llm, llm)) is not None:
        mismatch(d)

    derived = dataclasses.replace(base, ae=ae, vision=vision, llm=llm)
    derived.validate()
    return derived


@dataclasses.dataclass(frozen=True)
class EmmaChoices:
    """EMMA's own choices, which no upstream config carries. ``None`` takes the paper's default (the
    brief's [G] default where the paper is silent), scaled down for upstream models too small for it."""

    name: str | None = None  # default "custom"
    shared_layers: int | None = None  # shallow shared-Q/K layers; default half the Qwen3 layers (18 + 18 of 36)
    expert_layers: int | None = None  # ViT layers per expert; default the last 3 (a third of shallower ViTs)
    num_experts: int = 2  # versatile + STEM
    adapter_hidden: int | None = None  # default the LLM width (LN -> Linear(fused -> LLM width) -> GELU -> Linear)
    timestep_freq_dim: int = 256
    reference_branch: str = "gen"
    image_size: int | None = None  # default generation size: SigLIP's native size (a multiple of the cell)
    max_context: int | None = None  # default min(Qwen3 max_position_embeddings, 8192)
    sampler: SamplerConfig = SamplerConfig()

    @property
    def explicit(self) -> bool:
        """Whether any choice differs from the defaults (then a named config is not looked for)."""
        return self != EmmaChoices()


def config_from_upstream(
    llm_cfg: Mapping[str, Any], vision_cfg: Mapping[str, Any], ae_cfg: Mapping[str, Any], choices: EmmaChoices | None = None
) -> EMMAConfig:
    """An EMMA config for upstream Qwen3, SigLIP and DC-AE configs of any consistent size: every width,
    depth, head count and norm from the upstream configs, EMMA's own structure from ``choices``.

    Consistent means: SigLIP's patch divides the DC-AE's downsampling (the pixel shuffle factor is their
    ratio, 2 for patch 16 and a 32x DC-AE), the Qwen3 heads are a multiple of its KV heads, and the
    layer splits leave at least one layer on each side."""
    from ..model.autoencoder import autoencoder_config_from_diffusers
    from ..model.vision import vision_config_from_siglip

    c = choices or EmmaChoices()
    name = c.name or "custom"
    from ..model.autoencoder import Autoencoder

    try:
        ae = autoencoder_config_from_diffusers(dict(ae_cfg))
        with torch.device("meta"):  # the layout checks of the module itself (shortcut and shuffle widths)
            Autoencoder(ae)
    except ValueError as e:
        raise UpstreamError(f"DC-AE config: {e}") from None
    cell = ae.downsample_factor

    v = _siglip_vision_dict(vision_cfg)
    n_vit = int(v.get("num_hidden_layers", 12))
    expert = c.expert_layers if c.expert_layers is not None else max(1, min(3, n_vit // 3))
    if not 1 <= expert <= n_vit:
        raise UpstreamError(f"expert layers {expert}: the SigLIP has {n_vit} layers (need 1 <= expert layers <= {n_vit})")
    try:
        vision = vision_config_from_siglip(v, n_vit - expert, expert, c.num_experts, None)
    except ValueError as e:
        raise UpstreamError(f"SigLIP config: {e}") from None
    if cell % vision.patch_size:
        raise UpstreamError(f"SigLIP patch size {vision.patch_size} does not divide the DC-AE's downsampling {cell}: "
                            "the two encoders would not produce the same grid")
    vision = dataclasses.replace(vision, shuffle=cell // vision.patch_size)

    q = llm_cfg["text_config"] if isinstance(llm_cfg.get("text_config"), Mapping) else llm_cfg
    n_llm = int(q.get("num_hidden_layers", 32))
    shared = c.shared_layers if c.shared_layers is not None else n_llm // 2
    if not 0 <= shared < n_llm:
        raise UpstreamError(f"shared layers {shared}: the Qwen3 has {n_llm} layers (need 0 <= shared layers < {n_llm})")
    llm = llm_config_from_qwen3(llm_cfg, shared, n_llm - shared)
    if not llm.tie_word_embeddings:
        raise UpstreamError("Qwen3 config: tie_word_embeddings is false; EMMA ties the LM head to the embedding")

    image = c.image_size if c.image_size is not None else max(cell, vision.image_size // cell * cell)
    cfg = EMMAConfig(
        name=name, ae=ae, vision=vision, llm=llm, sampler=c.sampler,
        adapter_hidden=c.adapter_hidden or llm.hidden_size,
        timestep_freq_dim=c.timestep_freq_dim,
        image_size=image,
        reference_branch=c.reference_branch,
        max_context=c.max_context or min(llm.max_position_embeddings, 8192),
    )
    try:
        cfg.validate()
        cfg.grid(image, image)
    except ValueError as e:
        raise UpstreamError(str(e)) from None
    if name in CONFIGS and cfg != get_config(name):
        raise UpstreamError(f"config name {name!r} is taken by a named EMMA config with other fields; pick another --name")
    return cfg


def resolve_config(ups: UpstreamSet, config_name: str | None = None, choices: EmmaChoices | None = None) -> EMMAConfig:
    """The EMMA config of the upstream folders.

    With ``config_name``: the upstream configs must match that named config (an error names the first
    differing field). With explicit ``choices``: derived from the upstream configs with them. Otherwise
    the first named config the upstream matches, and when none does, a config derived from the upstream
    with the paper's defaults (:func:`config_from_upstream`)."""
    where = {
        "llm": f"Qwen3 config ({ups.llm.path / 'config.json'})",
        "vision": f"SigLIP config ({ups.vision.path / 'config.json'})",
        "ae": f"DC-AE config ({ups.ae.path / 'config.json'})",
    }
    args = (ups.llm.config, ups.vision.config, ups.ae.config)
    if config_name is not None:
        if choices is not None and choices.explicit:
            raise UpstreamError(f"--config {config_name} fixes every EMMA choice; drop the layer/name options or --config")
        return derive_config(*args, get_config(config_name), where)
    if choices is not None and choices.explicit:
        return config_from_upstream(*args, choices)
    for name in CONFIGS:
        try:
            return derive_config(*args, get_config(name), where)
        except ConfigMismatchError:
            continue
    return config_from_upstream(*args, choices)


def check_tied_lm_head(llm: UpstreamFolder, block_rows: int = 8192) -> str:
    """EMMA ties the LM head to the embedding: Qwen3's ``lm_head.weight`` must be absent or equal to
    ``model.embed_tokens.weight`` (compared in row blocks, so memory stays bounded). Returns a note."""
    if "lm_head.weight" not in llm:
        return "lm_head.weight absent (tied)"
    emb = "model.embed_tokens.weight"
    if emb not in llm:
        raise UpstreamError(f"{llm.what}: no {emb!r}")
    if llm.shape("lm_head.weight") != llm.shape(emb):
        raise UpstreamError(
            f"{llm.what}: lm_head.weight has shape {llm.shape('lm_head.weight')}, the embedding {llm.shape(emb)}"
        )
    rows = llm.shape(emb)[0]
    fa, fb = llm.file("lm_head.weight"), llm.file(emb)
    for r in range(0, rows, block_rows):
        a = fa.get_rows("lm_head.weight", r, r + block_rows)
        b = fb.get_rows(emb, r, r + block_rows)
        if not torch.equal(a.float(), b.float()):
            raise UpstreamError(
                f"{llm.what}: lm_head.weight differs from {emb} (first differing block at row {r}); "
                "EMMA ties the LM head to the embedding and cannot take an untied Qwen3"
            )
    return "lm_head.weight present and equal to the embedding (tied)"
