"""A world a model was trained on: its own calibration corpus and its own task suite, which the build
takes as arguments (a model trained on flat shapes must be calibrated on shapes, not photographs, and
its bundle scored on its tasks).

A checkpoint names its world in ``world.json`` (``{"world": "shapes"}``); the bundle's manifest
records the name under ``weights.world``. A name resolves only through the installed ``emma_export.worlds``
entry points (pyproject.toml), never as a module path: a manifest is untrusted input and must not choose
what gets imported. No world is a special case of a config name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

WORLD_FILE = "world.json"
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
ENTRY_POINTS = "emma_export.worlds"


@dataclass
class Corpus:
    """What calibration runs the reference pipelines on: named RGB images, prompts per task
    (understand / generate / edit) and the (H, W) sizes to use."""

    names: list[str]
    photos: dict
    prompts: dict[str, list[str]]
    sizes: list[tuple[int, int]]


class World(Protocol):
    name: str

    def calibration_corpus(self, recipe) -> Corpus:
        """The corpus for a calibration recipe (``recipe.held_out``: data never calibrated on)."""

    def task_figures(self, bundle_dir: Path, checkpoint: str | None, n: int) -> dict:
        """Task figures of the bundle and of the fp32 reference on the same held-out data: a dict with
        ``runtime``, ``fp32_reference`` and ``change_vs_fp32`` (points; dB for PSNR entries)."""


def available() -> dict:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINTS)}


def load(name: str | None) -> World | None:
    """The installed world called ``name`` (None: no world)."""
    if not name:
        return None
    eps = available()
    if not isinstance(name, str) or name not in eps:
        raise ValueError(f"unknown world {name!r}; installed: {', '.join(sorted(eps)) or 'none'}")
    try:
        return eps[name].load()
    except (ImportError, AttributeError) as e:
        raise ValueError(f"world {name!r} cannot be loaded ({e})") from None


def of_checkpoint(checkpoint: str | Path | None) -> str | None:
    """The name of the world a checkpoint folder names in world.json, if any."""
    if checkpoint is None:
        return None
    from emma_runtime.paths import UnsafePathError, confined

    folder = Path(checkpoint)
    if not (folder / WORLD_FILE).exists():
        return None
    try:
        d = json.loads(confined(folder, WORLD_FILE, "checkpoint world", 1 << 16).read_text())
    except (UnsafePathError, ValueError) as e:
        raise ValueError(f"{folder / WORLD_FILE}: {e}") from None
    name = d.get("world") if isinstance(d, dict) else None
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{folder / WORLD_FILE}: 'world' must be a world's name, got {name!r}")
    return name
