"""The public Python API: ``from emma_runtime import Pipeline``.

A thin facade over the engine (``emma_runtime.pipelines.Pipeline``), whose detailed results
(token ids, timings, latents) verify, evaluate, bench and the server read. This class takes the
inputs an application has (a path, a PIL image or an array) and returns what it wants (a string, a
PIL image); the ``*_result`` methods return the engine's detailed outputs for callers such as the
CLI that also report timings.

    from emma_runtime import Pipeline

    pipe = Pipeline.load("bundles/shapes", providers=["cuda", "cpu"])
    answer = pipe.understand("scene.png", "what colour is the circle?")
    image = pipe.generate("a red circle and a blue square", width=64, height=64, seed=0)
    edited = pipe.edit(image, "make the circle green", seed=0)
    edited.save("edited.png")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from .backends import make_backend
from .bundle import Bundle
from .images import ImageError, from_pil, to_pil
from .limits import Limits, RequestError
from .pipelines import ImageOutput, UnderstandOutput
from .pipelines import Pipeline as _Engine

#: What ``understand`` and ``edit`` accept as the image: a file path (JPEG/PNG/WebP), a PIL image,
#: an ``(H, W, 3)`` uint8 RGB array, or a float array in the model's layout, ``(1, 3, H, W)`` or
#: ``(3, H, W)`` in [-1, 1]. Paths, PIL images and uint8 arrays are resized to the nearest multiple
#: of 32 per side and scaled down to the bundle's largest size; model-layout arrays must already fit.
ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


class Pipeline:
    """EMMA on one bundle: ``understand``, ``generate``, ``edit``.

    Load with :meth:`load`. Errors in a request (an image of the wrong size, a prompt longer than
    the context, an unreadable file, an option out of range) raise ``RequestError`` (a ``ValueError``)
    with one line naming what was wrong; a bad bundle raises ``BundleError`` (also a ``ValueError``).
    """

    def __init__(self, engine: _Engine):
        self._engine = engine

    @classmethod
    def load(cls, path: str | os.PathLike, backend: str = "ort", providers: str | Sequence[str] | None = None, *,
             cfg_mode: str = "batch", progress: bool = False, limits: Limits | None = None) -> "Pipeline":
        """Opens the bundle folder ``path``: every graph is read once, checked against its sha256 in the
        manifest, and its session opened from those bytes.

        Args:
            path: the bundle folder written by ``emma-export export`` (or ``emma-run unpack``).
            backend: ``"ort"`` (ONNX Runtime, the bundle's ONNX graphs) or ``"trt"`` (its TensorRT engines).
            providers: ONNX Runtime execution providers in order of preference, by short name
                (``"cpu"``, ``"cuda"``, ``"tensorrt"``) or full name; one name or a list. ``None`` takes
                the best available here. Only for ``backend="ort"``.
            cfg_mode: ``"batch"`` runs the guidance prefixes as one batch per denoising step,
                ``"sequential"`` one call per prefix (less memory).
            progress: show progress bars for decoding and denoising (on a terminal).
            limits: what one request may ask (default: the bundle's profile and the fixed ceilings
                of ``emma_runtime.Limits``).
        """
        if backend != "ort" and providers:
            raise ValueError(f"providers apply to the ort backend, not {backend!r}")
        # Paths are checked at load; contents are hashed as each graph is opened, from the bytes used.
        engine = _Engine(Bundle.load(path, check_files=False), make_backend(backend, providers), quiet=not progress,
                         cfg_mode=cfg_mode, limits=limits)
        return cls(engine)

    # ---- what was loaded ------------------------------------------------------------------------
    @property
    def bundle(self) -> Bundle:
        """The loaded bundle (its ``manifest`` says config, precision, target and components)."""
        return self._engine.bundle

    @property
    def engine(self) -> _Engine:
        """The engine underneath, for component-level access (``emma_runtime.pipelines.Pipeline``)."""
        return self._engine

    def describe(self) -> str:
        """One line: the backend, its version and providers (or GPU)."""
        return self._engine.backend.describe()

    # ---- inputs ---------------------------------------------------------------------------------
    def image_array(self, image: ImageInput) -> np.ndarray:
        """``image`` as the model takes it: ``(1, 3, H, W)`` float32 in [-1, 1], H and W multiples of 32
        within the request limits."""
        if isinstance(image, (str, os.PathLike)):
            return self._engine._image(Path(image))
        if isinstance(image, Image.Image):
            return self._from_pil(image)
        if isinstance(image, np.ndarray):
            if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
                return self._from_pil(Image.fromarray(image))
            if image.ndim == 3 and image.shape[0] == 3:
                image = image[None]
            if image.ndim == 4 and image.shape[:2] == (1, 3) and np.issubdtype(image.dtype, np.floating):
                return self._engine._image(image)
            raise RequestError(f"image array of shape {image.shape} and dtype {image.dtype}: expected (H, W, 3) uint8 RGB "
                               f"or (1, 3, H, W) / (3, H, W) float in [-1, 1]")
        raise RequestError(f"image must be a path, a PIL image or a numpy array, got {type(image).__name__}")

    def _from_pil(self, im: Image.Image) -> np.ndarray:
        try:
            return from_pil(im, self._engine.dims.cell, fit=self._engine.limits.fit)
        except (ImageError, OSError, ValueError) as e:  # a lazily decoded image can fail only now
            if isinstance(e, RequestError):
                raise
            raise RequestError(f"PIL image: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

    # ---- tasks ----------------------------------------------------------------------------------
    def understand(self, image: ImageInput, prompt: str, *, max_new_tokens: int = 32, temperature: float = 0.0,
                   top_p: float = 1.0, seed: int = 0) -> str:
        """Answers ``prompt`` about ``image``.

        Args:
            image: see :data:`ImageInput`.
            prompt: the question.
            max_new_tokens: the longest answer, in tokens.
            temperature: 0 decodes greedily; above 0 samples (with ``top_p`` nucleus filtering).
            top_p: nucleus sampling mass, used when ``temperature`` > 0.
            seed: the sampler's seed (the answer is reproducible for a given seed).

        Returns:
            The answer text.
        """
        return self.understand_result(image, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                      top_p=top_p, seed=seed).text

    def understand_result(self, image: ImageInput, prompt: str, *, max_new_tokens: int = 32, temperature: float = 0.0,
                          top_p: float = 1.0, seed: int = 0) -> UnderstandOutput:
        """As :meth:`understand`, returning the detailed result: ``text``, ``token_ids``, the vision
        ``expert`` the router chose, ``visual_tokens`` and ``timings`` (seconds)."""
        return self._engine.understand(self.image_array(image), prompt, max_new_tokens, temperature, top_p, seed)

    def generate(self, prompt: str, width: int | None = None, height: int | None = None, seed: int = 0, *,
                 steps: int | None = None, cfg: float | None = None, shift: float | None = None) -> Image.Image:
        """Draws an image for ``prompt``.

        Args:
            prompt: the description.
            width, height: pixels, multiples of 32 (default: the bundle's image size).
            seed: the initial noise's seed (same seed, same image).
            steps: denoising steps (default: the bundle's).
            cfg: classifier-free guidance scale (default: the bundle's; 1 turns guidance off).
            shift: timestep shift of the flow-matching schedule (default: the bundle's).

        Returns:
            An RGB PIL image of ``width`` x ``height``.
        """
        return to_pil(self.generate_result(prompt, width, height, seed, steps=steps, cfg=cfg, shift=shift).image)

    def generate_result(self, prompt: str, width: int | None = None, height: int | None = None, seed: int = 0, *,
                        steps: int | None = None, cfg: float | None = None, shift: float | None = None) -> ImageOutput:
        """As :meth:`generate`, returning the detailed result: ``image`` ((1, 3, H, W) in [-1, 1]),
        ``latents``, ``visual_tokens`` and ``timings`` (seconds)."""
        return self._engine.generate(prompt, height, width, steps, cfg, shift, seed)

    def edit(self, image: ImageInput, prompt: str, seed: int = 0, *, steps: int | None = None,
             cfg_text: float | None = None, cfg_image: float | None = None, shift: float | None = None) -> Image.Image:
        """Edits ``image`` following the instruction ``prompt``.

        Args:
            image: the image to edit (see :data:`ImageInput`); the result has its size (rounded to 32).
            prompt: the instruction.
            seed: the initial noise's seed.
            steps: denoising steps (default: the bundle's).
            cfg_text: guidance towards the instruction (default: the bundle's).
            cfg_image: guidance towards the input image (default: the bundle's).
            shift: timestep shift (default: the bundle's).

        Returns:
            The edited RGB PIL image.
        """
        return to_pil(self.edit_result(image, prompt, seed, steps=steps, cfg_text=cfg_text, cfg_image=cfg_image,
                                       shift=shift).image)

    def edit_result(self, image: ImageInput, prompt: str, seed: int = 0, *, steps: int | None = None,
                    cfg_text: float | None = None, cfg_image: float | None = None, shift: float | None = None) -> ImageOutput:
        """As :meth:`edit`, returning the detailed result (see :meth:`generate_result`)."""
        return self._engine.edit(self.image_array(image), prompt, steps, cfg_text, cfg_image, shift, seed)
