#!/usr/bin/env bash
# Create or reuse the virtual environment at .venv and install rsp_fast into it, building
# rsp_fast._C. Idempotent: a second run installs nothing unless pyproject.toml, setup.py or
# csrc/ changed (a stamp in .venv records what was installed).
#   RSP_FAST_TORCH   the torch requirement (default: torch==2.14.1 torchvision==0.29.1)
#   USE_CUDA=0       build without the CUDA kernels
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.rsp_fast-installed"

if [ ! -x "$PY" ]; then
  echo "[bootstrap] creating $VENV"
  python3 -m venv "$VENV"
fi

want="$(cat pyproject.toml setup.py $(find csrc -type f | sort) | sha256sum | cut -d' ' -f1)"
# Up to date where the kernels load and run with this torch (an extension built for another torch
# imports, but rsp_fast refuses it: HAVE_C is the library's own verdict).
kernels_run='import sys; from rsp_fast.ops import custom; sys.exit(not custom.HAVE_C)'
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$PY" -W ignore -c "$kernels_run" 2>/dev/null; then
  echo "[bootstrap] .venv is up to date"
  exit 0
fi

"$PY" -m pip install --quiet --upgrade pip setuptools wheel ninja
if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
  # torch's CUDA build takes about 5.5 GiB in .venv; say so before pip fails half-way with ENOSPC.
  free_kib="$(df -Pk "$VENV" | awk 'NR==2 {print $4}')"
  if [ -z "${RSP_FAST_TORCH:-}" ] && [ "${free_kib:-0}" -lt $((6 * 1024 * 1024)) ]; then
    echo "[bootstrap] error: torch needs about 6 GiB in $VENV, but its disk has only $((free_kib / 1024)) MiB free" >&2
    exit 1
  fi
  echo "[bootstrap] installing torch (a few minutes)"
  # shellcheck disable=SC2086
  "$PY" -m pip install --quiet ${RSP_FAST_TORCH:-torch==2.14.1 torchvision==0.29.1}
fi

# CUDA sources compile wherever nvcc and a CUDA build of torch are present, GPU or not.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
echo "[bootstrap] building and installing rsp_fast (compiles rsp_fast._C)"
"$PY" -m pip install --quiet --no-build-isolation -e ".[dev,video,eval]"
"$PY" -c "import torch, rsp_fast._C"  # the extension links against the libraries torch loads
"$PY" -c "$kernels_run" || { echo "[bootstrap] error: rsp_fast._C was built but does not run: $("$PY" -c 'from rsp_fast.ops import custom; print(custom.C_ERROR)')" >&2; exit 1; }
echo "$want" > "$STAMP"
echo "[bootstrap] done: $("$PY" -c 'import rsp_fast, torch; print("rsp_fast", rsp_fast.__version__, "torch", torch.__version__, rsp_fast.backends())')"
