#!/usr/bin/env bash
# GSM8K-style math with the Qwen tokenizer on CPU: build a tiny Qwen2 with Qwen2.5's 151,936-token
# vocabulary, SFT warm-up on the synthetic easy set, then asynchronous GRPO (configs/gsm8k_cpu.yaml).
# Extra args: key=value overrides the RL recipe, sft.key=value the SFT one, e.g. run.dir=runs/g1.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
source "$root/scripts/setup_venv.sh"
cd "$root"
exec python scripts/sft_then_rl.py --config configs/gsm8k_cpu.yaml --sft-config configs/sft_gsm8k_cpu.yaml "$@"
