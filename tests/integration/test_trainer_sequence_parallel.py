"""``train.sequence_parallel`` in the RL trainer: ``TrainerRank.train_step`` over gloo with groups of 2
ranks sharing every micro-batch (Ulysses) against a single-rank step without it, on the batch of
tests/integration/test_trainer_dist.py: the same loss, gradient norm and weights after the step.

Runs: 2 ranks in one sequence-parallel group (W=2, N=2), and 4 ranks as 2 data-parallel groups of 2
(W=4, N=2: the batch is split over the groups, each counted once). The cases cover packed and padded
micro-batches, several micro-batches and minibatches, the recomputed proximal and the reference
log-probs (no-grad passes), batch-normalised advantages, ZeRO-2 and ZeRO-3 and gradient checkpointing
(the all-to-alls run again in the backward). Plain SGD makes the comparisons sensitive to any error in
the gradient's scale. (Padded micro-batches: the Ulysses path scores pad positions differently, see
tests/integration/test_sequence_parallel.py; no loss reads them, which the padded case checks.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from areal_like.core.net import free_port
from tests.integration.test_trainer_dist import _rank, _weights, assert_same_weights, make_batch
from tests.spawned import run_spawned
from trainer.config import KLConfig

pytestmark = pytest.mark.slow

SGD = dict(optimizer="sgd", lr=0.5, grad_clip=0.0)
CASES = {
    "packed_kl": dict(
        zero_stage=2,
        max_tokens_per_micro_batch=40,
        packing=True,
        ppo_minibatches=2,
        adv_batch_norm=True,
        kl=KLConfig(coef=0.1, placement="loss"),
        **SGD,
    ),
    "padded_zero3": dict(
        zero_stage=3,
        micro_batch_size=5,
        packing=False,
        gradient_checkpointing=True,
        kl=KLConfig(coef=0.1, placement="reward"),  # the reference is sharded by ZeRO-3 too
        **SGD,
    ),
}


def _summary(stats, trainer) -> dict:
    return dict(
        loss=stats.loss,
        grad_norm=stats.grad_norm,
        num_tokens=stats.num_tokens,
        metrics=stats.metrics,
        weights=_weights(trainer),
    )


def _reference_job(port, model_dir, out):
    torch.set_num_threads(1)
    store, metas = make_batch()
    results = {}
    for name, kwargs in CASES.items():
        trainer = _rank(kwargs, 0, 1, port, model_dir)
        results[name] = _summary(trainer.train_step(store, metas, policy_version=1), trainer)
    out.put(("reference", results))


def _sequence_parallel_job(rank, world, port, model_dir, out):
    torch.set_num_threads(1)
    store, metas = make_batch()
    share = [m for m in metas if m.group_id % world == rank]  # the controller's shard: whole groups
    results = {}
    for name, kwargs in CASES.items():
        trainer = _rank(dict(kwargs, sequence_parallel=2), rank, world, port, model_dir)
        results[name] = _summary(trainer.train_step(store, share, policy_version=1), trainer)
    out.put((f"w{world}/rank{rank}", results))


def _model(tmp_path_factory) -> str:
    from areal_like.core.models import ModelBuildConfig, build_model

    # 2 heads and 1 KV head: the KV head is replicated onto both ranks of a group
    config = ModelBuildConfig(hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)
    return build_model(config, str(tmp_path_factory.mktemp("trainer_sp") / "model"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _model(tmp_path_factory)


@pytest.fixture(scope="module")
def results(model_dir):
    """The reference, the 2-rank and the 4-rank runs, all at once (their start-up overlaps)."""
    jobs = [(_reference_job, (free_port("127.0.0.1"), model_dir))]
    for world in (2, 4):
        port = free_port("127.0.0.1")
        jobs += [(_sequence_parallel_job, (r, world, port, model_dir)) for r in range(world)]
    return run_spawned(jobs, timeout_s=600, what="trainer rank")


@pytest.fixture(scope="module")
def reference(results):
    return results["reference"]


@pytest.fixture(scope="module")
def two_ranks(results):
    return {k: v for k, v in results.items() if k.startswith("w2/")}


@pytest.fixture(scope="module")
def four_ranks(results):
    return {k: v for k, v in results.items() if k.startswith("w4/")}


def assert_matches(got: dict, want: dict) -> None:
    assert abs(got["loss"] - want["loss"]) <= 1e-5, (got["loss"], want["loss"])
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
    assert got["metrics"]["train/entropy"] == pytest.approx(want["metrics"]["train/entropy"], rel=1e-5)
    assert_same_weights(got["weights"], want["weights"], atol=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_sequence_parallel_group_of_two_ranks_matches_a_single_rank_step(reference, two_ranks, case):
    want = reference[case]
    for rank in (0, 1):
        assert_matches(two_ranks[f"w2/rank{rank}"][case], want)
    assert two_ranks["w2/rank0"][case]["loss"] == two_ranks["w2/rank1"][case]["loss"]
    # The group trained on the batch once: its first rank reports the tokens, the other none.
    assert two_ranks["w2/rank0"][case]["num_tokens"] == want["num_tokens"] > 0
    assert two_ranks["w2/rank1"][case]["num_tokens"] == 0
    if "train/kl" in want["metrics"]:
        assert two_ranks["w2/rank0"][case]["metrics"]["train/kl"] == pytest.approx(
            want["metrics"]["train/kl"], rel=1e-5, abs=1e-9
        )


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_data_parallel_groups_of_two_sequence_parallel_ranks_match_a_single_rank_step(
    reference, four_ranks, case
):
    want = reference[case]
    for rank in range(4):
        assert_matches(four_ranks[f"w4/rank{rank}"][case], want)
    tokens = [four_ranks[f"w4/rank{rank}"][case]["num_tokens"] for rank in range(4)]
    assert tokens[1] == tokens[3] == 0 and tokens[0] > 0 and tokens[2] > 0  # each group once
    assert tokens[0] + tokens[2] == want["num_tokens"]
    # the two groups are balanced by token count like two plain data-parallel ranks
    assert four_ranks["w4/rank0"][case]["metrics"]["train/token_imbalance"] < 1.1
    assert np.isfinite(four_ranks["w4/rank0"][case]["metrics"]["train/pad_frac"])
