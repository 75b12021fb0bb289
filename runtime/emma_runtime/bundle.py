"""The bundle: a folder of per-component graphs (and engines) described by ``manifest.json``.

The runtime owns this schema; the exporter writes it through these types. A bundle is untrusted input:
the manifest is parsed strictly (types, ranges, no duplicate keys, no NaN), every path it names must
resolve to a regular file inside the bundle folder, and every file is read once, hashed, and used from
those same bytes (``Bundle.read``): a file swapped after the check is never the file that runs.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import names
from .kv_cache import EIGHT_BIT, KV_DTYPES
from .paths import UnsafePathError, check_name, confined, read_regular, sha256_bytes, sha256_regular

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CREATED_BY = "emma-export"  # the marker that lets a later build replace this folder without --overwrite
MAX_MANIFEST_BYTES = 16 << 20
MAX_FILE_BYTES = 1 << 40  # no bundle file is hashed past 1 TiB (a sparse or runaway file)
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "bool", "int8", "uint8", "float8e4m3fn")
_MAX_DIM = (1 << 31) - 1
_SYMBOL = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
# a symbolic dimension: a name, or the expression shape inference leaves ("floor(height/2)")
_DIM_EXPR = re.compile(r"^[A-Za-z_][A-Za-z0-9_+\-*/%() .,]{0,255}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")


class BundleError(ValueError):
    """A missing, corrupt or mismatched bundle; the message names the file."""


class _Fields:
    """Typed access to one JSON object of the manifest; every error names where it is."""

    def __init__(self, d: object, where: str):
        if not isinstance(d, dict):
            raise BundleError(f"{where}: expected an object, got {type(d).__name__}")
        self.d, self.where = d, where

    def _get(self, key: str, default: Any = ...) -> Any:
        if key not in self.d:
            if default is ...:
                raise BundleError(f"{self.where}: missing field '{key}'")
            return default
        return self.d[key]

    def str(self, key: str, default: Any = ..., choices: tuple[str, ...] | None = None) -> str:
        v = self._get(key, default)
        if not isinstance(v, str):
            raise BundleError(f"{self.where}.{key}: expected a string, got {v!r}")
        if choices and v not in choices:
            raise BundleError(f"{self.where}.{key}: {v!r} is not one of {', '.join(choices)}")
        return v

    def sha(self, key: str) -> str:
        v = self.str(key)
        if not _SHA.match(v):
            raise BundleError(f"{self.where}.{key}: not a sha256 hex digest ({v[:20]!r})")
        return v

    def int(self, key: str, lo: int = 1, hi: int = _MAX_DIM, default: Any = ...) -> int:
        v = self._get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise BundleError(f"{self.where}.{key}: expected an integer in [{lo}, {hi}], got {v!r}")
        return v

    def float(self, key: str, lo: float = -math.inf, hi: float = math.inf, default: Any = ..., open_lo: bool = False) -> float:
        v = self._get(key, default)
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and lo <= v <= hi and not (open_lo and v == lo)
        if not ok:
            raise BundleError(f"{self.where}.{key}: expected a finite number {'>' if open_lo else '>='} {lo}"
                              f"{'' if hi == math.inf else f' and <= {hi}'}, got {v!r}")
        return float(v)

    def obj(self, key: str, default: Any = ...) -> dict:
        v = self._get(key, default)
        if not isinstance(v, dict):
            raise BundleError(f"{self.where}.{key}: expected an object, got {type(v).__name__}")
        return v

    def list(self, key: str, default: Any = ...) -> list:
        v = self._get(key, default)
        if not isinstance(v, list):
            raise BundleError(f"{self.where}.{key}: expected a list, got {type(v).__name__}")
        return v


def _file_name(name: object, where: str) -> str:
    try:
        return check_name(name, where)
    except UnsafePathError as e:
        raise BundleError(str(e)) from None


def _profile(d: dict, where: str) -> dict[str, tuple[int, int, int]]:
    out = {}
    for k, v in d.items():
        ok = (isinstance(k, str) and _SYMBOL.match(k) and isinstance(v, list) and len(v) == 3
              and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= _MAX_DIM for x in v) and v[0] <= v[1] <= v[2])
        if not ok:
            raise BundleError(f"{where}.{k}: a profile entry is [min, opt, max] with 0 <= min <= opt <= max, got {v!r}")
        out[k] = tuple(v)
    return out


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @classmethod
    def from_dict(cls, d: dict, where: str = "tensor") -> "TensorInfo":
        f = _Fields(d, where)
        name = f.str("name")
        shape = f.list("shape")
        for x in shape:
            sym = isinstance(x, str) and _DIM_EXPR.match(x)
            dim = isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= _MAX_DIM
            if not (sym or dim):
                raise BundleError(f"{where}.shape: {x!r} is neither a dimension in [0, {_MAX_DIM}] nor a symbol")
        if len(shape) > 8:
            raise BundleError(f"{where}.shape: {len(shape)} dimensions (at most 8)")
        return cls(name, f.str("dtype", choices=DTYPES), tuple(shape))

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class EngineInfo:
    file: str
    sha256: str
    target: str
    compute_capability: str
    profile: dict[str, tuple[int, int, int]]
    build_seconds: float = 0.0
    flavour: str = ""  # "tensorrt" or "tensorrt-rtx": which runtime deserializes it
    builder_peak_rss: int = 0  # bytes: the building process's peak resident memory during this build

    @classmethod
    def from_dict(cls, d: dict, where: str = "engine") -> "EngineInfo":
        f = _Fields(d, where)
        return cls(_file_name(f.str("file"), f"{where}.file"), f.sha("sha256"), f.str("target"), f.str("compute_capability"),
                   _profile(f.obj("profile"), f"{where}.profile"), f.float("build_seconds", 0.0, default=0.0),
                   f.str("flavour", default=""), int(f.float("builder_peak_rss", 0.0, default=0.0)))

    def to_dict(self) -> dict:
        return {**asdict(self), "profile": {k: list(v) for k, v in self.profile.items()}}


def _check_backbone_io(name: str, info: "ComponentInfo", layers: int, where: str) -> None:
    """A backbone's KV-cache IO is what its ``attention`` flavour runs with (the pipelines bind by name)."""
    if name not in names.BACKBONES:
        if info.attention != names.ATTENTION_STANDARD:
            raise BundleError(f"{where}: attention '{info.attention}' is only for a backbone")
        return
    if info.attention == names.ATTENTION_GQA and name != names.BACKBONE_UND:
        raise BundleError(f"{where}: a gqa graph is causal: only backbone_und can be one")
    gqa = info.attention == names.ATTENTION_GQA
    want_in = [n for i in range(layers) for n in names.past_kv(i)] + ([names.SEQLENS_K, names.TOTAL_SEQUENCE_LENGTH] if gqa else ["attention_mask"])
    want_out = [n for i in range(layers) for n in (names.present_kv(i) if gqa else names.new_kv(i))]
    have_in, have_out = {t.name for t in info.inputs}, {t.name for t in info.outputs}
    missing = [n for n in want_in if n not in have_in] + [n for n in want_out if n not in have_out]
    if missing:
        raise BundleError(f"{where}: a {info.attention} backbone of {layers} layers lacks tensor(s) {', '.join(missing[:4])}"
                          f"{' ...' if len(missing) > 4 else ''} (a bundle from an older emma-export? rebuild it)")


