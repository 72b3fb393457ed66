#!/usr/bin/env bash
# Usage: bash scripts/train.sh CONFIG.yaml [key=value ...]
# Re-running with the same run.dir resumes from its latest checkpoint.
set -euo pipefail
if [ $# -lt 1 ]; then echo "usage: bash scripts/train.sh CONFIG.yaml [key=value ...]" >&2; exit 2; fi
root=$(cd "$(dirname "$0")/.." && pwd)
source "$root/scripts/setup_venv.sh"
config=$1; shift
exec areal-like train --config "$config" "$@"
