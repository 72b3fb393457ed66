#!/usr/bin/env bash
# The two-GPU checks and benchmarks (after staging the stack, ../shared/gpu/README.md):
#   WHAT=test   split-placement GPU test (vLLM on GPU 1, DeepSpeed on GPU 0, weights over NCCL)
#   WHAT=sync   weight sync into a live vLLM engine, split placement, 1.5B (and 7B with SYNC7=1)
#   WHAT=async  async vs sync whole runs (bench rl_async)
# JSON results land in ${OUT:-benchmarks/results/tmp}.
set -uo pipefail
out=${OUT:-benchmarks/results/tmp}; mkdir -p "$out"
export PYTHONPATH=$PWD:${PYTHONPATH:-}
models=${MODELS:-/tmp/bench-models}; mkdir -p "$models"
quiet() { grep -v "INFO\|WARNING\|Writing model\|Loading weights\|it/s\]\|it/s$" | tail -${TAIL:-12}; }
for what in ${WHAT:-test sync async}; do
  case $what in
    test)  timeout 300 python -m pytest -q -m gpu tests/gpu/test_gpu_runs.py -k split -p no:cacheprovider 2>&1 | quiet ;;
    sync)  timeout 240 python -m areal_like.cli bench gpu_sync --shape 1.5b --placement split --verify \
             --model-dir "$models/1.5b" --out "$out/gpu_sync_split_1.5b.json" 2>&1 | quiet
           [ "${SYNC7:-0}" = 1 ] && timeout 400 python -m areal_like.cli bench gpu_sync --shape 7b --placement split --verify \
             --model-dir "$models/7b" --out "$out/gpu_sync_split_7b.json" 2>&1 | quiet ;;
    async) timeout ${LIMIT:-560} python -m areal_like.cli bench rl_async --etas 0,4 --steps 6 --warmup 2 \
             --median 192 --cap 768 --groups 16 --group-size 8 --workdir /tmp/rl-async \
             --out "$out/rl_async.json" 2>&1 | grep -v "INFO\|WARNING" | grep "^step\|eta=\|async\|Error\|error\|{" | tail -40 ;;
  esac
done
