#!/usr/bin/env bash
# The one-GPU benchmarks of docs/benchmarks.md, in one go on the GPU machine (after staging the stack,
# see ../shared/gpu/README.md): flex-attention packing test, rollout overhead, colocated weight sync
# (1.5B, 7B), trainer MFU and memory, 20 colocated GSM8K steps at 1.5B, the GSM8K CPU recipe (SFT then
# GRPO) learning on the GPU (`learn`). Not in the default list either: `short` (the two short rollout
# mixes, both engines up at once and 4 alternating repeats, the client's CPU and profile), `long`
# (the two median-1k / cap-8k mixes the same way, REPEATS default 1: ~7 min on an H100),
# `sync_qwen3` (a Qwen3-1.7B swap), `runs` (whole colocated runs, Qwen3 included). WHAT picks and
# orders them.
# Each writes its JSON line into ${OUT:-benchmarks/results/tmp}/<name>.json (with JSONL=1: all of
# them into bench.jsonl, and vLLM's start-up lines into startup.log, for the 8-file limit of $OUT).
set -uo pipefail
out=${OUT:-benchmarks/results/tmp}; mkdir -p "$out"
export PYTHONPATH=$PWD:${PYTHONPATH:-}
models=${MODELS:-/tmp/bench-models}; mkdir -p "$models"
run() {
  local name=$1; shift; echo "=== $name: $*"
  local file="$out/$name.json"; [ -n "${JSONL:-}" ] && file="/tmp/bench-$name.json"
  timeout "${LIMIT:-900}" python -m areal_like.cli bench "$@" --out "$file" > "/tmp/bench-$name.log" 2>&1
  grep -v "INFO\|Writing model\|Loading weights\|it/s\]" "/tmp/bench-$name.log" | tail -"${TAIL:-12}"
  if [ -n "${JSONL:-}" ]; then
    [ -f "$file" ] && { printf '{"name": "%s", "result": ' "$name"; tr -d "\n" < "$file"; echo "}"; } >> "$out/bench.jsonl"
    grep -E "torch.compile take|[Cc]apturing|Model loading took|init engine|Compil|started in" "/tmp/bench-$name.log" \
      | sed "s/^/$name: /" >> "$out/startup.log"
  fi
}
r15="--shape 1.5b --prompt-len 256 --model-dir $models/1.5b"
for what in ${WHAT:-flex vllm mixes mixes_eager sync15 sync7 trainer gsm8k20}; do
  case $what in
    flex)    timeout 300 python -m pytest -q -m gpu tests/gpu/test_flex_packing.py -p no:cacheprovider 2>&1 | tail -3 ;;
    vllm)    timeout 600 python -m pytest -q -m gpu tests/gpu/test_vllm_engine.py -p no:cacheprovider 2>&1 | tail -5 ;;
    rollout) run gpu_rollout_256 gpu_rollout $r15 --requests 256 --median 256 --cap 1024 --stream-intervals 1,16 ;;
    rollout_eager) run gpu_rollout_256_eager gpu_rollout $r15 --requests 256 --median 256 --cap 1024 --eager ;;
    mixes)   run gpu_rollout_mixes gpu_rollout $r15 --mixes 256:256:1024,1024:256:1024,256:1024:8192,1024:1024:8192 ;;
    short)   run gpu_rollout_short gpu_rollout $r15 --mixes 256:256:1024,1024:256:1024 --repeats ${REPEATS:-4} --profile \
               --together --gpu-mem 0.42 ;;
    long)    run gpu_rollout_long gpu_rollout $r15 --mixes 256:1024:8192,1024:1024:8192 --repeats ${REPEATS:-1} \
               --together --gpu-mem 0.42 ;;
    mixes_eager) run gpu_rollout_mixes_eager gpu_rollout $r15 --mixes 256:256:1024,1024:256:1024 --eager ;;
    sync15)  run gpu_sync_colocated_1.5b gpu_sync --shape 1.5b --placement colocated --verify --model-dir "$models/1.5b" ;;
    copy)    run device_copy_7b device_copy --shape 7b ;;
    sync_qwen3) run gpu_sync_colocated_qwen3-1.7b gpu_sync --shape qwen3-1.7b --placement colocated --verify \
               --model-dir "$models/qwen3-1.7b" ;;
    runs)    timeout 600 python -m pytest -q -m gpu tests/gpu/test_gpu_runs.py -p no:cacheprovider 2>&1 | tail -5 ;;
    sync7)   run gpu_sync_colocated_7b gpu_sync --shape 7b --placement colocated --gpu-mem 0.3 --verify --model-dir "$models/7b" ;;
    trainer) run trainer_1.5b trainer --shape 1.5b --grad-ckpt --num-seqs 256 --budget 16384 --fixed-size 8 --repeats 2 \
               --logprobs chunked,full ;;
    gsm8k20) bash benchmarks/gpu_gsm8k_steps.sh "$out" ;;
    learn)   bash benchmarks/gpu_gsm8k_learn.sh "$out" ;;
  esac
done
