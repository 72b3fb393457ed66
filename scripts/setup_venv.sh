#!/usr/bin/env bash
# Create (or reuse) .venv with the pinned CPU stack and this package installed in editable mode.
# Sourced by quickstart.sh, train.sh and test.sh. Set VENV=path to use another location.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VENV:-$root/.venv}
python=${PYTHON:-python3}
stamp="$venv/.areal_like_installed"
want=$(cat "$root/requirements-cpu.txt" "$root/pyproject.toml" | sha256sum | cut -c1-16)
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv with $($python --version)"
  "$python" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing the pinned CPU stack into $venv (a few minutes the first time)"
  "$venv/bin/python" -m pip install -q --upgrade pip setuptools wheel
  # torch first and pinned: the CPU wheel; an unpinned torch pulls the multi-GB CUDA build.
  "$venv/bin/python" -m pip install -q "$(grep -E '^torch==' "$root/requirements-cpu.txt")"
  "$venv/bin/python" -m pip install -q -r "$root/requirements-cpu.txt"
  "$venv/bin/python" -m pip install -q -e "$root[dev]"
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
export TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=0
