"""Task-subset bundles (issue 23): ``--tasks understand|generate|edit`` exports only the components the
runtime's pipelines for those tasks run, the manifest records the tasks, the runtime loads such a
bundle, runs its tasks and refuses the others with one line, and ``plan --tasks`` counts only them."""

from __future__ import annotations

import json
import subprocess
import sys

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
