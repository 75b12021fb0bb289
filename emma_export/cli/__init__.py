"""`emma-export`: the export-side command line. ``main`` is the group (app.py); each module registers
its commands on it, and importing this package imports them all."""

from importlib.metadata import entry_points

from . import build, engines, export, info, pack, plan, upstream, verify  # noqa: F401 - registers the commands
from .app import main

# Commands of installed worlds (e.g. the shapes world's train-shapes / evaluate / world): their modules
# register on ``main`` when loaded; the toolchain itself imports no world.
for _ep in entry_points(group="emma_export.commands"):
    _ep.load()

__all__ = ["main"]
