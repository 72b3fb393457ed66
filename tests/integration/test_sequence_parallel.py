"""Ulysses sequence parallelism (trainer/sequence_parallel.py) over 2 gloo ranks against the
non-parallel step: the same loss and, summed over the group, the same gradients within 1e-5, on
packed and padded micro-batches, for GQA with more and fewer KV heads than ranks. The loss is
GSPO's, whose sequence ratio spans both ranks' shards. With ``keep`` (the trainer's path: the output
head only at the scored columns) the log-probs and gradients equal ``response_logprobs``', also on
a one-token micro-batch whose second shard has no scored column. (The padding of a padded
micro-batch is scored differently: the Ulysses attention takes no attention mask, so a pad token
attends to the pads before it; no loss reads a pad position.)"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

from areal_like.core.net import free_port
from tests.spawned import run_spawned
from trainer.batch import SequenceSample, collate, collate_packed, dummy_micro_batch, response_logprobs
from trainer.config import TrainConfig

pytestmark = pytest.mark.slow

SHAPES = {
    "kv_heads_1": (2, 1),
    "kv_heads_2": (4, 2),
}  # (heads, KV heads): fewer and as many KV heads as ranks


def samples(seed=0, vocab=20):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(5):
        p, r = int(rng.integers(2, 6)), int(rng.integers(2, 9))
        out.append(
            SequenceSample(
                rng.integers(3, vocab, p).astype(np.int64),
                rng.integers(3, vocab, r).astype(np.int64),
                np.zeros(r, dtype=np.float32),
                np.zeros(r, dtype=np.int64),
            )
        )
    return out


def loss_of(logp, micro, base, seed=1):
    """GSPO with a behaviour weight, on the micro-batch layout [B, L]; the proximal and behaviour
    log-probs are fixed offsets from ``base`` (the reference's log-probs), so the loss's value
    depends on ``logp`` too."""
    from trainer.policy_losses import policy_loss, span_segments

    g = torch.Generator().manual_seed(seed)
    mask = micro.loss_mask
    behav = base - 0.1 * torch.rand(mask.shape, generator=g)
    prox = base + 0.01 * torch.randn(mask.shape, generator=g)
    adv = torch.randn(mask.shape, generator=g)
    segments = span_segments(mask.shape, micro.rows, micro.starts, micro.lengths)
    cfg = TrainConfig(policy_loss="gspo", gspo_eps_clip=0.2, gspo_eps_clip_high=0.2)
    loss, _ = policy_loss(cfg, logp, prox, behav, adv * mask, mask, None, segments)
    return loss


def _job(rank, port, model_dirs, out):
    from transformers import AutoModelForCausalLM

    from trainer.algorithms import token_logprobs
    from trainer.sequence_parallel import sequence_parallel_logprobs, use_ulysses

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    batch = samples()
    layouts = {
        "packed": collate_packed(batch, list(range(5)), row_tokens=None),  # one row, 5 sequences
        "packed_rows": collate_packed(batch, list(range(5)), row_tokens=14),
        "padded": collate(batch, list(range(5))),
    }
    results = {}
    for shape, model_dir in model_dirs.items():
        load = dict(local_files_only=True, attn_implementation="sdpa", dtype=torch.float32)
        for name, micro in layouts.items():
            reference = AutoModelForCausalLM.from_pretrained(model_dir, **load)
            ref_logp = token_logprobs(reference(**micro.model_inputs()).logits, micro.targets)
            ref_loss = loss_of(ref_logp, micro, ref_logp.detach())
            ref_loss.backward()
            model = AutoModelForCausalLM.from_pretrained(model_dir, **load)
            use_ulysses(model, dist.group.WORLD)
            logp, _ = sequence_parallel_logprobs(
                model, micro.input_ids, micro.position_ids, micro.targets, dist.group.WORLD
            )
            loss = loss_of(logp, micro, ref_logp.detach())
            loss.backward()
            worst = 0.0
            for (_, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
                grad = p.grad.clone()
                dist.all_reduce(grad)  # each rank holds its shard's share of the gradient
                worst = max(worst, float((grad - q.grad).abs().max()))
            results[f"{shape}/{name}"] = dict(
                loss=float(loss), ref=float(ref_loss), grad_diff=worst, length=micro.input_ids.shape[1]
            )
        layouts_keep = dict(layouts, dummy=dummy_micro_batch())
        for name, micro in layouts_keep.items():
            results[f"keep/{shape}/{name}"] = _compare_keep(model_dir, micro, load)
    out.put((rank, results))
    dist.destroy_process_group()


def _compare_keep(model_dir, micro, load) -> dict:
    """``sequence_parallel_logprobs(keep=...)`` against ``response_logprobs`` on a weighted mean of
    the log-probs on the response spans (the dummy micro-batch has none: its one token)."""
    from transformers import AutoModelForCausalLM

    from trainer.sequence_parallel import sequence_parallel_logprobs, use_ulysses

    span = micro.loss_mask if micro.sample_index else torch.ones_like(micro.loss_mask)
    weights = (torch.rand(span.shape, generator=torch.Generator().manual_seed(2)) + 0.5) * span / span.sum()
    reference = AutoModelForCausalLM.from_pretrained(model_dir, **load)
    ref_logp, ref_entropy = response_logprobs(reference, micro, 0.7, with_entropy=True)
    ref_loss = (ref_logp * weights).sum()
    ref_loss.backward()
    model = AutoModelForCausalLM.from_pretrained(model_dir, **load)
    use_ulysses(model, dist.group.WORLD)
    keep = micro.scored_positions()
    logp, entropy = sequence_parallel_logprobs(
        model, micro.input_ids, micro.position_ids, micro.targets, dist.group.WORLD, 0.7, True, keep=keep
    )
    loss = (logp * weights).sum()
    loss.backward()
    worst, missing = 0.0, 0
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        missing += p.grad is None
        grad = torch.zeros_like(p) if p.grad is None else p.grad.clone()
        dist.all_reduce(grad)
        worst = max(worst, float((grad - q.grad).abs().max()))
    return dict(
        loss=float(loss),
        ref=float(ref_loss),
        grad_diff=worst,
        logp_diff=float(((logp - ref_logp) * span).abs().max()),
        entropy_diff=float(((entropy - ref_entropy) * span).abs().max()),
        missing_grads=missing,
        num_kept=len(keep),
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from areal_like.core.models import ModelBuildConfig, build_model

    tmp = tmp_path_factory.mktemp("sp")
    model_dirs = {
        name: build_model(
            ModelBuildConfig(hidden_size=32, intermediate_size=64, num_heads=h, num_kv_heads=k),
            str(tmp / name),
        )
        for name, (h, k) in SHAPES.items()
    }
    port = free_port("127.0.0.1")
    jobs = [(_job, (r, port, model_dirs)) for r in range(2)]
    return run_spawned(jobs, timeout_s=300, what="sequence-parallel rank")


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("layout", ["packed", "packed_rows", "padded"])
def test_two_sequence_parallel_ranks_match_the_single_rank_step(results, shape, layout):
    key = f"{shape}/{layout}"
    for rank in (0, 1):
        r = results[rank][key]
        assert abs(r["loss"] - r["ref"]) <= 1e-5, (rank, r)
        assert r["grad_diff"] <= 1e-5, (rank, r)
    assert results[0][key]["loss"] == results[1][key]["loss"]  # both ranks hold the whole loss


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("layout", ["packed", "packed_rows", "padded", "dummy"])
def test_the_output_head_at_scored_columns_only_matches_response_logprobs(results, shape, layout):
    for rank in (0, 1):
        r = results[rank][f"keep/{shape}/{layout}"]
        assert abs(r["loss"] - r["ref"]) <= 1e-5, (rank, r)
        assert r["logp_diff"] <= 1e-5 and r["entropy_diff"] <= 1e-5, (rank, r)
        assert r["grad_diff"] <= 1e-5, (rank, r)
        assert r["missing_grads"] == 0, (rank, r)  # a shard without scored columns still backprops
