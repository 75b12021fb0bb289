"""Where a component's weights come from: a seeded random init or a safetensors checkpoint.

Each component is materialised on its own from a model skeleton on the meta device, so exporting
emma-4b holds one component's weights at a time, never the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..components import Component
from ..config import EMMAConfig
from ..model.emma import EMMA
from ..weights.init import materialize

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class WeightSource:
    cfg: EMMAConfig
    seed: int = 0
    checkpoint: Path | None = None

    @classmethod
    def from_args(cls, config_name: str | None, checkpoint: str | None, seed: int = 0) -> "WeightSource":
        from ..config import get_config
        from ..weights.checkpoint import read_config

        if checkpoint:
            cfg = read_config(checkpoint)
            if config_name and cfg.name != config_name:
                raise ValueError(f"{checkpoint}: checkpoint config is '{cfg.name}', not '{config_name}'")
            cfg.validate()
            return cls(cfg, seed, Path(checkpoint))
        return cls(get_config(config_name or "tiny"), seed, None)

    def model_for(self, comp: Component, dtype: str = "fp32") -> EMMA:
        """An EMMA whose tensors used by ``comp`` are real and all others stay on meta."""
        with torch.device("meta"):
            model = EMMA(self.cfg)
        td = DTYPES[dtype]
        if self.checkpoint is None:
            return materialize(model, self.seed, keep=comp.uses, dtype=td).eval()
        from ..weights.checkpoint import _files
        from safetensors import safe_open

        files, _ = _files(self.checkpoint)
        handles = [safe_open(str(f), framework="pt") for f in files]
        where = {k: h for h in handles for k in h.keys()}

        def read(name: str) -> torch.Tensor:
            if name not in where:
                raise ValueError(f"{self.checkpoint}: missing tensor '{name}'")
            return where[name].get_tensor(name)

        return materialize(model, self.seed, keep=comp.uses, dtype=td, source=read).eval()

    def full_model(self) -> EMMA:
        """The whole reference model (verify and the small configs)."""
        if self.checkpoint is not None:
            from ..weights.checkpoint import load_checkpoint

            return load_checkpoint(self.checkpoint)
        from ..model.emma import build_model

        return build_model(self.cfg, self.seed)
