#!/usr/bin/env bash
# Creates .venv with the pinned CPU torch first (a loose torch requirement would pull a multi-GB
# CUDA build), then the runtime (runtime/) and the toolchain with its test/upstream extras.
# Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# This machine's pip config lists package folders that may be absent; their warnings are noise.
quiet_pip() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
  quiet_pip .venv/bin/pip install -q torch==2.13.0
fi
# Reinstall both distributions whenever either pyproject.toml changed since the last set-up. The
# runtime (runtime/, emma-runtime) goes first: it is not on PyPI, and the toolchain depends on it.
stamp=.venv/.emma-deploy-deps
want=$(cat pyproject.toml runtime/pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  quiet_pip .venv/bin/pip install -q -e ./runtime
  quiet_pip .venv/bin/pip install -q -e '.[test]'
  echo "$want" > "$stamp"
fi
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch, onnxruntime; print("torch", torch.__version__, "| onnxruntime", onnxruntime.__version__)'))"
