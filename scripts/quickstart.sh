#!/usr/bin/env bash
# Set up the CPU stack and run the quickstart recipe: a tiny Qwen2 model learns single-digit
# addition with asynchronous GRPO (eta=2) on a local Ray instance. Extra key=value args override.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
source "$root/scripts/setup_venv.sh"
cd "$root"
exec areal-like train --config configs/quickstart.yaml "$@"
