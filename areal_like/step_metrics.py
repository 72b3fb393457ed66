"""The metrics of one train step, assembled from what the controller gathered (pure; no Ray).

Keys, by namespace: ``staleness/`` (per-sample lag of the batch and the gate's counters), ``train/``
(the trainer's own keys, ``TrainStats.metrics``, global over ranks, plus the batch's token count),
``rollout/`` (totals over every worker's ``WorkerHealth``, retired ones included, so totals never
drop), ``timing/`` (the step's phases) and ``perf/``. The controller adds the supervisor's keys and
the datastore's, and, for multi-turn runs, ``episode_step_metrics``: the episodes finished since
the previous step (turns and tool calls per episode, tool and environment errors, environment vs
generation time, environment vs sampled tokens).
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
        **_episode_totals(health),
        "timing/step_s": step_s,
        "timing/wait_batch_s": seconds["wait_batch"],
        "timing/train_s": seconds["train"],
        "timing/train_fetch_s": max(s.fetch_s for s in stats),
        "timing/train_prox_s": max(s.prox_s for s in stats),
        "timing/weight_sync_s": seconds["weight_sync"],
        "timing/checkpoint_s": seconds["checkpoint"],
        "perf/trained_tokens_per_s": tokens / step_s if step_s > 0 else 0.0,
    }


_EPISODE_TOTALS = {
    "rollout/episodes_total": "episodes_done",
    "rollout/episode_turns_total": "num_turns",
    "rollout/tool_calls_total": "tool_calls",
    "rollout/tool_errors_total": "tool_errors",
    "rollout/env_errors_total": "env_errors",
    "rollout/sampled_tokens_total": "sampled_tokens",
    "rollout/env_tokens_total": "env_tokens",
    "rollout/episode_generate_s_total": "generate_s",
    "rollout/env_s_total": "env_s",
}
"""Run totals of the multi-turn counters (``WorkerHealth.episode_totals``), by metric key."""


def _episode_totals(health: list[WorkerHealth]) -> dict[str, float]:
    if not any(h.episodes_done for h in health):
        return {}  # single-turn run: no episode keys at all
    totals = {}
    for key, name in _EPISODE_TOTALS.items():
        if name == "episodes_done":
            totals[key] = float(sum(h.episodes_done for h in health))
        else:
            totals[key] = float(sum(getattr(h.episode_totals, name) for h in health))
    return totals


def episode_step_metrics(current: dict[str, float], previous: dict[str, float] | None) -> dict[str, float]:
    """Per-step multi-turn metrics from two steps' run totals (``previous`` None: since the start):
    counts, and per-episode ratios when some episode finished; empty for single-turn runs."""
    if "rollout/episodes_total" not in current:
        return {}
    delta = {key: current[key] - (previous or {}).get(key, 0.0) for key in _EPISODE_TOTALS}
    metrics = {
        "rollout/episodes": delta["rollout/episodes_total"],
        "rollout/tool_calls": delta["rollout/tool_calls_total"],
        "rollout/tool_errors": delta["rollout/tool_errors_total"],
        "rollout/env_errors": delta["rollout/env_errors_total"],
        "rollout/env_s": delta["rollout/env_s_total"],
        "rollout/episode_generate_s": delta["rollout/episode_generate_s_total"],
        "rollout/sampled_tokens": delta["rollout/sampled_tokens_total"],
        "rollout/env_tokens": delta["rollout/env_tokens_total"],
    }
    episodes = delta["rollout/episodes_total"]
    if episodes > 0:  # ratios only over episodes that finished (a step may train on buffered ones)
        seconds = delta["rollout/env_s_total"] + delta["rollout/episode_generate_s_total"]
        tokens = delta["rollout/env_tokens_total"] + delta["rollout/sampled_tokens_total"]
        env_s, env_tokens = delta["rollout/env_s_total"], delta["rollout/env_tokens_total"]
        metrics.update(
            {
                "rollout/turns_per_episode": delta["rollout/episode_turns_total"] / episodes,
                "rollout/tool_calls_per_episode": delta["rollout/tool_calls_total"] / episodes,
                "rollout/env_time_fraction": env_s / seconds if seconds > 0 else 0.0,
                "rollout/env_token_fraction": env_tokens / tokens if tokens > 0 else 0.0,
            }
        )
    return metrics
