"""Token-budget micro-batches, rank balancing, and packed vs padded layouts on a real tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from areal_like.core.models import ModelBuildConfig, make_model
from trainer.algorithms import token_logprobs, token_logprobs_and_entropy
from trainer.batch import (
    ResponseLayout,
    SequenceSample,
    collate,
    collate_micro_batch,
    collate_packed,
    response_logprobs,
)
from trainer.deepspeed_engine import lr_multiplier
from trainer.packing import balanced_partition, imbalance, keep_local, plan_micro_batches

torch.set_num_threads(1)


def long_tailed_lengths(n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(x) for x in np.where(rng.random(n) < 0.85, rng.integers(5, 30, n), rng.integers(100, 400, n))]


def sample(prompt_len: int, response_len: int, rng) -> SequenceSample:
    return SequenceSample(
        rng.integers(3, 15, prompt_len),
        rng.integers(3, 15, response_len),
        -rng.random(response_len).astype(np.float32),
        np.zeros(response_len, dtype=np.int64),
    )


@pytest.mark.parametrize("algorithm", ["kk", "ffd"])
def test_balanced_partition_uses_every_sample_once_and_balances_tokens(algorithm):
    lengths = long_tailed_lengths(200)
    parts = balanced_partition(lengths, 4, algorithm)
    assert sorted(i for p in parts for i in p) == list(range(200))
    loads = [sum(lengths[i] for i in p) for p in parts]
    assert imbalance(loads) < 1.02
    # a contiguous split (what a count-based dealer does) is far worse on this mix
    contiguous = [sum(lengths[i::4]) for i in range(4)]
    assert imbalance(loads) <= imbalance(contiguous)


def test_karmarkar_karp_finds_the_even_split_greedy_misses():
    # greedy longest-first: {8, 5, 4} vs {7, 6} = 17 / 13; KK: 16 / 14
    lengths = [8, 7, 6, 5, 4]
    kk = [sum(lengths[i] for i in p) for p in balanced_partition(lengths, 2, "kk")]
    ffd = [sum(lengths[i] for i in p) for p in balanced_partition(lengths, 2, "ffd")]
    assert max(kk) < max(ffd)


@pytest.mark.parametrize("packed", [True, False])
def test_micro_batches_respect_the_token_budget(packed):
    lengths = long_tailed_lengths(300)
    budget = 1024
    plan = plan_micro_batches(lengths, budget, micro_batch_size=64, packed=packed)
    assert sorted(i for mb in plan for i in mb) == list(range(300))
    for mb in plan:
        cost = sum(lengths[i] for i in mb) if packed else len(mb) * max(lengths[i] for i in mb)
        assert cost <= budget
    if packed:  # within 25% of the lower bound
        assert len(plan) <= 1.25 * sum(lengths) / budget


def test_micro_batch_count_can_be_raised_to_match_other_ranks():
    lengths = long_tailed_lengths(40)
    for packed in (True, False):
        needed = len(plan_micro_batches(lengths, 2048, 64, packed))
        plan = plan_micro_batches(lengths, 2048, 64, packed, min_count=needed + 3)
        assert len(plan) == needed + 3
        assert sorted(i for mb in plan for i in mb) == list(range(40))
    # fewer samples than micro-batches: the rest are empty (the rank runs dummy passes)
    assert [len(mb) for mb in plan_micro_batches([5, 6], 100, 64, True, min_count=3)].count(0) == 1


def test_a_sequence_longer_than_the_budget_is_a_config_error():
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch=50"):
        plan_micro_batches([10, 60], 50, 64, packed=True)


def test_count_mode_groups_similar_lengths():
    plan = plan_micro_batches([3, 100, 4, 90, 5, 80], None, micro_batch_size=2, packed=False)
    assert plan == [[1, 3], [5, 4], [2, 0]]  # longest together, never a long one padding short ones


def test_packed_and_padded_micro_batches_give_the_same_log_probs():
    rng = np.random.default_rng(0)
    samples = [sample(p, r, rng) for p, r in [(4, 3), (6, 12), (3, 1), (5, 7), (2, 20)]]
    model, _ = make_model(ModelBuildConfig(hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1))
    model.eval()
    layout = ResponseLayout.of(samples)
    indices = list(range(len(samples)))
    results = []
    for micro in (
        collate(samples, indices),
        collate_packed(samples, indices, row_tokens=None),  # one row (the varlen layout)
        collate_packed(samples, indices, row_tokens=max(s.length for s in samples)),  # CPU rows
        collate_packed(samples, indices, row_tokens=None, width=80),  # one row padded to a fixed width
    ):
        with torch.no_grad():
            logp = token_logprobs(model(**micro.model_inputs()).logits, micro.targets)
        out = layout.zeros()
        micro.gather_into(logp, out)
        assert micro.num_loss_tokens == int(layout.mask.sum())
        results.append(out)
    assert results[1].shape == results[0].shape
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(results[2], results[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(results[3], results[0], atol=1e-5, rtol=0)
    assert collate_packed(samples, indices, row_tokens=None, width=80).input_ids.shape == (1, 80)
    packed = collate_packed(samples, indices, row_tokens=None)
    assert packed.input_ids.shape[0] == 1 and packed.num_slots == sum(s.length for s in samples)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_the_head_on_scored_positions_only_gives_the_full_head_log_probs_and_gradients(layout):
    """``response_logprobs`` computes logits only where responses sit; values and gradients must
    equal the full-head path's (a wrong column, or a lost gradient through ``index_copy``, breaks it)."""
    rng = np.random.default_rng(1)
    samples = [sample(p, r, rng) for p, r in [(9, 3), (14, 5), (6, 1), (11, 4)]]
    indices = list(range(len(samples)))
    micro = collate(samples, indices) if layout == "padded" else collate_packed(samples, indices, None)
    model, _ = make_model(ModelBuildConfig(hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1))
    model.eval()
    keep = micro.scored_positions()
    assert len(keep) < micro.targets.shape[1]  # the prompts are not scored: the point of it
    results = {}
    for name in ("full", "scored"):
        model.zero_grad()
        if name == "full":
            logp, entropy = token_logprobs_and_entropy(
                model(**micro.model_inputs()).logits, micro.targets, 0.7
            )
        else:
            logp, entropy = response_logprobs(model, micro, 0.7, with_entropy=True)
        ((logp * micro.loss_mask).sum() + 0.1 * (logp * micro.loss_mask).pow(2).sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[name] = (logp * micro.loss_mask, entropy * micro.loss_mask, grads)
    (lp_full, ent_full, g_full), (lp, ent, g) = results["full"], results["scored"]
    torch.testing.assert_close(lp, lp_full, atol=1e-6, rtol=0)
    torch.testing.assert_close(ent, ent_full, atol=1e-6, rtol=0)
    assert float(lp_full.abs().sum()) > 1.0  # something was scored
    for n in g_full:
        torch.testing.assert_close(g[n], g_full[n], atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.slow
def test_flex_attention_packs_one_row_and_keeps_sequences_apart():
    """flex_attention takes the one-row layout; its block mask (built by transformers from the
    restarting position ids) must give every sequence the log-probs it has alone. Forward only:
    flex-attention's backward runs on GPUs only; the kernel compiles on first use (~10 s)."""
    rng = np.random.default_rng(2)
    samples = [sample(p, r, rng) for p, r in [(4, 30), (6, 12), (3, 1), (5, 70)]]
    indices = list(range(len(samples)))
    total = sum(s.length for s in samples)  # 127 input positions: one row, padded to one compiled shape
    packed = collate_micro_batch(samples, indices, True, "flex_attention", 0)
    assert packed.input_ids.shape == (1, 128) and packed.num_slots == 128  # next power of two
    assert collate_micro_batch(samples, indices, True, "flex_attention", 0, budget=200).input_ids.shape == (
        1,
        200,
    )
    assert total == 127
    assert collate_micro_batch(samples, indices, True, "sdpa", 0).input_ids.shape[0] > 1
    sdpa, _ = make_model(ModelBuildConfig(hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1))
    sdpa.eval()
    flex = type(sdpa)(sdpa.config).eval()
    flex.load_state_dict(sdpa.state_dict())
    flex.set_attn_implementation("flex_attention")
    layout = ResponseLayout.of(samples)
    results = []
    for model, micro in ((sdpa, collate(samples, indices)), (flex, packed)):
        out = layout.zeros()
        with torch.no_grad():
            micro.gather_into(token_logprobs(model(**micro.model_inputs()).logits, micro.targets), out)
        results.append(out)
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=0)


def test_scatter_then_gather_round_trips_the_response_layout():
    rng = np.random.default_rng(1)
    samples = [sample(3, r, rng) for r in (2, 5, 1)]
    layout = ResponseLayout.of(samples)
    values = torch.arange(layout.mask.numel(), dtype=torch.float32).view_as(layout.mask) * layout.mask
    for micro in (collate(samples, [2, 0, 1]), collate_packed(samples, [0, 1, 2], row_tokens=8)):
        out = layout.zeros()
        micro.gather_into(micro.scatter(values), out)
        assert torch.equal(out, values)


def test_learning_rate_schedules_warm_up_then_decay_to_the_floor():
    linear = [lr_multiplier(s, 2, 6, "linear", 0.0) for s in range(6)]
    assert linear == pytest.approx([0.5, 1.0, 1.0, 2 / 3, 1 / 3, 0.0])
    assert lr_multiplier(3, 2, 6, "cosine", 0.0) == pytest.approx(0.75)
    assert lr_multiplier(5, 2, 6, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_multiplier(100, 0, 6, "constant", 0.0) == 1.0


def test_balanced_parts_go_to_the_ranks_that_already_hold_most_of_them():
    lengths = [10, 10, 10, 10]
    owners = [1, 1, 0, 0]
    parts = keep_local([[0, 1], [2, 3]], owners)
    assert parts == [[2, 3], [0, 1]]
    assert sorted(i for p in keep_local(balanced_partition(lengths, 2), owners) for i in p) == [0, 1, 2, 3]
