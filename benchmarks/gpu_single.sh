#!/usr/bin/env bash
# The one-GPU benchmarks of docs/benchmarks.md, in one go on the GPU machine (after staging the stack,
# see ../shared/gpu/README.md): flex-attention packing test, rollout overhead, colocated weight sync
# (1.5B, 7B), trainer MFU.
# Each writes its JSON line into ${OUT:-benchmarks/results/tmp}/<name>.json.
set -uo pipefail
out=${OUT:-benchmarks/results/tmp}; mkdir -p "$out"
export PYTHONPATH=$PWD:${PYTHONPATH:-}
models=${MODELS:-/tmp/bench-models}; mkdir -p "$models"
run() { local name=$1; shift; echo "=== $name: $*"; timeout "${LIMIT:-900}" python -m areal_like.cli bench "$@" --out "$out/$name.json" 2>&1 | grep -v "INFO\|Writing model\|Loading weights\|it/s\]" | tail -${TAIL:-12}; }
for what in ${WHAT:-flex rollout sync15 sync7 trainer}; do
  case $what in
    flex)    timeout 300 python -m pytest -q -m gpu tests/gpu/test_flex_packing.py -p no:cacheprovider 2>&1 | tail -3 ;;
    rollout) run gpu_rollout gpu_rollout --shape 1.5b --requests 256 --prompt-len 256 --median 256 --cap 1024 --eager --model-dir "$models/1.5b" ;;
    sync15)  run gpu_sync_colocated_1.5b gpu_sync --shape 1.5b --placement colocated --verify --model-dir "$models/1.5b" ;;
    copy)    run device_copy_7b device_copy --shape 7b ;;
    sync7)   run gpu_sync_colocated_7b gpu_sync --shape 7b --placement colocated --gpu-mem 0.3 --verify --model-dir "$models/7b" ;;
    trainer) run trainer_1.5b trainer --shape 1.5b --grad-ckpt --num-seqs 256 --budget 16384 --fixed-size 8 --repeats 2 ;;
  esac
done
