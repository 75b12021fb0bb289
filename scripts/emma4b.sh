#!/usr/bin/env bash
# EMMA-4B end to end (issue 23): synthetic emma-4b-sized upstream folders (Qwen3, SigLIP, DC-AE; random
# tensors streamed into sharded safetensors, scripts/make_tiny_upstream.py --synthetic), `emma-export
# init` into an EMMA checkpoint, then the two builds the issue asks for and the fp16 baseline of its
# table, each under /usr/bin/time -v:
#
#   emma-export build --config emma-4b --checkpoint CKPT --precision fp8   --target h100        --out B
#   emma-export build --config emma-4b --checkpoint CKPT --precision int4w --target jetson-orin --out B
#   emma-export build --config emma-4b --checkpoint CKPT --precision fp16  --target h100        --out B
#
# then TensorRT-RTX engines of each bundle (`emma-export engines --target rtx-ada`, builder peak RSS per
# component in the manifest), and the table (scripts/scale_table.py): per-stage wall time, peak RSS, bundle bytes against `plan`,
# worst component error, engines. Hours of CPU and up to 20 GiB of RAM: not for a shared machine.
#
#   bash scripts/emma4b.sh                    # emma-4b, into out/emma4b
#   bash scripts/emma4b.sh --dry-run          # print every command, run nothing
#   bash scripts/emma4b.sh --config tiny      # the same steps on a small config (minutes)
#   bash scripts/emma4b.sh --random-weights   # seeded weights: no upstream folders, no checkpoint
#                                             # (saves ~45 GB of disk and the init)
#   EMMA4B_OUT=/big/disk bash scripts/emma4b.sh   # where to write (emma-4b needs ~80 GB of disk)
#   bash scripts/emma4b.sh --builds "fp8 int4w"  # which builds, in order (default: fp8 int4w fp16)
#   EMMA4B_ENGINE_TARGET=rtx-blackwell ...      # the TensorRT-RTX target of the engines (default rtx-ada)
#   EMMA4B_KEEP_UPSTREAM=1 ...                  # keep the synthetic upstream folders after init (~9.5 GB)
#
# Resumable: the whole run takes longer than 3 hours at emma-4b, so a step whose output is complete is
# not redone (the checkpoint, the capture, a build with its build.json, engines with engines.ok); delete
# that folder or file to redo it. Seeded and checkpoint weights write to different folders
# (emma-4b-random/, emma-4b/): a capture of one set of weights is never taken for the other's.
# Engines are built after every build: an emma-4b fp8 bundle's engines are 9.5 GB, and the next build's
# fp32 export needs ~36 GB of disk while it runs.
#
# Every build takes one calibration capture, made first with the short "scale" recipe (about 25
# reference backbone calls: the reference reads each layer's weights on every call,
# emma_export/streamed_reference.py; 12.5 min at emma-4b). Extra build flags go through
# EMMA4B_BUILD_FLAGS (default "--calib-samples 8": run 4, with 16, was killed at 24 GB; docs/scale.md).
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=emma-4b
DRY=0
RANDOM_WEIGHTS=0
BUILDS="fp8 int4w fp16"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --config) CONFIG="$2"; shift ;;
    --random-weights) RANDOM_WEIGHTS=1 ;;
    --builds) BUILDS="$2"; shift ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
    *) echo "error: unknown argument '$1' (--dry-run, --config NAME, --random-weights, --builds LIST)" >&2; exit 2 ;;
  esac
  shift
done
for b in $BUILDS; do
  case "$b" in
    fp8|int4w|fp16) ;;
    *) echo "error: --builds: unknown build '$b' (choose from fp8 int4w fp16)" >&2; exit 2 ;;
  esac
done

OUT="${EMMA4B_OUT:-out/emma4b}/$CONFIG"
if [ "$RANDOM_WEIGHTS" = 1 ]; then OUT="$OUT-random"; fi
PY="${PYTHON:-python}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
export PYTHONPATH="$PWD:$PWD/runtime${PYTHONPATH:+:$PYTHONPATH}"
EXPORT=("$PY" -c "from emma_export.cli import main; main()")
TIME=/usr/bin/time
BUILD_FLAGS=(${EMMA4B_BUILD_FLAGS:---calib-samples 8})
ENGINE_TARGET="${EMMA4B_ENGINE_TARGET:-rtx-ada}"

run() {  # echo, then run unless --dry-run
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [ "$DRY" = 0 ]; then "$@"; fi
}

if [ "$DRY" = 0 ] && [ ! -x "$TIME" ]; then
  echo "error: $TIME is missing (apt-get install time): the peak RSS comes from it" >&2
  exit 2
fi
run mkdir -p "$OUT"

# 1. upstream folders shaped for $CONFIG (streamed: little memory) and the EMMA checkpoint from them
WEIGHTS=(--checkpoint "$OUT/checkpoint")
if [ "$RANDOM_WEIGHTS" = 1 ]; then
  WEIGHTS=()
