#!/usr/bin/env python
"""The scale table (issue 23) from runs that scripts/emma4b.sh made: per build, the wall time of each
stage, the peak RSS (``/usr/bin/time -v``), the bundle's bytes on disk against ``plan``'s weight
estimate, the worst component error, and the engine state.

    python scripts/scale_table.py RUN_DIR [RUN_DIR ...]

Each RUN_DIR holds ``build.json`` (``emma-export build --json``), ``time.txt`` (``/usr/bin/time -v``)
and ``plan.json`` (``emma-export plan --json``); the bundle is ``RUN_DIR/bundle``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

STAGES = ("export", "calibrate", "quantize", "engines", "verify", "e2e")


def time_v(path: Path) -> tuple[float | None, float | None]:
    """(peak RSS in GiB, wall seconds) from ``/usr/bin/time -v`` output."""
    if not path.is_file():
        return None, None
    text = path.read_text(errors="replace")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    secs = None
    if wall:
        parts = [float(x) for x in wall.group(1).split(":")]
        secs = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    return (int(rss.group(1)) / 2**20 if rss else None), secs


def bundle_bytes(bundle: Path) -> int | None:
    """Bytes of every file the manifest lists, each once (the tied embedding is listed by two)."""
    m = bundle / "manifest.json"
    if not m.is_file():
        return None
    d = json.loads(m.read_text())
    files = set()
    for c in d["components"].values():
        files.add(c["file"])
        files.update(f for f, _ in c["data_files"])
    paths = [bundle / f for f in files]
    if not all(p.is_file() for p in paths):
        return None  # its weights deleted for the next build's disk: the build report's figure stands
    return sum(p.stat().st_size for p in paths)


def engine_summary(run: Path) -> str:
    """What ``emma-export engines`` (``time-engines.txt`` beside the build) left in the manifest: engines
    built, their total build time and the builder's largest peak RSS, and the components left to the device."""
    m = run / "bundle" / "manifest.json"
    if not (run / "time-engines.txt").is_file() or not m.is_file():
        return ""
    comps = json.loads(m.read_text())["components"]
    built = [c["engine"] for c in comps.values() if c.get("engine")]
    device = sorted(n for n, c in comps.items() if c.get("engine_on_device"))
    rss, wall = time_v(run / "time-engines.txt")
    if not built:
        return f"none built{'; on the device: ' + ', '.join(device) if device else ''}"
    out = (f"{len(built)} {built[0]['target']}, {sum(e['build_seconds'] for e in built):.0f} s building, "
           f"builder peak {max(e['builder_peak_rss'] for e in built) / 2**30:.2f} GiB")
    if wall is not None and rss is not None:
        out += f" (command {wall / 60:.1f} min, {rss:.2f} GiB)"
    return out + (f"; on the device: {', '.join(device)}" if device else "")


def row(run: Path) -> list[str]:
    rep = json.loads((run / "build.json").read_text()) if (run / "build.json").is_file() else {}
    plan = json.loads((run / "plan.json").read_text()) if (run / "plan.json").is_file() else {}
    rss, wall = time_v(run / "time.txt")
    secs = rep.get("seconds", {})
    stages = " / ".join(f"{secs[s]:.0f}" if s in secs else "-" for s in STAGES)
    size = bundle_bytes(run / "bundle")
    if size is None:
        size = rep.get("bundle_bytes")  # the same sum, taken by the build when it wrote the bundle
    est = plan.get("bundle_weights")
    if size is not None and est:
        vs = f"{size / 1e9:.2f} GB / {est / 1e9:.2f} GB ({100 * (size / est - 1):+.1f} %)"
    else:
        vs = "-"
    rows = [r for r in rep.get("rows", []) if r.get("rel_l2") is not None]
    worst = max(rows, key=lambda r: r["rel_l2"] / (r["tolerance"] or 1), default=None)
    err = f"{worst['component']} {worst['rel_l2']:.3g} (tol {worst['tolerance']:g})" if worst else "-"
    if worst and worst.get("propagated_rel_l2") is not None:  # a backbone verified layer by layer
        err += f", worst layer; through all layers {worst['propagated_rel_l2']:.3g}"
    engines = engine_summary(run) or "; ".join(sorted({r.get("engine", "") for r in rep.get("rows", [])}))[:60]
    return [f"{rep.get('precision', '?')} -> {rep.get('target', '?')}", stages, "-" if wall is None else f"{wall / 60:.1f}",
            "-" if rss is None else f"{rss:.2f}", vs, err, engines or "-",
            "yes" if rep.get("passed") else "NO"]


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    head = ["build", "stage s (" + " / ".join(STAGES) + ")", "wall min", "peak RSS GiB", "bundle vs plan (weights)",
            "worst component rel L2", "engines", "verify"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for run in argv:
        print("| " + " | ".join(row(Path(run))) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
