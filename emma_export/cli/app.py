"""The `emma-export` group: one ``main``, every command registered on it by the modules of this
package (one module per family of commands, each importing ``main`` from here: no cycle)."""

from __future__ import annotations


import click

from emma_runtime.cli_support import USER_ERRORS, OneLineGroup
from emma_runtime.cli_support import fail  # noqa: F401 - the one error helper of every command module



class _ExportGroup(OneLineGroup):
    # the toolchain's own input errors (checkpoints, upstream folders, targets, output folders, builds)
    # are ValueErrors or BuildError; they end as one line and exit 2 like the runtime's
    @property
    def user_errors(self):
        from ..build import BuildError

        return USER_ERRORS + (ValueError, BuildError)


@click.group(cls=_ExportGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Export EMMA from PyTorch to ONNX / TensorRT bundles, verify them, and inspect configs."""


def gib(n: float) -> str:
    """Bytes as GiB with two decimals (tables say the unit in their header)."""
    return f"{n / 2**30:.2f}"
