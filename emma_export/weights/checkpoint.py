"""EMMA checkpoints in safetensors (never pickle).

A checkpoint is either one ``.safetensors`` file whose metadata carries the config JSON, or a folder
with ``config.json``, ``model.safetensors`` (or shards plus ``model.safetensors.index.json``) and
optionally ``tokenizer.json``. A checkpoint is untrusted input: every shard the index names must be a
regular file inside the folder, and every tensor must have the dtype and shape the config implies.
A file given inside a checkpoint folder is taken as that folder (its config.json and tokenizer.json
belong to it: without them a bundle would carry the wrong tokenizer).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from emma_runtime.paths import UnsafePathError, confined

from ..config import EMMAConfig
from ..model.emma import EMMA

CONFIG_KEY = "emma_config"


class CheckpointError(ValueError):
    pass


def state_dict_for_save(model: EMMA) -> dict[str, torch.Tensor]:
    # The LM head is tied to the token embedding and holds no tensor of its own.
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(model: EMMA, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    path = Path(path)
    sd = state_dict_for_save(model)
    if dtype is not None:
        sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata={CONFIG_KEY: model.cfg.to_json()})
    tmp.replace(path)
    return path


MAX_JSON_BYTES = 64 << 20


def checkpoint_root(path: str | Path) -> Path:
    """The checkpoint a path means: a weight file inside a checkpoint folder means that folder."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors" and (path.parent / "config.json").is_file():
        return path.parent
    return path


def _json(path: Path, what: str):
    try:
        data = confined(path.parent, path.name, what, MAX_JSON_BYTES).read_bytes()
        return json.loads(data)
    except UnsafePathError as e:
        raise CheckpointError(str(e)) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({str(e)[:120]})") from None


def _config(d, where: str) -> EMMAConfig:
    try:
        cfg = EMMAConfig.from_dict(d)
        cfg.validate()
        return cfg
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{where}: not a valid EMMA config ({str(e)[:200]})") from None


def _files(path: Path) -> tuple[list[Path], EMMAConfig]:
    path = checkpoint_root(path)
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise CheckpointError(f"{cfg_file}: missing (an EMMA checkpoint folder needs config.json)")
        cfg = _config(_json(cfg_file, "checkpoint config"), str(cfg_file))
        index = path / "model.safetensors.index.json"
        if index.exists():
            wm = _json(index, "checkpoint index")
            wm = wm.get("weight_map") if isinstance(wm, dict) else None
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
            names = sorted(set(wm.values()))
        else:
            names = ["model.safetensors"]
        try:
            files = [confined(path, n, f"weight file of checkpoint {path}") for n in names]
        except UnsafePathError as e:
            raise CheckpointError(str(e)) from None
        return files, cfg
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e)[:160]})") from None
    if CONFIG_KEY not in meta:
        raise CheckpointError(f"{path}: safetensors metadata has no '{CONFIG_KEY}' (not an EMMA checkpoint)")
    try:
        d = json.loads(meta[CONFIG_KEY])
    except ValueError as e:
        raise CheckpointError(f"{path}: metadata '{CONFIG_KEY}' is not JSON ({e})") from None
    return [path], _config(d, f"{path} (metadata '{CONFIG_KEY}')")


class TensorReader:
    """Tensors by name across a checkpoint's files, each checked for its dtype when read.

    safetensors checks each file's header when it is opened; the tensors are then read with plain file
    reads, not through its mmap: a mapped page, once read, counts in the process's RSS for as long as
    the file stays open, and the layer-streamed emma-4b reference reads every weight of its branch on
    each call (the calibration capture from an init checkpoint: 22.4 GiB of RSS by `time -v`, about
    10 GB of it its own by `free`)."""

    def __init__(self, files: list[Path], source: str):
        from .upstream import SafetensorsFile

        self.source = source
        self.where: dict[str, SafetensorsFile] = {}
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as h:  # its header checks; the mapping goes at exit
                    keys = list(h.keys())
                sf = SafetensorsFile(f)
            except Exception as e:  # a pickle renamed .safetensors, a truncated header, ...
                raise CheckpointError(f"{f}: not a readable safetensors file ({str(e)[:160]})") from None
            for k in keys:
                self.where[k] = sf

    def __call__(self, name: str, floating: bool = True) -> torch.Tensor:
        if name not in self.where:
            raise CheckpointError(f"{self.source}: missing tensor '{name}'")
        try:
            t = self.where[name].get(name)
        except Exception as e:
            raise CheckpointError(f"{self.source}: tensor '{name}' cannot be read ({str(e)[:160]})") from None
        if floating and not t.is_floating_point():
            raise CheckpointError(f"{self.source}: tensor '{name}' has dtype {str(t.dtype).replace('torch.', '')}, expected a floating-point dtype")
        if floating and not torch.isfinite(t).all():
            raise CheckpointError(f"{self.source}: tensor '{name}' holds NaN or Inf")
        return t


def read_config(path: str | Path) -> EMMAConfig:
    return _files(Path(path))[1]


def load_state(path: str | Path) -> tuple[dict[str, torch.Tensor], EMMAConfig]:
    files, cfg = _files(Path(path))
    read = TensorReader(files, str(path))
    return {k: read(k, floating=False) for k in read.where}, cfg


def load_into(model: EMMA, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> EMMA:
    """Strict load with one error naming the first missing, unexpected or mis-shaped tensor."""
    expected = model.state_dict()
    for k, v in expected.items():
        if k not in sd:
            raise CheckpointError(f"{source}: missing tensor '{k}' (expected shape {tuple(v.shape)})")
        if tuple(sd[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{source}: tensor '{k}' has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}"
            )
        if v.is_floating_point() and not sd[k].is_floating_point():
            raise CheckpointError(f"{source}: tensor '{k}' has dtype {str(sd[k].dtype).replace('torch.', '')}, expected a floating-point dtype")
    extra = sorted(set(sd) - set(expected))
    if extra:
        raise CheckpointError(f"{source}: unexpected tensor '{extra[0]}' ({len(extra)} unexpected in all)")
    model.load_state_dict({k: sd[k].to(expected[k].dtype) for k in expected}, strict=True)
    return model


def load_checkpoint(path: str | Path) -> EMMA:
    sd, cfg = load_state(path)
    cfg.validate()
    model = EMMA(cfg)
    return load_into(model, sd, str(path)).eval()
