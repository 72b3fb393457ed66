"""Builders for the run's actors and model directory (what the controller starts before its loop)."""

from __future__ import annotations

import dataclasses
import logging
import os

import ray

from areal_like import placement
from areal_like.config import Config, ConfigError, ModelConfig, TaskConfig
from rollout.samples import ForcedLengths
from rollout.worker import RolloutWorker
from trainer.worker import TrainerRank

logger = logging.getLogger(__name__)


def resolve_model_path(cfg: ModelConfig, run_dir: str, task: TaskConfig | None = None, seed: int = 0) -> str:
    """``model.path`` when given (a local HF dir), else a model built once into run_dir/init_model;
    then, when ``task.warmup_steps`` > 0, that model after the task's warm-up (run_dir/warmup_model)."""
    if cfg.path is not None:
        if not os.path.isdir(cfg.path):
            raise ConfigError(f"model.path={cfg.path!r} is not a directory (a local HF model dir)")
        path = os.path.abspath(cfg.path)
    else:
        from areal_like.core.models import build_model

        path = os.path.join(run_dir, "init_model")
        if not os.path.exists(os.path.join(path, "config.json")):
            build_model(cfg.build, path)
            logger.info("built a new model from model.build into %s", path)
    if task is not None and task.warmup_steps > 0:
        from areal_like.tasks.warmup import warm_up

        path = warm_up(task, path, run_dir, seed)
    return path


def make_trainers(cfg: Config, model_path: str, options: list[dict]) -> list:
    """``train.num_ranks`` DeepSpeed rank actors, rank i with ``options[i]`` (its bundle of the
    trainer placement group, ``placement.trainer_options``), rendezvous on rank 0's node."""
    n = cfg.train.num_ranks
    samples_per_rank = cfg.train.batch_groups * cfg.rollout.group_size // n
    master_addr, port = placement.rendezvous_address(options[0])
    return [
        ray.remote(TrainerRank)
        .options(max_concurrency=1, **options[rank])
        .remote(
            cfg.train,
            rank,
            n,
            master_addr,
            port,
            model_path,
            samples_per_rank,
            cfg.rollout.temperature,
            cfg.run.seed,
            max_new_tokens=cfg.rollout.max_new_tokens,
        )
        for rank in range(n)
    ]


def make_rollout_worker(
    cfg: Config,
    model_path: str,
    reward_fn_path: str,
    dispatcher,
    store,
    seed: int,
    worker_id: int,
    trainer_opts: list[dict] | None = None,
    forced_lengths: ForcedLengths | None = None,
):
    """One threaded rollout actor (its weights are pushed by the next sync or by the supervisor).
    ``trainer_opts``: the trainer ranks' options, to share their GPUs under colocated placement.
    ``forced_lengths``: benchmarks only (eos ignored, lognormal response lengths)."""
    actor = ray.remote(RolloutWorker).options(
        max_concurrency=4, **placement.rollout_options(cfg.placement, worker_id, trainer_opts)
    )
    rollout_cfg = cfg.rollout
    if cfg.placement.devices == "colocated" and not rollout_cfg.vllm.enable_sleep_mode:
        # Colocated engines free the GPU while the trainer steps: vLLM must allocate for sleeping.
        rollout_cfg = dataclasses.replace(
            rollout_cfg, vllm=dataclasses.replace(rollout_cfg.vllm, enable_sleep_mode=True)
        )
    return actor.remote(
        worker_id,
        rollout_cfg,
        model_path,
        reward_fn_path,
        cfg.task.reward_timeout_s,
        cfg.task.reward_workers,
        dispatcher,
        store,
        seed + worker_id,
        0,
        forced_lengths,
        reward_pool=cfg.task.reward_pool,
    )
