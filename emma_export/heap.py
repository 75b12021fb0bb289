"""The process heap at emma-4b scale: large arrays mmapped (given back when freed), and what a stage
freed returned to the system between slices and components.

emma-4b's quantization runs one decoder layer's graph at a time, each slice's sessions and Model
Optimizer's work freed before the next. glibc raises its mmap threshold (up to 32 MB) each time an
mmapped block is freed, after which a layer's activations come from the heap and fragment it. (What
the slices hand on must also own its memory: ``layer_slices._own``.)"""

from __future__ import annotations

import ctypes
import gc

_M_MMAP_THRESHOLD = -3


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to ask
        return None


def steady_heap() -> None:
    """Blocks of 1 MiB and more from mmap for the rest of the process (fixed, so glibc stops raising it)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)


def give_back() -> None:
    """Freed memory back to the system: glibc otherwise keeps what a conversion or a slice freed, and the
    emma-4b fp8 build sat at 12-14 GB between small components, so the next large one started there."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
