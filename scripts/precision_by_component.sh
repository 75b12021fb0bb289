#!/usr/bin/env bash
# Where does a precision's task loss come from? Quantize ONE component of the shipped shapes-world
# checkpoint at a time (the others stay fp32), run the held-out suite on each bundle and print the change
# of every task figure against the fp32 bundle. Usage: scripts/precision_by_component.sh PRECISION [COMPONENT...]
# (default: every component the policy quantizes at PRECISION). N held-out scenes (default 100).
# Writes out/shapes/by-component-<precision>/<component>/ (bundles), eval-<component>.json, table.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
P="${1:?usage: $0 PRECISION [COMPONENT...]}"; shift
N="${N:-100}"
D="out/shapes/by-component-$P"
mkdir -p "$D"
if [ ! -f out/shapes/eval-fp32.json ] || [ ! -d out/shapes/fp32 ]; then
  emma-export build --checkpoint checkpoints/shapes --precision fp32 --target cpu --out out/shapes/fp32 --task-eval-n 0 --quiet
  emma-export evaluate --bundle out/shapes/fp32 --n "$N" --json out/shapes/eval-fp32.json --quiet
fi
if [ ! -d out/shapes/calibration ]; then
  emma-export calibrate --checkpoint checkpoints/shapes --out out/shapes/calibration
fi
COMPONENTS=("$@")
if [ ${#COMPONENTS[@]} -eq 0 ]; then
  mapfile -t COMPONENTS < <(python - "$P" <<'PY'
import json, sys
from emma_export.quantize.policy import plan
m = json.load(open("out/shapes/fp32/manifest.json"))
for c in m["components"]:
    if plan(c, sys.argv[1], False).method not in ("none",):
        print(c)
PY
)
fi
for c in "${COMPONENTS[@]}"; do
  echo "=== $P $c only"
  emma-export quantize --bundle out/shapes/fp32 --precision "$P" --target cpu --component "$c" \
    --calibration out/shapes/calibration --out "$D/$c" --task-eval-n 0 --force --json "$D/build-$c.json" > "$D/build-$c.log"
  emma-export evaluate --bundle "$D/$c" --n "$N" --json "$D/eval-$c.json" --quiet > /dev/null
done
python - "$P" "$N" "$D" "${COMPONENTS[@]}" <<'PY'
import json, sys
p, n, d, comps = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
def figs(path):
    h = json.load(open(path))["runtime"]
    return {"understanding": h["understanding"]["exact"], "generation": h["generation"]["all"], "edit": h["edit"]["success"], "ae_psnr": h["ae"]["psnr"]}
base = figs("out/shapes/eval-fp32.json")
rows = [f"{p}, one component at a time (the rest fp32), change against the fp32 bundle, held-out n={n}", "",
        "| quantized component | understanding | generation | edit | AE PSNR | verify |", "|---|---|---|---|---|---|"]
for c in comps:
    f = figs(f"{d}/eval-{c}.json")
    ok = json.load(open(f"{d}/build-{c}.json")).get("passed")
    rows.append(f"| {c} | " + " | ".join(f"{(f[k] - base[k]) * 100:+.1f}" for k in ("understanding", "generation", "edit"))
                + f" | {f['ae_psnr'] - base['ae_psnr']:+.2f} dB | {'pass' if ok else 'FAIL'} |")
open(f"{d}/table.md", "w").write("\n".join(rows) + "\n")
print("\n".join(rows))
PY
