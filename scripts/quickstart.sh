#!/usr/bin/env bash
# The main job: set up, export the shipped shapes-world checkpoint (checkpoints/shapes, a small EMMA
# trained on the world this project generates) to an ONNX bundle, verify it against the PyTorch
# reference, then answer questions about a held-out scene, generate an image from a caption and edit
# the scene, on the runtime. Everything a person looks at lands in out/ (quickstart.png side by side).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
mkdir -p out
emma-export export --checkpoint checkpoints/shapes --out out/bundle-shapes --quiet
emma-export verify --bundle out/bundle-shapes --e2e --json out/verify-shapes.json
# A held-out scene: its purple square at the bottom is a (colour, shape, position) combination never seen in
# training; so is the generated "small yellow square" on the right. One example: the rates are in the
# README's table (`emma-export evaluate`).
echo "--- a held-out scene"
emma-export world --split heldout --index 0 --out out/scene.png
echo "--- understand"
emma-run understand --bundle out/bundle-shapes --image out/scene.png --prompt "what colour is the triangle?" --quiet
emma-run understand --bundle out/bundle-shapes --image out/scene.png --prompt "where is the triangle?" --quiet
echo "--- generate: a small yellow square right of a large white circle"
emma-run generate --bundle out/bundle-shapes --prompt "a small yellow square right of a large white circle" --out out/generated.png --overwrite --seed 0 --quiet
echo "--- edit: make the square red"
emma-run edit --bundle out/bundle-shapes --image out/scene.png --prompt "make the square red" --out out/edited.png --overwrite --seed 0 --quiet
python - <<'PY'
# 64x64 images are hard to see: one sheet, 4x nearest-neighbour, what the detector reads under each.
import numpy as np
from PIL import Image, ImageDraw
from shapes_world.detector import detect

tiles = [("scene", "out/scene.png"), ("generated", "out/generated.png"), ("edited", "out/edited.png")]
sheet = Image.new("RGB", (3 * 272, 300), (255, 255, 255))
d = ImageDraw.Draw(sheet)
for i, (name, path) in enumerate(tiles):
    im = Image.open(path).convert("RGB")
    sheet.paste(im.resize((256, 256), Image.NEAREST), (8 + 272 * i, 8))
    found = ", ".join(f"{s.colour} {s.kind}" for s in detect(np.asarray(im))) or "nothing"
    d.text((8 + 272 * i, 270), f"{name}: {found}", fill=(0, 0, 0))
sheet.save("out/quickstart.png")
print("detector reads: " + "; ".join(f"{n}: " + (", ".join(f"{s.size} {s.colour} {s.kind}" for s in detect(np.asarray(Image.open(p).convert('RGB')))) or "nothing") for n, p in tiles))
PY
echo "quickstart: out/quickstart.png (scene, generated, edited), parity report in out/verify-shapes.json"
