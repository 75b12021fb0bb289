#!/usr/bin/env bash
# Every precision of the shipped shapes-world checkpoint: build (export -> calibrate on the world's own
# scenes -> quantize -> verify), then the held-out suite on each bundle. Writes out/shapes/<precision>/
# (bundle), out/shapes/eval-<precision>.json and out/shapes/table.md. N held-out scenes (default 100).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
N="${N:-100}"
PRECISIONS="${PRECISIONS:-fp32 fp16 bf16 int8 fp8 int4w}"
mkdir -p out/shapes
for p in $PRECISIONS; do
  echo "=== $p"
  /usr/bin/time -f "$p build %e s, peak RSS %M kB" \
    emma-export build --checkpoint checkpoints/shapes --precision "$p" --target cpu --out "out/shapes/$p" \
      --task-eval-n 0 --json "out/shapes/build-$p.json" --quiet
  ref=""
  if [ "$p" = fp32 ]; then ref="--reference"; fi
  emma-export evaluate --bundle "out/shapes/$p" $ref --n "$N" --json "out/shapes/eval-$p.json" --quiet
done
python - "$N" $PRECISIONS <<'PY'
import json, sys
n, precs = sys.argv[1], sys.argv[2:]
rows = []
base = None
for p in precs:
    r = json.load(open(f"out/shapes/eval-{p}.json"))
    h = r["runtime"]
    fig = {"understanding": h["understanding"]["exact"], "generation": h["generation"]["all"],
           "edit": h["edit"]["success"], "ae_psnr": h["ae"]["psnr"], "untouched": h["edit"]["untouched_psnr"]}
    if p == "fp32":
        base = fig
        if "reference" in r:
            g = r["reference"]
            rows.append(("fp32 PyTorch reference", {"understanding": g["understanding"]["exact"], "generation": g["generation"]["all"],
                         "edit": g["edit"]["success"], "ae_psnr": g["ae"]["psnr"], "untouched": g["edit"]["untouched_psnr"]}))
    rows.append((f"{p} runtime", fig))
out = [f"held-out n={n}", "", "| bundle | understanding | generation | edit | edit untouched PSNR | AE PSNR |", "|---|---|---|---|---|---|"]
for name, f in rows:
    d = lambda k: "" if base is None or name.startswith("fp32") else f" ({(f[k] - base[k]) * 100:+.1f})"
    out.append(f"| {name} | {f['understanding']:.3f}{d('understanding')} | {f['generation']:.3f}{d('generation')} | "
               f"{f['edit']:.3f}{d('edit')} | {f['untouched']:.1f} dB | {f['ae_psnr']:.2f} dB |")
open("out/shapes/table.md", "w").write("\n".join(out) + "\n")
print("\n".join(out))
PY
