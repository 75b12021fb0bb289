#!/usr/bin/env bash
# The main job on the tiny embedded default: set up, export the tiny bundle, verify it against the
# PyTorch reference, then run understand, generate and edit on the runtime (images in out/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
mkdir -p out
emma-export export --config tiny --out out/bundle-tiny
emma-export verify --bundle out/bundle-tiny --e2e --json out/verify-tiny.json
python - <<'PY'
# A real photograph from scikit-image's wheel as the input image (nothing is downloaded).
from PIL import Image
from skimage import data
Image.fromarray(data.astronaut()).resize((64, 64), Image.BICUBIC).save("out/astronaut-64.png")
PY
echo "--- understand"
emma-run understand --bundle out/bundle-tiny --image out/astronaut-64.png --prompt "What is in this picture?" --max-new-tokens 16
echo "--- generate"
emma-run generate --bundle out/bundle-tiny --prompt "a red circle left of a blue square" --out out/generated.png --seed 1
echo "--- edit"
emma-run edit --bundle out/bundle-tiny --image out/astronaut-64.png --prompt "make the sky green" --out out/edited.png --seed 1
echo "quickstart: images in out/ (generated.png, edited.png), parity report in out/verify-tiny.json"