@dataclass(frozen=True)
class ComponentInfo:
    file: str
    sha256: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    precision: str = "fp32"
    data_files: tuple[tuple[str, str], ...] = ()  # (file, sha256) of external weight data
    profile: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    engine: EngineInfo | None = None
    attention: str = names.ATTENTION_STANDARD  # backbones: "gqa" is ONNX Runtime's fused flavour (names.py)
    # why this component's engine is to be built on the device (the builder would not fit where the
    # bundle was built); empty: built here, or not a TensorRT bundle
    engine_on_device: str = ""

    @classmethod
    def from_dict(cls, d: dict, where: str = "component") -> "ComponentInfo":
        f = _Fields(d, where)
        data_files = []
        for i, x in enumerate(f.list("data_files", default=[])):
            if not (isinstance(x, list) and len(x) == 2):
                raise BundleError(f"{where}.data_files[{i}]: expected [file, sha256], got {x!r}")
            g = _Fields({"file": x[0], "sha256": x[1]}, f"{where}.data_files[{i}]")
            data_files.append((_file_name(g.str("file"), f"{where}.data_files[{i}]"), g.sha("sha256")))
        engine = f._get("engine", None)
        return cls(
            file=_file_name(f.str("file"), f"{where}.file"),
            sha256=f.sha("sha256"),
            inputs=tuple(TensorInfo.from_dict(x, f"{where}.inputs[{i}]") for i, x in enumerate(f.list("inputs"))),
            outputs=tuple(TensorInfo.from_dict(x, f"{where}.outputs[{i}]") for i, x in enumerate(f.list("outputs"))),
            precision=f.str("precision", default="fp32"),
            data_files=tuple(data_files),
            profile=_profile(f.obj("profile", default={}), f"{where}.profile"),
            engine=EngineInfo.from_dict(engine, f"{where}.engine") if engine else None,
            attention=f.str("attention", default=names.ATTENTION_STANDARD, choices=names.ATTENTIONS),
            engine_on_device=f.str("engine_on_device", default=""),
        )

    @property
    def fp8(self) -> bool:
        """FP8 Q/DQ in the graph: an fp8 component, or FP8 IO (an FP8 KV cache). ONNX Runtime's CPU
        provider runs those with graph optimizations off."""
        return self.precision == "fp8" or any(t.dtype == "float8e4m3fn" for t in self.inputs + self.outputs)

    def tensor(self, name: str) -> TensorInfo:
        for t in self.inputs + self.outputs:
            if t.name == name:
                return t
        raise BundleError(f"component graph has no tensor '{name}'")

    def to_dict(self) -> dict:
        d = {
            "file": self.file,
            "sha256": self.sha256,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "precision": self.precision,
            "data_files": [list(x) for x in self.data_files],
            "profile": {k: list(v) for k, v in self.profile.items()},
        }
        if self.engine:
            d["engine"] = self.engine.to_dict()
        if self.attention != names.ATTENTION_STANDARD:
            d["attention"] = self.attention
        if self.engine_on_device:
            d["engine_on_device"] = self.engine_on_device
        return d


