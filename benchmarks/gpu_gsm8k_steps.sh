#!/usr/bin/env bash
# configs/gsm8k_1gpu.yaml for STEPS steps (default 20) on one GPU, colocated (vLLM with CUDA graphs
# and a DeepSpeed bf16 rank take turns on the GPU), with a Qwen2.5-1.5B-shaped model of random
# weights and the Qwen tokenizer built on start (no model can be downloaded on the GPU machine).
# Responses of a random model never stop, so every sample runs to max_new_tokens: the step is
# 16 groups x 8 samples x 512 tokens. Copies metrics.jsonl, the run's log and a one-line summary
# (step time split into wait-for-batch / train / weight sync, peak trainer memory) into $1.
set -uo pipefail
out=${1:-benchmarks/results/tmp}; mkdir -p "$out"
run=${RUN:-/tmp/gsm8k_1gpu_run}; rm -rf "$run"
export PYTHONPATH=$PWD:${PYTHONPATH:-}
timeout "${LIMIT:-540}" python -m areal_like.cli train --config configs/gsm8k_1gpu.yaml run.dir="$run" \
  model.path=null model.build.shape=qwen2.5-1.5b model.build.tokenizer=qwen \
  train.max_steps="${STEPS:-20}" train.batch_groups=16 rollout.max_new_tokens=512 \
  run.save_checkpoints=false eval.enabled=false run.plot=false > /tmp/gsm8k20.log 2>&1
echo "exit $?"
grep -v "it/s\]" /tmp/gsm8k20.log | tail -40
cp /tmp/gsm8k20.log "$out/gsm8k20.log"
cp "$run/metrics.jsonl" "$out/gsm8k20_metrics.jsonl" 2>/dev/null
cp "$run/summary.json" "$out/gsm8k20_summary.json" 2>/dev/null
python - "$run/metrics.jsonl" <<'PY'
import json, sys, statistics as st
rows = [json.loads(l) for l in open(sys.argv[1])] if len(sys.argv) > 1 else []
rows = rows[1:] or rows  # step 1 carries the first generation's wait
def med(k):
    v = [r[k] for r in rows if k in r]
    return round(st.median(v), 2) if v else None
keys = ["timing/step_s", "timing/wait_batch_s", "timing/train_s", "timing/weight_sync_s",
        "perf/trainer_peak_gib", "perf/trained_tokens_per_s", "staleness/max"]
print(json.dumps({"steps": len(rows) + 1, **{k: med(k) for k in keys}}))
PY
