#!/usr/bin/env bash
# The whole protocol in miniature on scikit-learn's bundled digits, in minutes on a CPU
# (what it runs, with how many seeds: the description below, from script/demo.py).
# usage: bash script/demo.sh [OUT_DIR] [--quick] [--workers N]     (default OUT_DIR: runs/demo)
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  -h|--help) sed -n '1,/^[^#]/{/^#!/d;s/^# \{0,1\}//p;}' script/demo.sh; echo; exec "${PYTHON:-python}" script/demo.py --help ;;
esac
OUT=${1:-runs/demo}
shift || true
exec "${PYTHON:-python}" script/demo.py "$OUT" "$@"
