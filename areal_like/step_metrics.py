"""The metrics of one train step, assembled from what the controller gathered (pure; no Ray).

Keys, by namespace: ``staleness/`` (per-sample lag of the batch and the gate's counters), ``train/``
(the trainer's own keys, ``TrainStats.metrics``, global over ranks, plus the batch's token count),
``rollout/`` (totals over every worker's ``WorkerHealth``, retired ones included, so totals never
drop), ``timing/`` (the step's phases) and ``perf/``. The controller adds the supervisor's keys and
the datastore's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from areal_like.staleness import GateState
    from rollout.worker import WorkerHealth
    from trainer.stats import TrainStats


def step_metrics(
    version: int,
    staleness: list[int],
    gate: GateState,
    stats: list[TrainStats],
    health: list[WorkerHealth],
    batch_size: int,
    seconds: dict[str, float],
) -> dict[str, float]:
    """``gate``: the dispatcher's ``GateState``; ``stats``: one ``TrainStats`` per rank; ``health``:
    ``WorkerHealth`` of every worker; ``seconds``: wait_batch, train, weight_sync, checkpoint."""
    tokens = sum(s.num_tokens for s in stats)
    step_s = sum(seconds.values())
    return {
        "version": version,
        "reward/mean": float(np.mean([s.reward_mean for s in stats])),
        "staleness/max": int(max(staleness)),
        "staleness/mean": float(np.mean(staleness)),
        "staleness/evicted_groups_total": gate.evicted_total,
        "staleness/gate_running": gate.running,
        "staleness/gate_accepted": gate.accepted,
        # Every rank reports the same global figures (loss, clipping, importance weights, gradient).
        **stats[0].metrics,
        "train/num_tokens": tokens,
        "rollout/response_len_mean": tokens / max(batch_size, 1),
        "rollout/samples_total": sum(h.samples_done for h in health),
        "rollout/reward_errors_total": sum(h.reward_errors for h in health),
        "rollout/reward_timeouts_total": sum(h.reward_timeouts for h in health),
        "rollout/idle_s_total": sum(h.idle_s for h in health),
        "rollout/groups_filtered_total": sum(h.groups_filtered for h in health),
        "rollout/groups_abandoned_total": sum(h.groups_abandoned for h in health),
        "rollout/interrupted_samples_total": sum(h.interrupted_samples for h in health),
        "rollout/reward_retries_total": sum(h.reward_retries for h in health),
        "rollout/reward_failure_rate": float(
            np.mean([h.reward_failure_rate for h in health if h.retired is None] or [0.0])
        ),
        "rollout/reward_warned_batches_total": sum(h.reward_warned_batches for h in health),
        "rollout/finish_length_total": sum(h.finish_reasons.get("length", 0) for h in health),
        "timing/step_s": step_s,
        "timing/wait_batch_s": seconds["wait_batch"],
        "timing/train_s": seconds["train"],
        "timing/train_fetch_s": max(s.fetch_s for s in stats),
        "timing/train_prox_s": max(s.prox_s for s in stats),
        "timing/weight_sync_s": seconds["weight_sync"],
        "timing/checkpoint_s": seconds["checkpoint"],
        "perf/trained_tokens_per_s": tokens / step_s if step_s > 0 else 0.0,
    }
