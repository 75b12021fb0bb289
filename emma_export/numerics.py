"""Worst-figure arithmetic that a NaN cannot hide in: every caller keeps the worst value seen with
``max``, and ``max(0.0, nan)`` is 0.0 in Python."""

from __future__ import annotations

import math

import numpy as np


def finite_or_inf(v: float) -> float:
    return v if math.isfinite(v) else math.inf


def abs_peak(a: np.ndarray) -> float:
    """The largest magnitude in ``a`` (0.0 when empty), inf when any value is not finite."""
    return finite_or_inf(float(np.abs(a).max())) if a.size else 0.0
