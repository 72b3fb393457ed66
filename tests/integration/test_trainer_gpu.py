"""The trainer on one GPU: bf16 DeepSpeed ZeRO-2 and ZeRO-3 with a critic, a reference model and
packed micro-batches (NCCL, world size 1). Run on the GPU machine: ``pytest -m gpu``."""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch

from tests.integration.test_trainer_dist import DictStore, make_batch
from trainer.config import KLConfig, TrainConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(trainer) -> dict[str, np.ndarray]:
    import deepspeed

    params = list(trainer.engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=trainer.config.zero_stage == 3):
        return {
            k: v.detach().float().cpu().numpy().copy() for k, v in trainer.engine.module.state_dict().items()
        }


def test_bf16_zero2_and_zero3_train_ppo_with_reference_on_gpu(tmp_path):
    from areal_like.core.models import ModelBuildConfig, build_model
    from trainer.worker import TrainerRank

    model_dir = build_model(
        ModelBuildConfig(hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2),
        str(tmp_path / "model"),
    )
    store, metas = make_batch(num_groups=8, group_size=8)
    assert isinstance(store, DictStore)
    port = _free_port()
    losses = {}
    for stage in (2, 3):
        cfg = TrainConfig(
            zero_stage=stage,
            algo="ppo",
            gae_lambda=0.95,
            kl=KLConfig(coef=0.05),
            max_tokens_per_micro_batch=128,
            ppo_minibatches=2,
            lr=1e-3,
            warmup_steps=1,
        )
        trainer = TrainerRank(cfg, 0, 1, "127.0.0.1", port, model_dir, 64, 1.0, 0, 30)
        assert trainer.engine.bfloat16_enabled() and trainer.device.type == "cuda"
        before = _weights(trainer)
        step_stats = [trainer.train_step(store, metas) for _ in range(3)]
        after = _weights(trainer)
        for stats in step_stats:
            assert stats.skipped_steps == 0
            assert all(math.isfinite(v) for v in stats.metrics.values()), stats.metrics
        assert any(not np.array_equal(before[k], after[k]) for k in before)
        losses[stage] = step_stats[0].loss
        del trainer
        torch.cuda.empty_cache()
    assert losses[2] == pytest.approx(losses[3], abs=2e-2)  # same first step up to bf16 rounding
