"""`emma-export`: the export-side command line. ``main`` is the group (app.py); each module registers
its commands on it, and importing this package imports them all."""

from . import build, engines, export, info, pack, plan, shapes, upstream, verify  # noqa: F401 - registers the commands
from .app import main

__all__ = ["main"]
