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

        from ..weights.checkpoint import checkpoint_root

        if checkpoint:
            root = checkpoint_root(checkpoint)
            cfg = read_config(root)
            if config_name and cfg.name != config_name:
                raise ValueError(f"{checkpoint}: checkpoint config is '{cfg.name}', not '{config_name}'")
            cfg.validate()
            return cls(cfg, seed, root)
        return cls(get_config(config_name or "tiny"), seed, None)

    @property
    def world(self) -> str | None:
        """The name of the world the checkpoint was trained on (its world.json), if any."""
        from ..worlds import of_checkpoint

        return of_checkpoint(self.checkpoint) if self.checkpoint is not None and self.checkpoint.is_dir() else None

    @property
    def tokenizer_file(self) -> Path | None:
        """The checkpoint's own tokenizer.json, if it has one (else the bundle gets the byte-level one)."""
        if self.checkpoint is not None and self.checkpoint.is_dir() and (self.checkpoint / "tokenizer.json").is_file():
            return self.checkpoint / "tokenizer.json"
        return None

    def model_for(self, comp: Component, dtype: str = "fp32") -> EMMA:
        """An EMMA whose tensors used by ``comp`` are real and all others stay on meta."""
        with torch.device("meta"):
            model = EMMA(self.cfg)
        td = DTYPES[dtype]
        if self.checkpoint is None:
            return materialize(model, self.seed, keep=comp.uses, dtype=td).eval()
        from ..weights.checkpoint import TensorReader, _files

        files, _ = _files(self.checkpoint)
        read = TensorReader(files, str(self.checkpoint))
        expected = model.state_dict(keep_vars=True)
        return materialize(model, self.seed, keep=comp.uses, dtype=td,
                           source=lambda name: read(name, floating=expected[name].is_floating_point())).eval()

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One state-dict tensor, alone (the streamed export reads the weights this way): the same
        values ``model_for`` gives it."""
        from ..weights.init import init_tensor

        like = self._shapes()[name]
        dt = dtype if like.is_floating_point() else like.dtype
        if self.checkpoint is None:
            return init_tensor(name, tuple(like.shape), dt, self.seed)
        value = self._reader()(name, floating=like.is_floating_point())
        if tuple(value.shape) != tuple(like.shape):
            raise ValueError(f"tensor '{name}' has shape {tuple(value.shape)}, expected {tuple(like.shape)}")
        return value.to(dt)

    def weight_bytes(self, comp: Component, dtype: str = "fp32") -> int:
        """Bytes of ``comp``'s tensors at ``dtype`` (from shapes alone)."""
        size = torch.tensor([], dtype=DTYPES[dtype]).element_size()
        return sum(t.numel() * (size if t.is_floating_point() else t.element_size())
                   for n, t in self._shapes().items() if comp.uses(n))

    def model_bytes(self) -> int:
        """Bytes of the whole model's tensors at fp32."""
        return sum(t.numel() * 4 for t in self._shapes().values())

    def _shapes(self) -> dict[str, torch.Tensor]:
        if not hasattr(self, "_meta"):
            with torch.device("meta"):
                self._meta = EMMA(self.cfg).state_dict()
        return self._meta

    def _reader(self):
        if not hasattr(self, "_read"):
            from ..weights.checkpoint import TensorReader, _files

            files, _ = _files(self.checkpoint)
            self._read = TensorReader(files, str(self.checkpoint))
        return self._read

    def full_model(self) -> EMMA:
        """The whole reference model (verify and calibration). Past the streaming threshold
        (emma-4b) its decoder layers' weights are read when each layer runs (``streamed_reference``)."""
        from .streamed_export import threshold

        if self.model_bytes() > threshold():
            from ..streamed_reference import streamed_model

            return streamed_model(self)
        if self.checkpoint is not None:
            from ..weights.checkpoint import load_checkpoint

            return load_checkpoint(self.checkpoint)
        from ..model.emma import build_model

        return build_model(self.cfg, self.seed)