@dataclass(frozen=True)
class KVCacheInfo:
    """What the backbones' KV cache holds: ``dtype`` (kv_cache.KV_DTYPES), and for an 8-bit cache the
    per-layer scales its graphs quantize with (``key_scales[i]`` for ``past_key_i``/``new_key_i``): a
    cached value is ``round(x / scale)``. Both backbones read one cache, so they share the scales."""

    dtype: str
    key_scales: tuple[float, ...] = ()
    value_scales: tuple[float, ...] = ()

    @property
    def quantized(self) -> bool:
        return self.dtype in EIGHT_BIT

    @classmethod
    def from_dict(cls, d: dict, layers: int, where: str = "kv_cache") -> "KVCacheInfo":
        f = _Fields(d, where)
        dtype = f.str("dtype", choices=KV_DTYPES)
        scales = []
        for key in ("key_scales", "value_scales"):
            v = f.list(key, default=[])
            ok = all(not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) and 0 < x < 1e30 for x in v)
            if not ok:
                raise BundleError(f"{where}.{key}: scales must be finite numbers > 0")
            if dtype in EIGHT_BIT and len(v) != layers:
                raise BundleError(f"{where}.{key}: an {dtype} cache needs one scale per layer ({layers}), got {len(v)}")
            if dtype not in EIGHT_BIT and v:
                raise BundleError(f"{where}.{key}: a {dtype} cache has no scales")
            scales.append(tuple(float(x) for x in v))
        return cls(dtype, *scales)

    def to_dict(self) -> dict:
        d: dict = {"dtype": self.dtype}
        if self.quantized:
            d.update(key_scales=list(self.key_scales), value_scales=list(self.value_scales))
        return d

    def scale(self, name: str) -> float:
        """The scale of a ``past_key_i``/``new_value_i``/``present_key_i`` tensor."""
        kind, _, i = name.rpartition("_")
        return (self.value_scales if kind.endswith("value") else self.key_scales)[int(i)]


