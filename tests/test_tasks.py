"""Task-subset bundles (issue 23): ``--tasks understand|generate|edit`` exports only the components the
runtime's pipelines for those tasks run, the manifest records the tasks, the runtime loads such a
bundle, runs its tasks and refuses the others with one line, and ``plan --tasks`` counts only them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from emma_runtime import names


def _used(tiny_bundle) -> dict[str, set[str]]:
    """Which graphs each runtime pipeline really runs (recorded, not assumed)."""
    from emma_runtime.pipelines import Pipeline
    from emma_runtime.sampling import initial_noise

    p = Pipeline.load(tiny_bundle)
    seen: set[str] = set()
    run = p._run

    def record(name, outputs=None, **inputs):
        seen.add(name)
        return run(name, outputs, **inputs)

    p._run = record
    img = np.random.default_rng(0).uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)
    out = {}
    for task, call in (("understand", lambda: p.understand(img, "what is it?", max_new_tokens=2)),
                       ("generate", lambda: p.generate("a red circle", 64, 64, steps=2, noise=initial_noise(0, p.dims.latent_channels, 2, 2))),
                       ("edit", lambda: p.edit(img, "make it blue", steps=2, noise=initial_noise(0, p.dims.latent_channels, 2, 2)))):
        seen.clear()
        call()
        out[task] = set(seen)
    return out


def test_the_registry_matches_what_the_pipelines_run(tiny_bundle, tiny_cfg):
    used = _used(tiny_bundle)
    E = tiny_cfg.vision.num_experts
    for task in names.TASKS:
        want = set(names.for_task(task, E, tiny_cfg.reference_branch))
        got = used[task]
        if task == "understand":
            # the router picks one expert per image; the bundle must hold every one it may pick
            assert got <= want and want - got <= {names.expert(i) for i in range(E)}
        else:
            assert got == want, task
    assert names.AE_ENCODER in names.for_task("understand", E)  # the Und adapter takes latents too
    assert names.LM_HEAD not in names.for_task("generate", E)
    assert names.expert(1) not in names.for_task("edit", E)  # editing forces expert 0


@pytest.fixture(scope="module")
def understand_bundle(tmp_path_factory):
    from emma_export.export.bundle_writer import export_bundle
    from emma_export.export.source import WeightSource

    out = tmp_path_factory.mktemp("tasks") / "understand"
    export_bundle(WeightSource.from_args("tiny", None, 0), out, progress=False, tasks=("understand",))
    return out


def test_understand_bundle_has_its_components_and_runs(understand_bundle, tiny_cfg):
    from emma_runtime.bundle import Bundle, BundleError
    from emma_runtime.pipelines import Pipeline

    m = json.loads((understand_bundle / "manifest.json").read_text())
    assert m["tasks"] == ["understand"]
    assert set(m["components"]) == set(names.for_task("understand", tiny_cfg.vision.num_experts))
    p = Pipeline.load(understand_bundle)
    img = np.random.default_rng(1).uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)
    assert len(p.understand(img, "hi", max_new_tokens=2).token_ids) >= 1
    with pytest.raises(BundleError, match="built for understand only, not generate"):
        p.generate("a cat", 64, 64, steps=1)
    # a manifest that declares a task without its components is refused on load
    m["tasks"] = ["understand", "generate"]
    (understand_bundle / "manifest.json").write_text(json.dumps(m))
    try:
        with pytest.raises(BundleError, match=r"component '\w+' is missing \(its tasks: understand, generate\)"):
            Bundle.load(understand_bundle, check_files=False)
    finally:
        m["tasks"] = ["understand"]
        (understand_bundle / "manifest.json").write_text(json.dumps(m))


def test_runtime_cli_refuses_a_missing_task_in_one_line(understand_bundle, tmp_path):
    r = subprocess.run([sys.executable, "-c", "from emma_runtime.cli import main; main()", "generate", "--bundle",
                        str(understand_bundle), "--prompt", "a cat", "--out", str(tmp_path / "x.png"), "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "rebuild with --tasks generate" in lines[0]


def test_plan_counts_only_the_tasks_components():
    from emma_export.config import get_config
    from emma_export.plan import plan_memory
    from emma_export.targets import load_target

    cfg, t = get_config("emma-4b"), load_target("jetson-orin")
    full = plan_memory(cfg, "int4w", t, context=8192)
    und = plan_memory(cfg, "int4w", t, context=8192, tasks=("understand",))
    assert set(und.weights) == set(names.for_task("understand", cfg.vision.num_experts, cfg.reference_branch))
    assert und.weights_total < full.weights_total and und.kv_cache == full.kv_cache // 6  # 1 row, not 3 x 2
    assert "denoise_step" not in und.activations
    # the paper's model at 8192 tokens: all tasks do not fit the 16 GB Orin, understanding alone does
    assert not full.variants[1].fits and und.variants[1].fits


def test_tied_embedding_is_counted_once_on_disk():
    from emma_export.config import get_config
    from emma_export.plan import plan_memory
    from emma_export.targets import load_target

    cfg = get_config("emma-4b")
    emb = cfg.llm.vocab_size * cfg.llm.hidden_size
    fp32 = plan_memory(cfg, "fp32", load_target("cpu"))
    assert fp32.stored_once == emb * 4 and fp32.bundle_weights == fp32.weights_total - emb * 4
    # emma-4b's LM head stays high at int8 (Model Optimizer would need ~20 GB for it: policy._large_head),
    # so it shares the embedding's table; small's is quantized apart and shares nothing
    assert plan_memory(cfg, "int8", load_target("cpu")).stored_once == emb * 4
    assert plan_memory(get_config("small"), "int8", load_target("cpu")).stored_once == 0


# ---- the build's end-to-end check of a task-subset bundle: its own tasks' pipelines -------------

def _build_cli(args: list[str]) -> tuple[int, str, dict]:
    """`emma-export` through click (one process: the reference is cheap at tiny); (exit code, output, report)."""
    from click.testing import CliRunner

    from emma_export.cli import main

    out = Path(args[args.index("--out") + 1])
    report = out.parent / f"{out.name}.json"
    r = CliRunner().invoke(main, args + ["--json", str(report)] + (["--quiet"] if args[0] == "build" else []))
    return r.exit_code, r.output, (json.loads(report.read_text()) if report.exists() else {})


@pytest.fixture(scope="module")
def understand_build(tmp_path_factory):
    """`emma-export build --tasks understand` of tiny at fp32 (no calibration: about 10 s)."""
    out = tmp_path_factory.mktemp("e2e-tasks") / "understand"
    code, output, rep = _build_cli(["build", "--config", "tiny", "--precision", "fp32", "--target", "cpu",
                                    "--tasks", "understand", "--out", str(out)])
    assert code == 0, output
    return out, output, rep


def test_a_subset_build_checks_its_own_tasks_end_to_end(understand_build, tiny_reference):
    out, output, rep = understand_build
    assert rep["passed"] and rep["e2e_passed"] and rep["bundle_tasks"] == ["understand"]
    # understand's figures, and only understand's: the bundle has no generate or edit graphs to run
    assert rep["e2e_tasks"] == ["understand"] and set(rep["e2e"]) == {"understand"}, rep["e2e"]
    u = rep["e2e"]["understand"]
    assert u["passed"] and u["token_agreement"] == 1.0 and u["logits_steps"] >= 2
    assert u["logits_rel_l2"] <= u["max_logits_rel_l2"] and u["visual_tokens"] == u["expected_visual_tokens"]
    assert "e2e: checked end to end: understand (task-subset bundle; generate, edit not in it)" in output
    # `emma-export verify --e2e` (verify_bundle) runs the same pipelines on the same bundle
    from emma_export.verify import verify_bundle

    v = verify_bundle(out, e2e=True)
    assert v.passed and set(v.pipelines) == {"understand"} and v.pipelines["understand"]["passed"]


def _perturb(bundle_dir: Path, component: str, rel: float) -> None:
    """A deliberate bug: seeded noise of ``rel`` times its spread added to the component's largest
    weight, the checksum rewritten (the bundle loads; only parity can tell)."""
    import onnx
    from onnx import numpy_helper

    from emma_runtime.bundle import sha256_file

    m = json.loads((bundle_dir / "manifest.json").read_text())
    f = bundle_dir / m["components"][component]["file"]
    g = onnx.load(str(f))
    t = max(g.graph.initializer, key=lambda t: np.prod(t.dims) if t.data_type == onnx.TensorProto.FLOAT else 0)
    w = numpy_helper.to_array(t)
    noise = np.random.default_rng(0).standard_normal(w.shape).astype(np.float32) * np.float32(rel * w.std())
    t.CopyFrom(numpy_helper.from_array(w + noise, t.name))
    onnx.save(g, str(f))
    m["components"][component]["sha256"] = sha256_file(f)
    (bundle_dir / "manifest.json").write_text(json.dumps(m))


def test_a_subset_builds_end_to_end_check_fails_on_a_bad_understand_graph(understand_build, tiny_cfg, tmp_path):
    """und_adapter, run by understand only (tiny's edit takes its reference through gen_adapter), with
    its largest weight off by 2e-3 of its spread: within the component tolerance (measured: rel L2
    5.7e-5 against 1e-4), and past the end-to-end floor (logits 2.2e-5 against 1e-5): only the subset
    bundle's own e2e check can fail it, and its verdict for understand does."""
    import shutil

    E = tiny_cfg.vision.num_experts
    assert names.UND_ADAPTER in names.for_task("understand", E, tiny_cfg.reference_branch)
    assert all(names.UND_ADAPTER not in names.for_task(k, E, tiny_cfg.reference_branch) for k in ("generate", "edit"))
    bad = tmp_path / "bad"
    shutil.copytree(understand_build[0], bad)
    (bad / "build-report.json").unlink()
    _perturb(bad, names.UND_ADAPTER, 2e-3)
    # `emma-export quantize --precision fp32` of the subset bundle: copy, verify, e2e (--force: the report)
    code, output, rep = _build_cli(["quantize", "--bundle", str(bad), "--precision", "fp32", "--target", "cpu",
                                    "--out", str(tmp_path / "out"), "--force"])
    assert code == 0, output
    assert not rep["passed"] and not rep["e2e_passed"] and rep["e2e_tasks"] == ["understand"]
    assert set(rep["e2e"]) == {"understand"}
    u = rep["e2e"]["understand"]
    assert not u["passed"] and "logits rel L2" in u["reason"] and u["logits_rel_l2"] > u["max_logits_rel_l2"], u
    assert rep["failures"] == [f"e2e understand: {u['reason']}"], rep["failures"]
    row = next(r for r in rep["rows"] if r["component"] == names.UND_ADAPTER)
    assert row["passed"] and row["rel_l2"] > 1e-5  # the graph is changed, per-component parity lets it by