elif [ ! -d "$OUT/checkpoint" ]; then
  if [ ! -f "$OUT/upstream/qwen3/config.json" ]; then
    run rm -rf "$OUT/upstream"  # a killed run's partial folders (this script's own)
    run "$TIME" -v -o "$OUT/time-upstream.txt" "$PY" scripts/make_tiny_upstream.py "$OUT/upstream" --config "$CONFIG" --synthetic
  fi
  run "$TIME" -v -o "$OUT/time-init.txt" "${EXPORT[@]}" init --llm "$OUT/upstream/qwen3" --vision "$OUT/upstream/siglip" \
    --ae "$OUT/upstream/dcae" --config "$CONFIG" --out "$OUT/checkpoint" --json "$OUT/init.json"
  # the synthetic folders were this script's input to init, nothing reads them after it (disk: the builds)
  if [ "${EMMA4B_KEEP_UPSTREAM:-0}" != 1 ]; then run rm -rf "$OUT/upstream"; fi
else
  echo "checkpoint: $OUT/checkpoint exists, kept (delete it to redo init)"
fi

# 2. one calibration capture for both builds (the same reference, the same recipe)
# (into calib.tmp, renamed when complete: a killed capture must not leave a folder taken as done)
if [ ! -f "$OUT/calib/backbone_und.npz" ]; then
  run rm -rf "$OUT/calib.tmp"
  run "$TIME" -v -o "$OUT/time-calibrate.txt" "${EXPORT[@]}" calibrate --config "$CONFIG" "${WEIGHTS[@]}" --recipe scale --out "$OUT/calib.tmp"
  run mv "$OUT/calib.tmp" "$OUT/calib"
fi

# 3. the two builds, each with its plan (the weight estimate the bundle is held to)
build() {  # precision target [extra build flags]
  local p="$1" t="$2" d="$OUT/$1-$2"
  local extra=("${@:3}")
  run mkdir -p "$d"
  if [ "$DRY" = 0 ]; then
    "${EXPORT[@]}" plan --config "$CONFIG" --precision "$p" --target "$t" --json > "$d/plan.json"
  else
    printf '+ %s plan --config %s --precision %s --target %s --json > %s\n' "emma-export" "$CONFIG" "$p" "$t" "$d/plan.json"
  fi
  # --force: a failed verify still leaves the bundle and its report, so the table shows what failed
  if [ -f "$d/build.json" ] && [ -f "$d/bundle/manifest.json" ]; then
    echo "build $p $t: $d/build.json exists, kept (delete $d to redo)"
    return
  fi
  run rm -rf "$d"/.bundle.build-*  # a killed build's temporary folder (up to its 36 GB export)
  run "$TIME" -v -o "$d/time.txt" "${EXPORT[@]}" build --config "$CONFIG" "${WEIGHTS[@]}" \
    --precision "$p" --target "$t" --out "$d/bundle" --json "$d/build.json" --force --overwrite --quiet --calibration "$OUT/calib" "${BUILD_FLAGS[@]}" "${extra[@]}" \
    || echo "build $p $t exited $? (see $d/time.txt)"
}
# TensorRT-RTX engines of a bundle for an RTX GPU (the builder runs here without one; full TensorRT for
# h100/jetson does not install here): every component that fits this machine's memory, the rest named
# in the manifest for building on the device
engines() {  # run folder
  local d="$1"
  if [ -f "$d/engines.ok" ]; then echo "engines $d: done, kept (delete $d/engines.ok to redo)"; return; fi
  if [ "$DRY" = 1 ] || [ -f "$d/bundle/manifest.json" ]; then
    if run "$TIME" -v -o "$d/time-engines.txt" "${EXPORT[@]}" engines --bundle "$d/bundle" --target "$ENGINE_TARGET"; then
      run touch "$d/engines.ok"
    else
      echo "engines $d $ENGINE_TARGET exited (see $d/time-engines.txt)"
    fi
  fi
}
RUNS=()
for b in $BUILDS; do
  case "$b" in
    fp8) build fp8 h100; RUNS+=("$OUT/fp8-h100") ;;
    # the Orin (16 GB) fits emma-4b int4w at 8192 tokens of context only with an 8-bit KV cache (plan)
    int4w) build int4w jetson-orin --kv-cache int8; RUNS+=("$OUT/int4w-jetson-orin") ;;
    fp16) build fp16 h100; RUNS+=("$OUT/fp16-h100") ;;
  esac
done

for d in "${RUNS[@]}"; do engines "$d"; done

# 4. the table
run "$PY" scripts/scale_table.py "${RUNS[@]}"
if [ "$DRY" = 0 ]; then
  for f in "$OUT"/time-*.txt; do
    [ -f "$f" ] && echo "$(basename "$f" .txt): $(grep -E 'Maximum resident|Elapsed' "$f" | tr -s ' ' | tr '\n' ' ')"
  done
fi
