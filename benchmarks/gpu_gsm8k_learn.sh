#!/usr/bin/env bash
# The GSM8K CPU recipe (configs/gsm8k_cpu.yaml + configs/sft_gsm8k_cpu.yaml, run by scripts/gsm8k_cpu.sh)
# on one GPU: the same tiny Qwen2 with the real 151,936-token vocabulary and Qwen's chat template,
# the same data and hyper-parameters, but SFT and the trainer on the GPU in bf16 and rollout on vLLM
# with CUDA graphs, colocated (the engine sleeps while the trainer steps). Held-out accuracy on the
# 100-problem easy test set is measured after SFT (before RL), every 10 RL steps and after RL.
# On the CPU, the chain gave 0.79 -> 0.83 (docs/benchmarks.md). Copies the log, the RL metrics, the
# evaluations and a one-line summary into $1. Extra args go to scripts/sft_then_rl.py.
set -uo pipefail
out=${1:-benchmarks/results/tmp}; shift || true; mkdir -p "$out"
run=${RUN:-/tmp/gsm8k_learn_run}; rm -rf "$run"
export PYTHONPATH=$PWD:${PYTHONPATH:-}
started=$(date +%s)
timeout "${LIMIT:-560}" python scripts/sft_then_rl.py --config configs/gsm8k_cpu.yaml \
  --sft-config configs/sft_gsm8k_cpu.yaml run.dir="$run" \
  ray.num_cpus=null placement.devices=colocated train.bf16=true \
  rollout.engine=vllm rollout.vllm.enforce_eager=false rollout.vllm.gpu_memory_utilization=0.3 \
  rollout.vllm.max_model_len=128 realloc.enabled=true realloc.backend=nccl realloc.placement=colocated \
  eval.every_steps=10 run.plot=false "$@" > /tmp/gsm8k_learn.log 2>&1
echo "exit $? after $(($(date +%s) - started)) s"
grep -E "^(sft|done|error)|held-out|enforce_eager|Traceback" /tmp/gsm8k_learn.log | tail -20
cp /tmp/gsm8k_learn.log "$out/gsm8k_learn.log"
cp "$run/metrics.jsonl" "$out/gsm8k_learn_metrics.jsonl" 2>/dev/null
python - "$run" > "$out/gsm8k_learn_summary.json" <<'PY'
import json, os, sys
run = sys.argv[1]
def rows(name):
    path = os.path.join(run, name)
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []
evals = [{k: r.get(k) for k in ("step", "when", "eval/accuracy", "eval/num_prompts")} for r in rows("eval.jsonl")]
metrics = rows("metrics.jsonl")
fifths = []
if metrics:
    n = max(1, len(metrics) // 5)
    fifths = [round(sum(r["reward/mean"] for r in metrics[i : i + n]) / len(metrics[i : i + n]), 3)
              for i in range(0, len(metrics), n)]
print(json.dumps({"evals": evals, "reward_mean_by_fifths": fifths, "steps": len(metrics),
                  "max_staleness": max((r.get("staleness/max", 0) for r in metrics), default=None)}))
PY
cat "$out/gsm8k_learn_summary.json"
