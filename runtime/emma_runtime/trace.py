"""Per-step values of a pipeline run, for parity checks: pass a ``StepTrace`` to ``understand``,
``generate`` or ``edit`` and it collects what each step computed.

Tracing is off unless a trace is passed; recording copies arrays and never feeds anything back, so a
traced run computes exactly what an untraced one does. The PyTorch reference pipelines fill the same
structure, so the two sides are compared step by step, not only by their final result.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class StepTrace:
    #: understanding: the logits each token was chosen from, one (vocab,) array per decode step
    #: (index 0 comes from the prefill, index k after k decoded tokens)
    logits: list[np.ndarray] = field(default_factory=list)
    #: generation/editing: the guided velocity of each denoising step, (1, C, h, w)
    velocities: list[np.ndarray] = field(default_factory=list)
    #: generation/editing: the timestep each denoising step ran at
    timesteps: list[float] = field(default_factory=list)
    #: generation/editing: the latents after each denoising step, (1, C, h, w)
    latents: list[np.ndarray] = field(default_factory=list)
    #: when True, understanding also keeps (keys, values) of the valid cache positions after the
    #: prefill and after each decode step, each (T, layers, kv_heads, head_dim) for batch row 0
    keep_kv: bool = False
    kv: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    def add_logits(self, logits) -> None:
        self.logits.append(np.array(logits, dtype=np.float32, copy=True).reshape(-1))

    def add_step(self, t: float, velocity, latents) -> None:
        self.timesteps.append(float(t))
        self.velocities.append(np.array(velocity, dtype=np.float32, copy=True))
        self.latents.append(np.array(latents, dtype=np.float32, copy=True))

    def add_kv(self, keys, values) -> None:
        """keys/values (T, layers, batch, kv_heads, head_dim) on the host; row 0 is kept. Callers check
        ``keep_kv`` first, so an untraced cache is never copied off the device."""
        if self.keep_kv:
            self.kv.append((np.array(keys[:, :, 0], dtype=np.float32), np.array(values[:, :, 0], dtype=np.float32)))
