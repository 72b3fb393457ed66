#!/usr/bin/env bash
# Set up (or reuse) the venv, lint, and run the CPU test suite (GPU tests are excluded).
# Extra args go to pytest, e.g. bash scripts/test.sh -k staleness
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
source "$root/scripts/setup_venv.sh"
cd "$root"
echo "[test] ruff"
ruff check .
ruff format --check .
echo "[test] mypy"
mypy
echo "[test] pytest"
set +e
python -m pytest -m "not gpu" "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then echo "[test] pytest collected no tests"; fi
exit $rc
