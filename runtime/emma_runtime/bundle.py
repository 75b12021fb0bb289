"""The bundle: a folder of per-component graphs (and engines) described by ``manifest.json``.

The runtime owns this schema; the exporter writes it through these types. A bundle is untrusted
input: every file's sha256 is checked against the manifest before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(ValueError):
    """A missing, corrupt or mismatched bundle; the message names the file."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @classmethod
    def from_dict(cls, d: dict) -> "TensorInfo":
        return cls(d["name"], d["dtype"], tuple(d["shape"]))

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

    @classmethod
    def from_dict(cls, d: dict) -> "EngineInfo":
        return cls(d["file"], d["sha256"], d["target"], d["compute_capability"],
                   {k: tuple(v) for k, v in d["profile"].items()}, d.get("build_seconds", 0.0), d.get("flavour", ""))

    def to_dict(self) -> dict:
        return {**asdict(self), "profile": {k: list(v) for k, v in self.profile.items()}}


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

    @classmethod
    def from_dict(cls, d: dict) -> "ComponentInfo":
        return cls(
            file=d["file"],
            sha256=d["sha256"],
            inputs=tuple(TensorInfo.from_dict(x) for x in d["inputs"]),
            outputs=tuple(TensorInfo.from_dict(x) for x in d["outputs"]),
            precision=d.get("precision", "fp32"),
            data_files=tuple(tuple(x) for x in d.get("data_files", [])),
            profile={k: tuple(v) for k, v in d.get("profile", {}).items()},
            engine=EngineInfo.from_dict(d["engine"]) if d.get("engine") else None,
        )

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
        return d


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
    def from_dict(cls, d: dict) -> "ModelDims":
        names = set(cls.__dataclass_fields__)
        missing = names - set(d)
        if missing:
            raise BundleError(f"{MANIFEST}: model section lacks {sorted(missing)}")
        return cls(**{k: d[k] for k in names})


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
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str, source: str = MANIFEST) -> "Manifest":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise BundleError(f"{source}: not valid JSON ({e})") from None
        try:
            fv = d["format_version"]
            if fv != FORMAT_VERSION:
                raise BundleError(f"{source}: format_version {fv}, this runtime reads {FORMAT_VERSION}")
            return cls(
                format_version=fv,
                config_name=d["config_name"],
                config=d["config"],
                model=ModelDims.from_dict(d["model"]),
                precision=d["precision"],
                target=d["target"],
                components={k: ComponentInfo.from_dict(v) for k, v in d["components"].items()},
                tokenizer=(d["tokenizer"]["file"], d["tokenizer"]["sha256"]),
                precision_policy=d.get("precision_policy", {}),
                weights=d.get("weights", {}),
                created_by=d.get("created_by", ""),
            )
        except KeyError as e:
            raise BundleError(f"{source}: missing field {e}") from None

    def files(self) -> list[tuple[str, str]]:
        """Every (file, sha256) the bundle must contain."""
        out = [self.tokenizer]
        for c in self.components.values():
            out.append((c.file, c.sha256))
            out.extend(c.data_files)
            if c.engine:
                out.append((c.engine.file, c.engine.sha256))
        return out


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


REQUIRED_COMPONENTS = (
    "ae_encoder", "ae_decoder", "und_trunk", "und_adapter", "gen_adapter", "embed_tokens",
    "backbone_und", "backbone_gen", "lm_head", "gen_head",
)


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: Manifest

    def path(self, file: str) -> Path:
        return self.root / file

    @classmethod
    def load(cls, root: str | Path, check_files: bool = True) -> "Bundle":
        root = Path(root)
        mpath = root / MANIFEST
        if not root.is_dir():
            raise BundleError(f"{root}: no such bundle directory")
        if not mpath.exists():
            raise BundleError(f"{mpath}: missing (not an EMMA bundle)")
        manifest = Manifest.from_json(mpath.read_text(), str(mpath))
        need = list(REQUIRED_COMPONENTS) + [f"und_expert_{i}" for i in range(manifest.model.num_experts)]
        for name in need:
            if name not in manifest.components:
                raise BundleError(f"{mpath}: component '{name}' is missing")
        bundle = cls(root, manifest)
        if check_files:
            bundle.verify_checksums()
        return bundle

    def verify_checksums(self) -> None:
        for file, digest in self.manifest.files():
            p = self.root / file
            if not p.exists():
                raise BundleError(f"{p}: missing file listed in {MANIFEST}")
            got = sha256_file(p)
            if got != digest:
                raise BundleError(f"{p}: sha256 mismatch (manifest {digest[:12]}..., file {got[:12]}...): corrupt or tampered")
