"""EMMA checkpoints in safetensors (never pickle).

A checkpoint is either one ``.safetensors`` file whose metadata carries the config JSON, or a folder
with ``config.json``, ``model.safetensors`` (or shards plus ``model.safetensors.index.json``) and
optionally ``tokenizer.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

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


def _files(path: Path) -> tuple[list[Path], EMMAConfig]:
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise CheckpointError(f"{cfg_file}: missing (an EMMA checkpoint folder needs config.json)")
        cfg = EMMAConfig.from_json(cfg_file.read_text())
        index = path / "model.safetensors.index.json"
        if index.exists():
            files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = [path / "model.safetensors"]
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{f}: missing weight file of checkpoint {path}")
        return files, cfg
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if CONFIG_KEY not in meta:
        raise CheckpointError(f"{path}: safetensors metadata has no '{CONFIG_KEY}' (not an EMMA checkpoint)")
    return [path], EMMAConfig.from_json(meta[CONFIG_KEY])


def read_config(path: str | Path) -> EMMAConfig:
    return _files(Path(path))[1]


def load_state(path: str | Path) -> tuple[dict[str, torch.Tensor], EMMAConfig]:
    files, cfg = _files(Path(path))
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    sd[k] = h.get_tensor(k)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{f}: corrupt safetensors file ({e})") from None
    return sd, cfg


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
