"""Per-step end-to-end parity can fail: the bugs an audit found passing the old result-only checks
(a decode against a stale prefix, one image attending causally) now fail, and understanding parity
runs on the trained shapes checkpoint, whose answers depend on the image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from emma_export.verify_e2e import E2E_MIN, verify_pipelines
from emma_runtime.bundle import Bundle
from emma_runtime.pipelines import Pipeline
from emma_runtime.sampling import initial_noise
from emma_runtime.trace import StepTrace

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "shapes"


def test_a_trace_changes_nothing(tiny_bundle):
    p = Pipeline.load(tiny_bundle)
    img = np.random.default_rng(0).uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)
    noise = initial_noise(1, 8, 2, 2)
    tr = StepTrace(keep_kv=True)
    a, b = p.understand(img, "hi", max_new_tokens=3), p.understand(img, "hi", max_new_tokens=3, trace=tr)
    assert a.token_ids == b.token_ids and len(tr.logits) == 4 and len(tr.kv) == 4
    tr = StepTrace()
    a, b = p.edit(img, "x", noise=noise), p.edit(img, "x", noise=noise, trace=tr)
    np.testing.assert_array_equal(a.latents, b.latents)
    np.testing.assert_array_equal(tr.latents[-1], b.latents)


@pytest.mark.parametrize("flavour", ["gqa", "standard"])
def test_decoding_against_a_stale_prefix_fails(flavour, tiny_bundle, tiny_bundle_standard, tiny_reference, monkeypatch):
    """Decode steps that never commit their key/value (the row's length never advances, so each
    step overwrites the last one's slot): every step sees the prefix only."""
    orig = Pipeline.run_chunk

    def stale(self, cache, embeds, branch, causal, commit=True):
        before = cache.lengths.copy()
        out = orig(self, cache, embeds, branch, causal, commit=commit)
        if embeds.shape[1] == 1 and branch == "und":
            cache.lengths = before
        return out

    monkeypatch.setattr(Pipeline, "run_chunk", stale)
    res = verify_pipelines(Bundle.load(tiny_bundle if flavour == "gqa" else tiny_bundle_standard), tiny_reference)
    u = res["understand"]
    assert not u["passed"] and "logits rel L2" in u["reason"], u
    assert u["logits_worst_step"] > 0  # the prefill itself is right; the decode steps are not
    assert u["token_agreement"] == 1.0  # and the greedy tokens alone would not have shown it
    assert res["generate"]["passed"] and res["edit"]["passed"]


def test_a_causal_target_image_fails(tiny_bundle, tiny_reference, monkeypatch):
    """The target image's tokens attend causally instead of bidirectionally (runtime only)."""
    orig = Pipeline.run_chunk

    def causal(self, cache, embeds, branch, causal, commit=True):
        return orig(self, cache, embeds, branch, True, commit)

    monkeypatch.setattr(Pipeline, "run_chunk", causal)
    res = verify_pipelines(Bundle.load(tiny_bundle), tiny_reference)
    for task in ("generate", "edit"):
        assert not res[task]["passed"] and "velocity rel L2" in res[task]["reason"], res[task]
    assert res["understand"]["passed"]


@pytest.fixture(scope="module")
def shapes_bundle(tmp_path_factory):
    if not (SHIPPED / "model.safetensors").exists():
        pytest.skip("no shipped checkpoint at checkpoints/shapes")
    from emma_export.export.bundle_writer import export_bundle
    from emma_export.export.source import WeightSource

    out = tmp_path_factory.mktemp("shapes-parity") / "bundle"
    src = WeightSource.from_args(None, str(SHIPPED / "model.safetensors"), 0)
    export_bundle(src, out, progress=False, tokenizer_file=SHIPPED / "tokenizer.json")
    return out, src.full_model()


def test_understanding_parity_on_the_trained_checkpoint(shapes_bundle):
    """Two scenes whose answers differ: the trained model reads the image, and the runtime's logits
    agree with the reference's at every decode step of both."""
    from shapes_world import world
    from emma_runtime.images import to_model

    bundle, model = shapes_bundle
    torch.set_num_threads(1)
    answers = {}
    for index in range(12):
        ex = world.make_example("val", index, 0)
        qa = ex.qas[0]  # "how many shapes are there?"
        if qa.answer in answers:
            continue
        res = verify_pipelines(Bundle.load(bundle), model, image=to_model(ex.image), prompt_understand=qa.question)
        for task, r in res.items():
            assert r["passed"], (task, r)
        u = res["understand"]
        assert u["logits_steps"] >= 2 and u["logits_rel_l2"] <= E2E_MIN["fp32"]["logits_rel_l2"]
        answers[qa.answer] = u["text"]
        if len(answers) == 2:
            break
    assert len(answers) == 2
    (a1, t1), (a2, t2) = answers.items()
    assert t1 != t2 and t1 == a1 and t2 == a2, answers
