#!/usr/bin/env bash
# The whole protocol in miniature on scikit-learn's bundled digits, in minutes on a CPU.
# usage: bash script/demo.sh [OUT_DIR] [--quick] [--workers N]     (default OUT_DIR: runs/demo)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/demo}
shift || true
exec "${PYTHON:-python}" script/demo.py "$OUT" "$@"