def _check_kv_io(m: "Manifest", where: str) -> None:
    """Every backbone's KV tensors have the cache's dtype: the pipelines allocate one cache for both
    graphs, and an 8-bit cache needs its scales in the manifest (``kv_cache``)."""
    seen = {}
    for name in names.BACKBONES:
        info = m.components.get(name)
        if info is None:
            continue
        for i in range(m.model.num_layers):
            for n in names.past_kv(i) + (names.present_kv(i) if info.attention == names.ATTENTION_GQA else names.new_kv(i)):
                seen[f"{name}.{n}"] = info.tensor(n).dtype
    want = m.kv_cache.dtype if m.kv_cache else None
    for tensor, dtype in seen.items():
        if want is None and dtype not in ("float32", "float16"):
            raise BundleError(f"{where}: {tensor} is {dtype} but the manifest has no kv_cache entry (its scales)")
        if want is not None and dtype != want:
            raise BundleError(f"{where}: {tensor} is {dtype}, the manifest's kv_cache is {want}")
    if want is None and len(set(seen.values())) > 1:
        raise BundleError(f"{where}: the backbones' KV tensors mix {', '.join(sorted(set(seen.values())))}: one cache feeds both")


@dataclass(frozen=True)
class ModelDims:
    """What the runtime needs to know of the model, written explicitly so it derives nothing."""

    hidden_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    latent_channels: int
    cell: int  # pixels per token side (32)
    und_feature_dim: int
    num_experts: int
    max_context: int
    reference_branch: str
    default_image_size: int
    steps: int
    shift: float
    cfg: float
    cfg_text: float
    cfg_image: float

    @classmethod
    def from_dict(cls, d: dict, where: str = "model") -> "ModelDims":
        f = _Fields(d, where)
        missing = set(cls.__dataclass_fields__) - set(f.d)
        if missing:
            raise BundleError(f"{where}: lacks {sorted(missing)}")
        dims = cls(
            hidden_size=f.int("hidden_size", hi=1 << 20), num_layers=f.int("num_layers", hi=4096),
            num_kv_heads=f.int("num_kv_heads", hi=4096), head_dim=f.int("head_dim", hi=1 << 16),
            vocab_size=f.int("vocab_size", hi=1 << 24), latent_channels=f.int("latent_channels", hi=1 << 16),
            cell=f.int("cell", hi=1 << 12), und_feature_dim=f.int("und_feature_dim", hi=1 << 20),
            num_experts=f.int("num_experts", hi=64), max_context=f.int("max_context", hi=1 << 22),
            reference_branch=f.str("reference_branch", choices=("und", "gen")),
            default_image_size=f.int("default_image_size", hi=1 << 16), steps=f.int("steps", hi=10_000),
            shift=f.float("shift", 0.0, 1e4, open_lo=True), cfg=f.float("cfg", -1e4, 1e4),
            cfg_text=f.float("cfg_text", -1e4, 1e4), cfg_image=f.float("cfg_image", -1e4, 1e4),
        )
        if dims.default_image_size % dims.cell:
            raise BundleError(f"{where}.default_image_size: {dims.default_image_size} is not a multiple of cell {dims.cell}")
        return dims


