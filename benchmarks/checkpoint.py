"""Checkpoints on the training loop: seconds the loop is blocked per checkpoint, sync vs async.

``areal-like bench checkpoint [--hidden 512 --layers 4 --steps 8 --ranks 1 --out FILE]``

The real run, twice, side by side: the controller (Ray local, DeepSpeed ZeRO-2 trainer ranks, the
HF rollout engine) on the quickstart task with a larger Qwen2-shaped model, checkpointing after
every step, once with ``run.async_checkpoint=false`` and once with ``true``. Blocked seconds are the
loop's ``timing/checkpoint_s`` (from the step boundary until the loop may go on): synchronous, the
whole save (datastore, every rank's files, state, manifest, commit); asynchronous, the snapshot at
the boundary (dispatcher, datastore samples, every rank's copy of its state into host memory) plus
any wait for the previous save's commit. The first step (warm-up) and the last (whose save always
waits for its commit, to end the run with it on disk) are left out of the per-checkpoint figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from benchmarks import emit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_once(run_dir: str, args, background: bool) -> dict:
    from areal_like import checkpoint as ckpt
    from areal_like.config import load_config
    from areal_like.controller import run_training
    from areal_like.metrics import read_jsonl

    heads = max(2, args.hidden // 64)
    overrides = [
        f"run.dir={run_dir}",
        f"model.build.hidden_size={args.hidden}",
        f"model.build.num_layers={args.layers}",
        f"model.build.num_heads={heads}",
        f"model.build.num_kv_heads={max(1, heads // 4)}",
        f"model.build.intermediate_size={args.hidden * 11 // 4}",
        f"train.num_ranks={args.ranks}",
        f"train.batch_groups={2 * args.ranks}",
        "train.micro_batch_size=16",
        "rollout.group_size=4",
        "rollout.groups_per_generate=4",
        "task.num_train_prompts=256",
        "datastore.num_storage_units=1",
        f"train.max_steps={args.steps}",
        "run.checkpoint_every=1",
        "run.keep_checkpoints=2",
        f"run.async_checkpoint={str(background).lower()}",
        "eval.enabled=false",
        "run.plot=false",
        "run.tensorboard=false",
        "ray.num_cpus=2",
    ]
    started = time.perf_counter()
    summary = run_training(load_config(os.path.join(ROOT, "configs", "quickstart.yaml"), overrides))
    wall_s = time.perf_counter() - started
    records = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    middle = records[1:-1]
    blocked = [r["timing/checkpoint_s"] for r in middle]
    steps = [r["timing/step_s"] for r in middle]
    return {
        "mode": "async" if background else "sync",
        "checkpoint_bytes": ckpt.directory_bytes(ckpt.step_dir(run_dir, summary.last_step)),
        "blocked_s_per_checkpoint": blocked,
        "blocked_s_median": statistics.median(blocked),
        "blocked_s_mean": statistics.mean(blocked),
        "step_s_median": statistics.median(steps),
        "train_s": summary.train_seconds,
        "wall_s": wall_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="areal-like bench checkpoint", description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--ranks", type=int, default=1, help="trainer ranks (ZeRO-2 over gloo on CPU)")
    parser.add_argument("--steps", type=int, default=8, help="train steps, a checkpoint after each")
    parser.add_argument("--out", default=None, help="also write the JSON result here")
    args = parser.parse_args(argv)
    if args.steps < 3:
        parser.error("--steps must be >= 3 (the first and the last step are not counted)")

    results = {}
    for background in (False, True):
        with tempfile.TemporaryDirectory(prefix="bench_checkpoint_") as run_dir:
            res = run_once(run_dir, args, background)
        results[res["mode"]] = res
    sync, async_ = results["sync"], results["async"]
    print(f"checkpoint of {sync['checkpoint_bytes'] / 1e6:.0f} MB per save, {args.ranks} rank(s), "
          f"hidden {args.hidden}, {args.layers} layers; {args.steps - 2} saves counted")  # fmt: skip
    print(f"{'mode':<6} {'blocked s/ckpt (median)':>24} {'mean':>8} {'step s (median)':>16} {'train s':>8}")
    for res in (sync, async_):
        print(
            f"{res['mode']:<6} {res['blocked_s_median']:>24.3f} {res['blocked_s_mean']:>8.3f} "
            f"{res['step_s_median']:>16.2f} {res['train_s']:>8.1f}"
        )
    result = {
        "bench": "checkpoint",
        "hidden": args.hidden,
        "layers": args.layers,
        "ranks": args.ranks,
        "steps": args.steps,
        "sync": sync,
        "async": async_,
        "blocked_ratio_sync_over_async": sync["blocked_s_median"] / max(async_["blocked_s_median"], 1e-9),
    }
    emit(result, args.out)
    return 0
