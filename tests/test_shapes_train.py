"""The trained shapes-world EMMA (issue #10): training smoke run, evaluation, and the shipped checkpoint's
held-out quality through the runtime and the reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "checkpoints" / "shapes"

# Floors for n=20 held-out scenes, below what the shipped checkpoint measures there (understanding 0.995,
# generation 1.0, edit 0.95, AE 38.7 dB; 0.997 / 0.978 / 0.938 / 38.25 dB at n=400; the targets are
# 0.85 / 0.9 / 0.8 / 30 dB, see README): a broken export, checkpoint or pipeline (random weights: generation
# and edit ~0) falls below, and so does the previous, blurrier decoder (31.4 dB).
FLOORS = {"generation": 0.85, "understanding": 0.9, "edit": 0.8, "ae_psnr": 35.0}
# jitter_share of the shipped autoencoder measures 0.018 / 0.051 (one / two shapes); an autoencoder trained
# without the smoothness term, 0.31 / 0.58
JITTER_CEILING = 0.1


def test_smoke_training_writes_a_loadable_checkpoint(tmp_path):
    from shapes_world.train import TrainSettings, train
    from emma_export.weights.checkpoint import load_checkpoint

    s = TrainSettings(ae_steps=2, steps=2, dec_steps=2, ae_batch=4, batch_und=2, batch_gen=2, batch_edit=2, dec_batch=2,
                      measure_n=8, progress=False, seed=3)
    rep = train(tmp_path / "ck", s, echo=lambda *_: None)
    assert rep.ae_steps == 2 and rep.steps == 2 and rep.dec_steps == 2 and rep.dec_val_psnr is not None
    f = tmp_path / "ck" / "model.safetensors"
    assert f.stat().st_size < 8e6
    from safetensors import safe_open

    with safe_open(str(f), framework="pt") as h:
        assert all(h.get_tensor(k).dtype == torch.float16 for k in h.keys() if h.get_tensor(k).is_floating_point())
    model = load_checkpoint(f)
    assert model.cfg.name == "shapes"
    assert model.cfg.ae.scaling_factor == pytest.approx(rep.scaling_factor, rel=1e-6)
    # the STEM expert is the versatile one and the router always picks expert 0
    e0, e1 = model.vision.experts[0].state_dict(), model.vision.experts[1].state_dict()
    assert all(torch.equal(e0[k], e1[k]) for k in e0)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert model.vision(x)[1].tolist() == [0, 0]
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["name"] == "shapes"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "ck" / "tokenizer.json"))
    assert tok.token_to_id("<|im_end|>") is not None
    # same seed and step counts: the same weights
    rep2 = train(tmp_path / "ck2", s, echo=lambda *_: None)
    assert (tmp_path / "ck2" / "model.safetensors").read_bytes() == f.read_bytes()
    assert rep2.steps == 2


def test_decoder_finetune_moves_only_the_decoder(tmp_path):
    """``train-shapes --decoder-from``: the decoder changes, every other tensor (and so every latent the
    other components were trained on) stays bit for bit; train.json gains the stage's record."""
    if not (SHIPPED / "model.safetensors").exists():
        pytest.skip("no shipped checkpoint at checkpoints/shapes")
    from safetensors.torch import load_file

    from shapes_world.train import TrainSettings, finetune_decoder

    s = TrainSettings(minutes=1.0, dec_steps=2, dec_batch=2, measure_n=4, progress=False)
    rec = finetune_decoder(SHIPPED, tmp_path / "ft", s, echo=lambda *_: None)
    assert rec["steps"] == 2
    a, b = load_file(str(SHIPPED / "model.safetensors")), load_file(str(tmp_path / "ft" / "model.safetensors"))
    assert a.keys() == b.keys()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.startswith("ae.decoder.") for k in changed)
    assert all(b[k].dtype == torch.float16 for k in b if b[k].is_floating_point())
    meta = json.loads((tmp_path / "ft" / "train.json").read_text())
    assert meta["decoder_finetune"][-1]["steps"] == 2
    assert (tmp_path / "ft" / "tokenizer.json").read_bytes() == (SHIPPED / "tokenizer.json").read_bytes()
    # with latent noise: still only the decoder moves, and it moves elsewhere than without
    s.dec_latent_noise = 0.2
    rec = finetune_decoder(SHIPPED, tmp_path / "noisy", s, echo=lambda *_: None)
    c = load_file(str(tmp_path / "noisy" / "model.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a if not k.startswith("ae.decoder."))
    assert any(not torch.equal(b[k], c[k]) for k in changed)
    assert rec["settings"]["dec_latent_noise"] == 0.2


def test_joint_finetune_keeps_the_autoencoder_and_saves_average_and_last(tmp_path):
    """``train-shapes --joint-from --average``: the autoencoder (so every latent and the scaling factor)
    stays bit for bit, the backbone moves, the averaged weights lie between the start and the last step
    (out/last/ holds those), and train.json gains the stage's record."""
    if not (SHIPPED / "model.safetensors").exists():
        pytest.skip("no shipped checkpoint at checkpoints/shapes")
    from safetensors.torch import load_file

    from shapes_world.train import TrainSettings, finetune_joint

    s = TrainSettings(minutes=1.0, steps=3, batch_und=2, batch_gen=2, batch_edit=2, lr=5e-4, progress=False)
    rec = finetune_joint(SHIPPED, tmp_path / "ft", s, average=0.9, echo=lambda *_: None)
    assert rec["steps"] == 3
    a = load_file(str(SHIPPED / "model.safetensors"))
    avg = load_file(str(tmp_path / "ft" / "model.safetensors"))
    last = load_file(str(tmp_path / "ft" / "last" / "model.safetensors"))
    assert a.keys() == avg.keys() == last.keys()
    assert all(torch.equal(a[k], avg[k]) and torch.equal(a[k], last[k]) for k in a if k.startswith("ae."))
    moved = [k for k in a if k.startswith("llm.") and not torch.equal(a[k], last[k])]
    assert moved
    # the average has moved less far from the start than the last step
    d_avg = sum(float((avg[k].float() - a[k].float()).norm()) for k in moved)
    d_last = sum(float((last[k].float() - a[k].float()).norm()) for k in moved)
    assert 0 < d_avg < d_last
    meta = json.loads((tmp_path / "ft" / "train.json").read_text())
    assert meta["joint_finetune"][-1]["steps"] == 3 and meta["joint_finetune"][-1]["settings"]["average"] == 0.9
    assert json.loads((tmp_path / "ft" / "config.json").read_text()) == json.loads((SHIPPED / "config.json").read_text())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--joint-from", str(SHIPPED), "--decoder-from", str(SHIPPED)], "one of --decoder-from and --joint-from"),
        (["--average", "0.999"], "--average applies to --joint-from only"),
        (["--joint-from", str(SHIPPED), "--average", "1.5"], "--average must be at least 0 and below 1"),
        (["--joint-from", str(SHIPPED), "--batch", "0", "0", "0"], "--batch needs three row counts"),
        (["--joint-from", str(ROOT / "tests")], "tests: no model.safetensors"),
    ],
)
def test_train_shapes_joint_from_bad_arguments(tmp_path, args, message):
    from click.testing import CliRunner

    from emma_export.cli import main

    r = CliRunner().invoke(main, ["train-shapes", "--out", str(tmp_path / "o"), "--quiet", *args])
    assert r.exit_code != 0
    assert message in r.output
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def shipped_bundle(tmp_path_factory):
    if not (SHIPPED / "model.safetensors").exists():
        pytest.skip("no shipped checkpoint at checkpoints/shapes")
    from emma_export.export.bundle_writer import export_bundle
    from emma_export.export.source import WeightSource

    out = tmp_path_factory.mktemp("shapes") / "bundle"
    export_bundle(WeightSource.from_args(None, str(SHIPPED / "model.safetensors"), 0), out, progress=False,
                  tokenizer_file=SHIPPED / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def shipped_eval(shipped_bundle):
    from shapes_world.evaluate import evaluate

    torch.set_num_threads(2)
    return evaluate(shipped_bundle, n=20, seed=0, reference=True)


def test_shipped_checkpoint_files():
    if not (SHIPPED / "model.safetensors").exists():
        pytest.skip("no shipped checkpoint at checkpoints/shapes")
    from emma_export.weights.checkpoint import read_config

    assert (SHIPPED / "model.safetensors").stat().st_size < 8e6
    assert read_config(SHIPPED / "model.safetensors").name == "shapes"
    assert (SHIPPED / "tokenizer.json").exists() and (SHIPPED / "config.json").exists()


def test_evaluation_table_fields(shipped_eval):
    from shapes_world.evaluate import table_rows

    r = shipped_eval
    for side in ("runtime", "reference"):
        s = r[side]
        assert set(s) >= {"understanding", "generation", "edit", "ae"}
        assert {"count", "colour", "shape", "position", "size", "presence"} <= set(s["understanding"]["per_type"])
        assert {"colour", "shape", "position", "all"} <= set(s["generation"])
        assert {"success", "per_op", "untouched_psnr"} <= set(s["edit"])
        assert s["understanding"]["questions"] > 20 * 5
        # the detector reads the autoencoder's reconstructions of the scenes: what generation can reach
        assert s["ae"]["readback"] >= 0.95
    assert r["detector_ceiling"]["all"] >= 0.95
    names = [row[0] for row in table_rows(r)]
    assert "generation all" in names and "edit success" in names and "AE PSNR" in names and "AE readback" in names
    assert all(len(row) == 5 for row in table_rows(r))  # metric, runtime, reference, target, ceiling
    json.dumps(r)  # JSON-ready


@pytest.mark.parametrize("side", ["runtime", "reference"])
def test_shipped_checkpoint_quality_floors(shipped_eval, side):
    from shapes_world.evaluate import headline

    h = headline(shipped_eval[side])
    for k, floor in FLOORS.items():
        assert h[k] >= floor, f"{side} {k} = {h[k]:.3f} < {floor}"


def test_runtime_and_reference_agree(shipped_eval):
    d = shipped_eval["delta"]
    # n = 20: one scene is 5 points, so allow one disagreeing scene per task (questions are many more)
    assert abs(d["understanding"]) <= 2.0
    assert abs(d["generation"]) <= 5.0 and abs(d["edit"]) <= 5.0
    assert abs(d["ae_psnr"]) <= 0.1


def test_build_report_has_task_figures_against_fp32(tmp_path):
    if not (SHIPPED / "model.safetensors").exists():
        pytest.skip("no shipped checkpoint at checkpoints/shapes")
    from emma_export.build import build

    rep = build(checkpoint=str(SHIPPED), precision="fp32", target="cpu", out=tmp_path / "b", task_eval_n=4, echo=None)
    t = rep.tasks
    assert t["n"] == 4 and set(t["runtime"]) == {"understanding", "generation", "edit", "ae_psnr"}
    for k, v in t["runtime"].items():
        d = (v - t["fp32_reference"][k]) * (1 if k == "ae_psnr" else 100)
        assert t["change_vs_fp32"][k] == pytest.approx(d)
    # fp32 runtime against the fp32 reference: the same scenes, the same noise, the same answers
    assert abs(t["change_vs_fp32"]["understanding"]) <= 4.0 and abs(t["change_vs_fp32"]["ae_psnr"]) < 0.1
    saved = json.loads((tmp_path / "b" / "build-report.json").read_text())
    assert saved["tasks"]["n"] == 4


def test_evaluate_on_the_val_split(shipped_bundle):
    from shapes_world import world
    from shapes_world.evaluate import evaluate

    r = evaluate(shipped_bundle, n=3, seed=0, split="val", ceiling=False)
    assert r["split"] == "val" and r["runtime"]["generation"]["n"] == 3
    # val scenes never hold a held-out combination, held-out ones always do
    assert not any(world.held_out(e.scene) for e in world.dataset("val", 3, seed=0))
    assert all(world.held_out(e.scene) for e in world.dataset("heldout", 3, seed=0))


def test_evaluate_refuses_a_bundle_not_trained_on_the_world(tiny_bundle):
    from click.testing import CliRunner

    from emma_export.cli import main

    r = CliRunner().invoke(main, ["evaluate", "--bundle", str(tiny_bundle), "--n", "1"])
    assert r.exit_code != 0 and "config 'shapes'" in r.output and len(r.output.strip().splitlines()) == 1


def test_shifted_scene_moves_each_shape_by_at_most_px_and_stays_valid():
    import numpy as np

    from shapes_world import world
    from shapes_world.train import shifted

    rng = np.random.default_rng(0)
    moved = 0
    for e in world.dataset("train", 40, seed=1):
        s2 = shifted(e.scene, 2, rng)
        world.validate(s2)
        for a, b in zip(e.scene.shapes, s2.shapes):
            assert (a.kind, a.colour, a.size) == (b.kind, b.colour, b.size)
            assert abs(a.cx - b.cx) <= 2 and abs(a.cy - b.cy) <= 2
            moved += (a.cx, a.cy) != (b.cx, b.cy)
        assert world.caption(s2, detailed=True) == e.caption_detailed  # the same caption: only jitter moved
    assert moved > 20


def test_shipped_autoencoder_latents_are_smooth_in_the_jitter():
    """The shipped autoencoder was trained with the translation-smoothness term: one caption's scenes (the
    world's jitter only) stay close in latent space."""
    if not (SHIPPED / "model.safetensors").exists():
        pytest.skip("no shipped checkpoint at checkpoints/shapes")
    from shapes_world.train import jitter_share
    from emma_export.weights.checkpoint import load_checkpoint

    m = load_checkpoint(SHIPPED / "model.safetensors").float().eval()
    assert jitter_share(m, 1, scenes=4) < JITTER_CEILING and jitter_share(m, 2, scenes=4) < JITTER_CEILING
