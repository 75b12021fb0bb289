"""The shapes world as the toolchain takes it (emma_export.worlds.World): the calibration corpus and
the task suite of a model trained on it. A checkpoint trained here names ``shapes_world.suite:WORLD``
in its world.json."""

from __future__ import annotations

from pathlib import Path

from emma_export.worlds import Corpus

from . import world


class ShapesWorld:
    name = "shapes"

    def calibration_corpus(self, recipe) -> Corpus:
        """The world's own data (photographs are far outside what the model saw, and would set the
        quantization ranges for inputs it never gets): train-split scenes, their questions, detailed
        captions and edit instructions at the 64x64 size it was trained on; a held-out recipe
        (``verify``) draws from the val split instead."""
        split = "val" if recipe.held_out else "train"
        n = max(recipe.images, recipe.generate_prompts, recipe.edit_prompts)
        exs = world.dataset(split, n, seed=77)
        names = [f"{split}-{i}" for i in range(n)]
        photos = {nm: ex.image for nm, ex in zip(names, exs)}
        prompts = {
            "understand": [qa.question for ex in exs for qa in ex.qas],
            "generate": [ex.caption_detailed for ex in exs],
            "edit": [ex.edits[i % len(ex.edits)].instruction for i, ex in enumerate(exs)],
        }
        return Corpus(names[: recipe.images], photos, prompts, [(exs[0].scene.height, exs[0].scene.width)])

    def task_figures(self, bundle_dir: Path, checkpoint: str | None, n: int) -> dict:
        """What users see, for this precision: the held-out suite through the bundle and through the
        fp32 PyTorch reference (same scenes, same initial noise), and the change against fp32."""
        from .evaluate import evaluate, headline

        ck = None
        if checkpoint:
            ck = Path(checkpoint) / "model.safetensors" if Path(checkpoint).is_dir() else Path(checkpoint)
        res = evaluate(bundle_dir, n=n, seed=0, reference=True, checkpoint=ck, ceiling=False)
        return {"n": n, "split": res["split"], "runtime": headline(res["runtime"]), "fp32_reference": headline(res["reference"]),
                "change_vs_fp32": res["delta"]}


WORLD = ShapesWorld()