@dataclass(frozen=True)
class Manifest:
    format_version: int
    config_name: str
    config: dict[str, Any]
    model: ModelDims
    precision: str
    target: str
    components: dict[str, ComponentInfo]
    tokenizer: tuple[str, str]  # (file, sha256)
    precision_policy: dict[str, str] = field(default_factory=dict)
    weights: dict[str, Any] = field(default_factory=dict)  # where the weights came from: seed or checkpoint
    created_by: str = "emma-export"
    # a task-subset bundle: the tasks it was built for (names.TASKS); empty: every task
    tasks: tuple[str, ...] = ()
    # the KV cache's dtype and 8-bit scales; None: the float cache the graphs' IO says (older bundles)
    kv_cache: KVCacheInfo | None = None

    def serves(self, task: str) -> bool:
        return not self.tasks or task in self.tasks

    def to_json(self) -> str:
        return json.dumps(
            {
                "format_version": self.format_version,
                "config_name": self.config_name,
                "config": self.config,
                "model": asdict(self.model),
                "precision": self.precision,
                "target": self.target,
                "precision_policy": self.precision_policy,
                "weights": self.weights,
                "tokenizer": {"file": self.tokenizer[0], "sha256": self.tokenizer[1]},
                "components": {k: v.to_dict() for k, v in self.components.items()},
                "created_by": self.created_by,
                "tasks": list(self.tasks),
                **({"kv_cache": self.kv_cache.to_dict()} if self.kv_cache else {}),
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str | bytes, source: str = MANIFEST) -> "Manifest":
        try:
            d = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{source}: not valid JSON ({e})") from None
        except ValueError as e:  # a duplicated key or NaN, from the hooks
            raise BundleError(f"{source}: {e}") from None
        f = _Fields(d, source)
        fv = f._get("format_version")
        if fv != FORMAT_VERSION or isinstance(fv, bool):
            raise BundleError(f"{source}: format_version {fv!r}, this runtime reads {FORMAT_VERSION}")
        comps = f.obj("components")
        tok = _Fields(f.obj("tokenizer"), f"{source}: tokenizer")
        policy = f.obj("precision_policy", default={})
        tasks = f.list("tasks", default=[])
        if not all(isinstance(t, str) and t in names.TASKS for t in tasks) or len(set(tasks)) != len(tasks):
            raise BundleError(f"{source}: tasks must be distinct names from {', '.join(names.TASKS)}, got {tasks!r}")
        if not all(isinstance(v, str) for v in policy.values()):
            raise BundleError(f"{source}: precision_policy values must be strings")
        model = ModelDims.from_dict(f.obj("model"), f"{source}: model")
        kv = f._get("kv_cache", None)
        return cls(
            format_version=fv,
            config_name=f.str("config_name"),
            config=f.obj("config"),
            model=model,
            precision=f.str("precision"),
            target=f.str("target"),
            components={_component_name(k, source): ComponentInfo.from_dict(v, f"{source}: components.{k}") for k, v in comps.items()},
            tokenizer=(_file_name(tok.str("file"), f"{source}: tokenizer.file"), tok.sha("sha256")),
            precision_policy=policy,
            weights=f.obj("weights", default={}),
            created_by=f.str("created_by", default=""),
            tasks=tuple(tasks),
            kv_cache=None if kv is None else KVCacheInfo.from_dict(kv, model.num_layers, f"{source}: kv_cache"),
        )

    def files(self) -> list[tuple[str, str]]:
        """Every (file, sha256) the bundle must contain."""
        out = [self.tokenizer]
        for c in self.components.values():
            out.append((c.file, c.sha256))
            out.extend(c.data_files)
            if c.engine:
                out.append((c.engine.file, c.engine.sha256))
        # once each: the tied embedding's table (1.56 GB at emma-4b) is listed by two components; the
        # same file with two digests stays twice, so one of them fails
        return list(dict.fromkeys(out))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    d: dict = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicated key {k!r} (a reader could take either value)")
        d[k] = v
    return d


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number a manifest may hold")


def _component_name(k: str, source: str) -> str:
    if not _SYMBOL.match(k):
        raise BundleError(f"{source}: component name {k!r} is not an identifier")
    return k


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """The exporter's digest of a file it just wrote (its own output, not untrusted input)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


REQUIRED_COMPONENTS = names.FIXED


@dataclass(frozen=True)
class Graph:
    """A component's ONNX graph and the external data files it references, as verified bytes; the
    names are the locations the graph itself uses (relative to the graph's folder)."""

    model: bytes
    data: dict[str, bytearray]


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: Manifest
    # every file this bundle read, resolved: a test checks that none lies outside ``root``
    opened: list[Path] = field(default_factory=list, compare=False, repr=False)

    def path(self, file: str) -> Path:
        """The resolved path of a file the manifest names, confined to the bundle folder."""
        try:
            return confined(self.root, file, MANIFEST, MAX_FILE_BYTES)
        except UnsafePathError as e:
            raise BundleError(str(e)) from None

    def read(self, file: str, sha256: str) -> bytearray:
        """The file's bytes, checked against ``sha256``: use these bytes, never the path again."""
        p = self.path(file)
        try:
            data = read_regular(p, MANIFEST, MAX_FILE_BYTES)
        except UnsafePathError as e:
            raise BundleError(str(e)) from None
        self.opened.append(p)
        self._check_digest(file, sha256, sha256_bytes(data))
        return data

    def _check_digest(self, file: str, want: str, got: str) -> None:
        if got != want:
            raise BundleError(f"{self.root / file}: sha256 mismatch (manifest {want[:12]}..., file {got[:12]}...): corrupt or tampered")

    def graph(self, component: str) -> Graph:
        info = self.manifest.components[component]
        folder = info.file.rpartition("/")[0]
        data = {}
        for file, digest in info.data_files:
            if folder and not file.startswith(folder + "/"):
                raise BundleError(f"{self.root / file}: external data of {component} must sit in its graph's folder")
            data[file[len(folder) + 1:] if folder else file] = self.read(file, digest)
        return Graph(bytes(self.read(info.file, info.sha256)), data)

    def require_task(self, task: str) -> None:
        """One line when the bundle was built without ``task``'s components (``--tasks``)."""
        if not self.manifest.serves(task):
            raise BundleError(f"{self.root}: this bundle was built for {', '.join(self.manifest.tasks)} only, not {task} "
                              f"(rebuild with --tasks {task})")

    def engine(self, component: str) -> bytearray:
        info = self.manifest.components[component]
        if info.engine is None:
            raise BundleError(f"{component}: the bundle has no TensorRT engine for it")
        return self.read(info.engine.file, info.engine.sha256)

    def tokenizer(self):
        """The bundle's tokenizer, parsed from its verified bytes, with special tokens off for user text."""
        from tokenizers import Tokenizer

        file, digest = self.manifest.tokenizer
        data = self.read(file, digest)
        try:
            tok = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # tokenizers raises its own exception type for a malformed file
            raise BundleError(f"{self.root / file}: not a valid tokenizer.json ({str(e).splitlines()[0][:160]})") from None
        tok.encode_special_tokens = True  # a prompt's "<|im_end|>" is text, never the template's id
        return tok

    @classmethod
    def load(cls, root: str | Path, check_files: bool = True) -> "Bundle":
        """Parses and checks the manifest and every path it names (always); with ``check_files`` also
        hashes every file. A runtime that opens the graphs right away reads each through ``read`` instead,
        so every byte is hashed once and the hashed bytes are the ones used."""
        root = Path(root)
        if not root.is_dir():
            raise BundleError(f"{root}: no such bundle directory")
        try:
            mpath = confined(root, MANIFEST, "bundle manifest", MAX_MANIFEST_BYTES)
            text = read_regular(mpath, "bundle manifest", MAX_MANIFEST_BYTES)
        except UnsafePathError as e:
            raise BundleError(f"{e} (not an EMMA bundle)" if "missing" in str(e) else str(e)) from None
        manifest = Manifest.from_json(bytes(text), str(root / MANIFEST))
        for name in names.required(manifest.model.num_experts, manifest.tasks, manifest.model.reference_branch):
            if name not in manifest.components:
                why = f" (its tasks: {', '.join(manifest.tasks)})" if manifest.tasks else ""
                raise BundleError(f"{root / MANIFEST}: component '{name}' is missing{why}")
        for name, info in manifest.components.items():
            _check_backbone_io(name, info, manifest.model.num_layers, f"{root / MANIFEST}: {name}")
        _check_kv_io(manifest, str(root / MANIFEST))
        bundle = cls(root, manifest)
        for file, _ in manifest.files():
            bundle.path(file)
        if check_files:
            bundle.verify_checksums()
        return bundle

    def verify_checksums(self) -> None:
        """Every file against its sha256, hashed in chunks (nothing kept: whoever uses a file reads it
        again through ``read``, which hashes the bytes it returns)."""
        for file, digest in self.manifest.files():
            p = self.path(file)
            try:
                got = sha256_regular(p, MANIFEST, MAX_FILE_BYTES)
            except UnsafePathError as e:
                raise BundleError(str(e)) from None
            self.opened.append(p)
            self._check_digest(file, digest, got)
