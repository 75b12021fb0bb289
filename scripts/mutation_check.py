#!/usr/bin/env python
"""Mutation check of the project's own tests: small deliberate bugs, one at a time, each must be caught.

    python scripts/mutation_check.py                  # every mutant, output as in docs/mutation_check.txt
    python scripts/mutation_check.py --list           # the mutants, without running anything
    python scripts/mutation_check.py --only rt-stale-decode ref-concat-order

For each mutant the repository (without .git) is copied to a temporary folder, one exact string in one file
is replaced there (the script refuses a mutant whose string is not found exactly once), and the test files
that guard that part run in the copy with this interpreter and PYTHONPATH pointing at the copy. A mutant is
caught when those tests fail. First the same tests run on an unmutated copy, which must pass: otherwise a
"caught" would mean nothing. Exit status 1 when any mutant is missed (or the baseline fails).

The mutants cover the PyTorch reference, the exported graphs, the runtime and the helpers both sides share
(the timestep schedule, the sequence layout, the sin-cos tables): the last kind is caught only by the
specification tests (tests/test_spec.py), since a bug there is the same on both sides of every parity test.
A bug in a graph's wrapper (emma_export/components.py) is invisible to the per-component check, which traces
and runs that same wrapper: the end-to-end and specification tests catch those.
CPU heavy (about 20 minutes on 2 cores); not part of CI.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SPEC = "tests/test_spec.py"
STEPS = "tests/test_parity_steps.py"
E2E = "tests/test_runtime.py::test_pipelines_match_the_reference"
E2E_NONSQUARE = "tests/test_runtime.py::test_non_square_pipelines_match_the_reference"
COMPONENTS = "tests/test_export.py::test_every_component_matches_the_reference_at_several_shapes"
CONFORMANCE = "tests/test_conformance.py::test_conformance_in_memory"


@dataclass(frozen=True)
class Mutant:
    name: str
    layer: str  # reference, graph, runtime, shared
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    what: str


MUTANTS: list[Mutant] = [
    # ---- the PyTorch reference (emma_export/model) ----
    Mutant("ref-concat-order", "reference", "emma_export/model/adapters.py",
           "torch.cat([und_features, latents.permute(0, 2, 3, 1)], dim=-1)",
           "torch.cat([latents.permute(0, 2, 3, 1), und_features], dim=-1)",
           (SPEC,), "channel-wise concatenation with the latents first (graphs and reference alike)"),
    Mutant("ref-timestep-zeroed", "reference", "emma_export/model/adapters.py",
           "return x + self.timestep(timestep).to(x.dtype)[:, None, :]",
           "return x + 0 * self.timestep(timestep).to(x.dtype)[:, None, :]",
           (SPEC,), "the timestep embedding is not added to the Gen tokens"),
    Mutant("ref-noise-slice-ones", "reference", "emma_export/model/emma.py",
           "zeros = latents.new_zeros(B, h, w, self.cfg.vision.feature_dim)",
           "zeros = latents.new_ones(B, h, w, self.cfg.vision.feature_dim)",
           (SPEC, E2E), "noisy target tokens get a non-zero understanding slice"),
    Mutant("ref-reference-timestep", "reference", "emma_export/model/emma.py",
           "t = torch.zeros(image.shape[0], dtype=image.dtype, device=image.device)",
           "t = torch.ones(image.shape[0], dtype=image.dtype, device=image.device)",
           (SPEC, E2E), "the edit reference embedded at timestep 1 instead of 0"),
    Mutant("ref-reference-und-adapter", "reference", "emma_export/model/emma.py",
           'if branch == "und":\n            return self.und_adapter(feats, latents)',
           'if branch != "und":\n            return self.und_adapter(feats, latents)',
           (SPEC, E2E), "the edit reference goes through the Und adapter"),
    Mutant("ref-reference-und-branch", "reference", "emma_export/model/pipelines.py",
           'br = UND if isinstance(seg, Text) or seg.branch == "und" else GEN',
           "br = UND",
           (SPEC, E2E), "the reference pipeline runs the edit reference's tokens in the Und branch"),
    Mutant("ref-mask-text-bidirectional", "reference", "emma_export/model/backbone.py",
           "same = (image_ids[:, :, None] == image_ids[:, None, :]) & (image_ids[:, :, None] >= 0)",
           "same = image_ids[:, :, None] == image_ids[:, None, :]",
           (SPEC, E2E), "the mask rule lets text tokens of a generation prefix see later text"),
    Mutant("ref-target-causal", "reference", "emma_export/model/pipelines.py",
           "allow = chunk_mask(torch.ones(B, prefix.length, dtype=torch.bool), L, causal=False)",
           "allow = chunk_mask(torch.ones(B, prefix.length, dtype=torch.bool), L, causal=True)",
           (E2E,), "the reference's target image attends causally"),
    Mutant("ref-decode-stale", "reference", "emma_export/model/pipelines.py",
           "cache = cache.append(new.keys, new.values)",
           "cache = cache",
           (E2E, SPEC), "the reference decodes against a stale prefix"),
    Mutant("ref-decode-position", "reference", "emma_export/model/pipelines.py",
           "hidden, new = model.llm(x, torch.tensor([[pos]]), UND, allow, cache)",
           "hidden, new = model.llm(x, torch.tensor([[pos - 1]]), UND, allow, cache)",
           (E2E, SPEC), "the reference decodes each token at the previous token's RoPE position"),
    # ---- the exported graphs (emma_export/components.py) ----
    Mutant("graph-timestep", "graph", "emma_export/components.py",
           "model.gen_adapter(und_features, latents, timestep)",
           "model.gen_adapter(und_features, latents, 1 - timestep)",
           (E2E, SPEC, COMPONENTS), "the gen_adapter graph embeds 1 - t"),
    Mutant("graph-kv-values", "graph", "emma_export/components.py",
           "attention_mask, KVCache(pk, pv))",
           "attention_mask, KVCache(pk, pk))",
           (E2E, COMPONENTS), "the backbone graphs read the cached keys as values"),
    Mutant("graph-ignores-mask", "graph", "emma_export/components.py",
           "self.llm(inputs_embeds, position_ids, self.branch, attention_mask, KVCache(pk, pv))",
           "self.llm(inputs_embeds, position_ids, self.branch, torch.ones_like(attention_mask), KVCache(pk, pv))",
           (E2E, SPEC, COMPONENTS), "the backbone graphs ignore the attention mask"),
    Mutant("graph-gqa-kv-values", "graph", "emma_export/export/gqa.py",
           "v, past_k, past_v, *ops, nq, nk)",
           "v, past_k, past_k, *ops, nq, nk)",
           (E2E, COMPONENTS), "the gqa Und graph reads the cached keys as values"),
    # ---- the runtime (runtime/emma_runtime) ----
    Mutant("rt-stale-decode", "runtime", "runtime/emma_runtime/pipelines.py",
           'hidden = self.run_chunk(cache, self.embed([tok]), "und", True)',
           'hidden = self.run_chunk(cache, self.embed([tok]), "und", True, commit=False)',
           (E2E, SPEC), "decode steps never commit their keys/values (a stale prefix)"),
    Mutant("rt-causal-target", "runtime", "runtime/emma_runtime/pipelines.py",
           'hidden = self.run_chunk(cache, target, "gen", causal=False, commit=False)',
           'hidden = self.run_chunk(cache, target, "gen", causal=True, commit=False)',
           (E2E,), "the target image's tokens attend causally"),
    Mutant("rt-causal-reference", "runtime", "runtime/emma_runtime/pipelines.py",
           'e = self.reference_embeds(images["reference"])\n'
           '                info["visual_tokens"] += e.shape[1]\n'
           "                embedded.append((e, seg.branch, not gen_task))",
           'e = self.reference_embeds(images["reference"])\n'
           '                info["visual_tokens"] += e.shape[1]\n'
           "                embedded.append((e, seg.branch, True))",
           (E2E, SPEC), "the edit reference's tokens attend causally"),
    Mutant("rt-reference-timestep", "runtime", "runtime/emma_runtime/pipelines.py",
           'latents=lat, timestep=np.zeros(1, np.float32))["image_embeds"]',
           'latents=lat, timestep=np.ones(1, np.float32))["image_embeds"]',
           (E2E, SPEC), "the runtime embeds the edit reference at timestep 1"),
    Mutant("rt-noise-slice-ones", "runtime", "runtime/emma_runtime/pipelines.py",
           "zeros = np.zeros((1, h, w, self.dims.und_feature_dim), np.float32)",
           "zeros = np.ones((1, h, w, self.dims.und_feature_dim), np.float32)",
           (E2E, SPEC), "the runtime's noisy tokens get a non-zero understanding slice"),
    Mutant("rt-cfg-weights", "runtime", "runtime/emma_runtime/pipelines.py",
           "prefixes = [(cond, cfg), (uncond, 1.0 - cfg)]",
           "prefixes = [(cond, 1.0 - cfg), (uncond, cfg)]",
           (E2E,), "classifier-free guidance weights swapped"),
    Mutant("rt-positions", "runtime", "runtime/emma_runtime/pipelines.py",
           "pos = cache.positions[:, None] + np.arange(S, dtype=np.int64)[None]",
           "pos = cache.length + np.arange(S, dtype=np.int64)[None].repeat(B, 0)",
           (E2E, SPEC), "batched guidance rows continue at the padded length, not their own"),
    Mutant("rt-gqa-lengths", "runtime", "runtime/emma_runtime/pipelines.py",
           "seqlens_k=(cache.lengths + counts - 1).astype(np.int32)",
           "seqlens_k=(cache.lengths + counts).astype(np.int32)",
           (E2E, SPEC), "the gqa graph is told each row is one token longer (a stale slot attended, the chunk written one late)"),
    Mutant("rt-kv-padding", "runtime", "runtime/emma_runtime/kv_cache.py",
           "return np.arange(self.capacity)[None, :] < self.lengths[:, None]",
           "return np.ones((self.batch, self.capacity), bool)",
           (E2E, SPEC), "batched guidance attends the padding of shorter prefixes (and unwritten positions)"),
    Mutant("rt-edit-weights", "runtime", "runtime/emma_runtime/pipelines.py",
           "(img_only, s_img - s_txt), (none, 1.0 - s_img)",
           "(img_only, s_txt - s_img), (none, 1.0 - s_img)",
           (E2E,), "edit guidance: the image term's sign"),
    # ---- helpers both sides share ----
    Mutant("shared-timestep-shift-inverted", "shared", "runtime/emma_runtime/sampling.py",
           "return shift * t / (1.0 + (shift - 1.0) * t)",
           "return t / (shift - (shift - 1.0) * t)",
           (SPEC,), "the timestep shift inverted (fewer steps at high noise)"),
    Mutant("shared-edit-layout", "shared", "runtime/emma_runtime/template.py",
           'Text((sp.im_start, sp.vision_start)),\n        Image("reference", reference_branch),\n'
           "        Text((sp.vision_end, *prompt_ids, sp.im_end, sp.vision_start)),",
           'Text((sp.im_start, *prompt_ids, sp.vision_start)),\n        Image("reference", reference_branch),\n'
           "        Text((sp.vision_end, sp.im_end, sp.vision_start)),",
           (SPEC,), "editing sequence with the instruction before the reference image"),
    Mutant("shared-understand-layout", "shared", "runtime/emma_runtime/template.py",
           'Text((sp.im_start, sp.vision_start)),\n        Image("input", "und"),\n'
           "        Text((sp.vision_end, *prompt_ids, sp.im_end, sp.assistant)),",
           'Text((sp.im_start, *prompt_ids, sp.vision_start)),\n        Image("input", "und"),\n'
           "        Text((sp.vision_end, sp.im_end, sp.assistant)),",
           (SPEC,), "understanding sequence with the question before the image"),
    Mutant("shared-reference-branch-default", "shared", "emma_export/config.py",
           'reference_branch: str = "gen"  # editing',
           'reference_branch: str = "und"  # editing',
           (SPEC,), "every config routes the edit reference through the Und branch"),
    Mutant("shared-positions-rows-cols", "shared", "emma_export/model/layers.py",
           "return torch.cat([grid_y, grid_x], dim=-1).reshape(-1, dim)",
           "return torch.cat([grid_x, grid_y], dim=-1).reshape(-1, dim)",
           (SPEC,), "2D sin-cos table with rows and columns swapped"),
    Mutant("shared-timestep-sin-cos", "shared", "emma_export/model/layers.py",
           "return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)",
           "return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)",
           (SPEC,), "sinusoidal timestep features in [sin | cos] order"),
    Mutant("shared-rope-sign", "shared", "emma_export/model/layers.py",
           "rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)",
           "rotated = torch.cat([x[..., half:], -x[..., :half]], dim=-1)",
           (CONFORMANCE,), "RoPE rotated the other way (graphs and reference alike; Qwen3 disagrees)"),
]


def _copy(dst: Path) -> None:
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", ".pytest_cache", ".venv"))


def _apply(tree: Path, m: Mutant) -> None:
    f = tree / m.file
    text = f.read_text()
    n = text.count(m.old)
    if n != 1:
        raise SystemExit(f"error: mutant {m.name}: the string to replace occurs {n} times in {m.file} (must be once)")
    f.write_text(text.replace(m.old, m.new))


def _pytest(tree: Path, tests: tuple[str, ...], stop_first: bool, timeout: int) -> tuple[bool, str, float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{tree}{os.pathsep}{tree / 'runtime'}"
    env.setdefault("OMP_NUM_THREADS", "2")
    env["COLUMNS"] = "300"  # the failure line in full
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--no-header", "-rf", *(["-x"] if stop_first else []), *tests]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, "timeout", time.perf_counter() - t0
    lines = [l.strip() for l in (r.stdout + r.stderr).splitlines() if l.strip()]
    failed = next((l for l in lines if l.startswith(("FAILED", "ERROR"))), None)
    counts = next((l for l in reversed(lines) if " passed" in l or " failed" in l or " error" in l), lines[-1] if lines else "")
    summary = failed[:220] if failed else counts.strip("= ")
    return r.returncode == 0, summary, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help="run only these mutants (names)")
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per pytest run")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copies")
    args = ap.parse_args(argv)

    mutants = MUTANTS if not args.only else [m for m in MUTANTS if m.name in args.only]
    unknown = set(args.only or []) - {m.name for m in MUTANTS}
    if unknown:
        print(f"error: unknown mutant(s) {sorted(unknown)}", file=sys.stderr)
        return 2
    if args.list:
        for m in mutants:
            print(f"{m.name:34s} {m.layer:9s} {m.file}: {m.what}")
        return 0

    def _interrupt(*_):  # a SIGTERM ends the running pytest and removes the copies, as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    work = Path(tempfile.mkdtemp(prefix="emma-mutants-"))
    try:
        tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
        base = work / "baseline"
        _copy(base)
        ok, summary, secs = _pytest(base, tests, stop_first=False, timeout=args.timeout * 2)
        print(f"baseline (no mutation), {len(tests)} test targets: {'passed' if ok else 'FAILED'} ({summary}, {secs:.0f} s)", flush=True)
        if not ok:
            print("error: the tests fail without any mutation; fix that first", file=sys.stderr)
            return 1
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        missed = []
        by_layer: dict[str, list[int]] = {}
        for i, m in enumerate(mutants, 1):
            tree = work / m.name
            _copy(tree)
            _apply(tree, m)
            passed, summary, secs = _pytest(tree, m.tests, stop_first=True, timeout=args.timeout)
            caught = not passed
            by_layer.setdefault(m.layer, [0, 0])[0 if caught else 1] += 1
            if not caught:
                missed.append(m.name)
            tests_named = ", ".join(t.replace("tests/", "") for t in m.tests)
            print(f"[{i:2d}/{len(mutants)}] {'caught' if caught else 'MISSED'}  {m.name:34s} {m.layer:9s} "
                  f"{m.what}  <- {tests_named}: {summary} ({secs:.0f} s)", flush=True)
            if not args.keep:
                shutil.rmtree(tree, ignore_errors=True)
        layers = ", ".join(f"{k} {v[0]}/{v[0] + v[1]}" for k, v in by_layer.items())
        print(f"caught {len(mutants) - len(missed)}/{len(mutants)} mutants ({layers})" + (f"; MISSED: {', '.join(missed)}" if missed else ""))
        return 1 if missed else 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
