"""Gradient checkpointing really runs in the trainer: the policy, the critic and the SFT model train
in train mode (transformers checkpoints only there), the reference model stays in eval mode.

One spawned process (DeepSpeed over gloo, world size 1) runs each trainer twice on the same batch,
with and without ``gradient_checkpointing``, and counts the forward calls of every decoder layer.
A checkpointed layer runs its forward once more in the backward (the recompute), so the counts
differ by exactly one call per layer and trained micro-batch.
"""

from __future__ import annotations

import json

import pytest
import torch

from areal_like.core.net import free_port
from benchmarks.trainer import LayerCalls
from tests.integration.test_trainer_dist import MAX_NEW_TOKENS, make_batch
from tests.spawned import run_spawned
from trainer.config import KLConfig, TrainConfig

pytestmark = pytest.mark.slow

# PPO with a critic and a reference model: all three engines of a trainer rank in one run.
PPO = dict(algo="ppo", kl=KLConfig(coef=0.1), zero_stage=2, micro_batch_size=8, packing=False)
SFT_RECORDS = [{"prompt": f"{a}+{b}=", "response": str(a + b)} for a in range(4) for b in range(2)]


def _job(port: int, model_dir: str, sft_path: str, tmp: str, out) -> None:
    torch.set_num_threads(1)
    from trainer.sft import SFTConfig, SFTRank
    from trainer.worker import TrainerRank

    store, metas = make_batch()
    results: dict = {}
    for ckpt in (False, True):
        cfg = TrainConfig(gradient_checkpointing=ckpt, **PPO)
        trainer = TrainerRank(cfg, 0, 1, "127.0.0.1", port, model_dir, 16, 1.0, 0, MAX_NEW_TOKENS)
        engines = dict(policy=trainer.engine, critic=trainer.critic.engine, ref=trainer.ref)
        calls = {role: LayerCalls(engine.module) for role, engine in engines.items()}
        stats = trainer.train_step(store, metas, policy_version=1)
        results[f"rl_ckpt={ckpt}"] = dict(
            calls={role: c.count for role, c in calls.items()},
            layers={role: len(c.layers) for role, c in calls.items()},
            training={role: engine.module.training for role, engine in engines.items()},
            micro_batches=stats.metrics["train/micro_batches"],
            metric=stats.metrics["train/gradient_checkpointing"],
        )

        sft = SFTConfig(
            model_path=model_dir,
            train_path=sft_path,
            output_dir=f"{tmp}/sft_{ckpt}",
            batch_size=4,
            micro_batch_size=2,
            gradient_checkpointing=ckpt,
        )
        rank = SFTRank(sft, 0, 1, "127.0.0.1", port)
        sft_calls = LayerCalls(rank.engine.module)
        rank._step([0, 1, 2, 3])  # two micro-batches of two sequences
        results[f"sft_ckpt={ckpt}"] = dict(
            calls=sft_calls.count, layers=len(sft_calls.layers), training=rank.engine.module.training
        )
    out.put(("modes", results))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from areal_like.core.models import ModelBuildConfig, build_model

    tmp = tmp_path_factory.mktemp("trainer_modes")
    model_dir = build_model(
        ModelBuildConfig(hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1, num_layers=3),
        str(tmp / "model"),
    )
    sft_path = tmp / "sft.jsonl"
    sft_path.write_text("".join(json.dumps(r) + "\n" for r in SFT_RECORDS))
    job = (_job, (free_port("127.0.0.1"), model_dir, str(sft_path), str(tmp)))
    return run_spawned([job], timeout_s=500, what="trainer-modes process")["modes"]


def test_policy_and_critic_recompute_every_layer_under_gradient_checkpointing(results):
    off, on = results["rl_ckpt=False"], results["rl_ckpt=True"]
    micro_batches = on["micro_batches"]
    assert micro_batches == off["micro_batches"] >= 2
    for role in ("policy", "critic"):
        assert on["layers"][role] == 3
        assert on["calls"][role] - off["calls"][role] == on["layers"][role] * micro_batches, role
        assert on["training"][role] and off["training"][role]
    # the metrics row says so: the recompute counted above is what the metric reports
    assert on["metric"] == 1.0 and off["metric"] == 0.0


def test_the_reference_model_stays_in_eval_mode_and_is_never_recomputed(results):
    off, on = results["rl_ckpt=False"], results["rl_ckpt=True"]
    assert not on["training"]["ref"] and not off["training"]["ref"]
    assert on["calls"]["ref"] == off["calls"]["ref"] == on["layers"]["ref"] * on["micro_batches"]


def test_sft_recomputes_every_layer_under_gradient_checkpointing(results):
    off, on = results["sft_ckpt=False"], results["sft_ckpt=True"]
    assert on["training"] and off["training"]
    assert off["calls"] == on["layers"] * 2  # two micro-batches, one forward each
    assert on["calls"] == on["layers"] * 4  # and one recompute each
