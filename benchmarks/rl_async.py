"""Asynchronous vs synchronous RL: effective training throughput of whole runs on the same GPUs.

``areal-like bench rl_async [--trainer-gpus 1 --engine-gpus 1 --etas 0,4 --steps 7 --warmup 2]``

Each run is the real system (configs/gpu_addition.yaml with overrides): Ray, vLLM rollout workers on
their own GPUs (split placement), DeepSpeed ZeRO-2 bf16 trainer ranks with gradient checkpointing and
packed micro-batches, the datastore, and weights moved after every step through the reallocation
plan over NCCL. The policy is a Qwen2.5-1.5B-shaped body (28 layers, hidden 1536, 12/2 heads,
MLP 8960) with the char tokenizer's small vocabulary, random weights. Response lengths are forced
(eos ignored) to a lognormal mix: median ``--median`` tokens, sigma 1, capped at ``--cap`` (each
sample's length fixed by its group id and index, so every run trains on the same mix).
eta=0 is the synchronous baseline (generation waits for the weights of the step before); eta>0
lets generation run ahead while the trainer steps, with twice the batch of groups in flight.
Throughput = response tokens consumed by train steps / seconds of those steps, over the steps after
``--warmup`` (no checkpoints are written). Last line: JSON with
``async_over_sync`` (the best async eta's throughput over eta=0's).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

from benchmarks import emit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="areal-like bench rl_async", description=__doc__.splitlines()[0])
    parser.add_argument("--trainer-gpus", type=int, default=1)
    parser.add_argument("--engine-gpus", type=int, default=1)
    parser.add_argument("--etas", default="0,4", help="comma-separated max_staleness values (0 = sync)")
    parser.add_argument("--groups", type=int, default=16, help="prompt groups per train batch")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--median", type=int, default=256, help="median forced response length")
    parser.add_argument("--cap", type=int, default=2048, help="longest response")
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    parser.add_argument("--budget", type=int, default=16384, help="train.max_tokens_per_micro_batch")
    parser.add_argument(
        "--eager", action="store_true", help="vLLM enforce_eager (faster start, slower decode)"
    )
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.steps < args.warmup + 1:
        raise SystemExit("--steps must exceed --warmup")

    from areal_like.config import load_config
    from areal_like.controller import run_training
    from areal_like.core.models import ModelBuildConfig, build_model
    from rollout.samples import ForcedLengths

    lengths = ForcedLengths(median=args.median, sigma=1.0)
    work = args.workdir or tempfile.mkdtemp(prefix="rl-async-")
    model_dir = os.path.join(work, "model")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        build_model(
            ModelBuildConfig(
                hidden_size=1536,
                num_layers=args.layers,
                num_heads=12,
                num_kv_heads=2,
                intermediate_size=8960,
                max_position_embeddings=args.cap + 64,
            ),
            model_dir,
        )
    runs = {}
    for eta in [int(e) for e in args.etas.split(",")]:
        run_dir = os.path.join(work, f"eta{eta}")
        shutil.rmtree(run_dir, ignore_errors=True)
        overrides = [
            f"run.dir={run_dir}",
            f"model.path={model_dir}",
            "run.tensorboard=false",
            "run.save_checkpoints=false",
            "eval.enabled=false",
            f"rollout.num_workers={args.engine_gpus}",
            f"rollout.max_staleness={eta}",
            f"rollout.group_size={args.group_size}",
            f"rollout.max_new_tokens={args.cap}",
            f"rollout.groups_per_generate={2 * args.groups}",
            f"rollout.max_concurrent_groups={args.groups * (2 if eta else 1)}",
            "rollout.vllm.gpu_memory_utilization=0.85",
            f"rollout.vllm.enforce_eager={str(args.eager).lower()}",
            f"rollout.vllm.max_model_len={args.cap + 64}",
            f"train.num_ranks={args.trainer_gpus}",
            f"train.batch_groups={args.groups}",
            f"train.max_steps={args.steps}",
            "train.gradient_checkpointing=true",
            f"train.max_tokens_per_micro_batch={args.budget}",
            "placement.devices=split",
            "realloc.enabled=true",
            "realloc.backend=nccl",
            "realloc.placement=split",
        ]
        config = load_config(os.path.join(ROOT, "configs", "gpu_addition.yaml"), overrides)
        summary = run_training(config, forced_lengths=lengths)
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        timed = rows[args.warmup :]
        tokens = sum(r["train/num_tokens"] for r in timed)
        seconds = sum(r["timing/step_s"] for r in timed)
        runs[eta] = dict(
            tokens_per_s=round(tokens / seconds, 1),
            timed_steps=len(timed),
            step_s=[round(r["timing/step_s"], 2) for r in rows],
            wait_s=[round(r["timing/wait_batch_s"], 2) for r in rows],
            train_s=[round(r["timing/train_s"], 2) for r in rows],
            sync_s=[round(r["timing/weight_sync_s"], 3) for r in rows],
            staleness_max=max(r["staleness/max"] for r in rows),
            response_len_mean=round(sum(r["rollout/response_len_mean"] for r in rows) / len(rows), 1),
            engines_in_sync=summary.engines_in_sync,
        )
        print(
            f"eta={eta}: {runs[eta]['tokens_per_s']:.0f} trained tokens/s over {len(timed)} steps", flush=True
        )

    sync = runs.get(0)
    best_eta = max((e for e in runs if e > 0), key=lambda e: runs[e]["tokens_per_s"], default=None)
    import torch

    result = {
        "bench": "rl_async",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "trainer_gpus": args.trainer_gpus,
        "engine_gpus": args.engine_gpus,
        "model": f"Qwen2.5-1.5B-shaped body, {args.layers} layers, char vocab",
        "batch": f"{args.groups} groups x {args.group_size}",
        "lengths": {"median": lengths.median, "sigma": lengths.sigma, "cap": args.cap},
        "vllm_enforce_eager": args.eager,
        "runs": {str(e): r for e, r in runs.items()},
        "best_async_eta": best_eta,
        "async_over_sync": (
            round(runs[best_eta]["tokens_per_s"] / sync["tokens_per_s"], 3)
            if sync and best_eta is not None
            else None
        ),
    }
    print(f"async (eta={best_eta}) / sync = {result['async_over_sync']}")
    emit(result, args.out)
    return 0
