#!/usr/bin/env bash
# Set up .venv (first run only) and run the embedded default demo offline; output in out/demo/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/rsp-fast" demo -o "$ROOT/out/demo" "$@"
