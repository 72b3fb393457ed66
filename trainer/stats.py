"""What a trainer rank reports for a train step: ``TrainStats`` (crosses the Ray boundary to the
controller) and ``summarize``, which turns the step's all-reduced sums and maxima into it; and the
engine/trainer log-prob mismatch guard (``fresh_mismatch``, ``check_logp_mismatch``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from trainer.config import TrainConfig

logger = logging.getLogger(__name__)


class LogpMismatchError(RuntimeError):
    """The engine's log-probs disagree with the trainer's on tokens made by the same weights."""


def fresh_mismatch(behav_logp, logp, versions, mask, version: int) -> tuple[float, float]:
    """(sum of abs(behav_logp - logp), count) over the loss tokens sampled by weights ``version``
    (fresh tokens). All inputs [B, L]; ``logp`` is the trainer's, scored with those same weights,
    so what differs is the engine alone: numerics, and any sampling setting the trainer lacks."""
    fresh = (versions == version) & (mask > 0)
    diff = (behav_logp - logp.detach()).abs()
    return float(diff[fresh].sum().item()), float(fresh.sum().item())


def check_logp_mismatch(
    cfg: TrainConfig, diff_sum: float, fresh_tokens: float, loss_tokens: float, version: int, log: bool
) -> float | None:
    """Warn and stop on the mean engine/trainer mismatch of the first minibatch's fresh tokens
    (global sums: ``loss_tokens`` counts all its loss tokens). The stop needs every token fresh
    (an eta=0 step, or the first step of any run): then nothing but the engine can explain a gap.
    Returns the mean (None without fresh tokens); ``log``: this rank logs the warning."""
    if fresh_tokens <= 0:
        return None
    mean = diff_sum / fresh_tokens
    all_fresh = fresh_tokens >= loss_tokens
    if cfg.logp_mismatch_stop is not None and all_fresh and mean > cfg.logp_mismatch_stop:
        raise LogpMismatchError(
            f"trainer: mean abs(logp_engine - logp_trainer) = {mean:.4f} over the {int(fresh_tokens)} "
            f"tokens of the first minibatch at version {version}, all sampled by the weights being "
            f"trained, exceeds train.logp_mismatch_stop={cfg.logp_mismatch_stop}; the step was not "
            "applied. The engine samples from another distribution than the trainer scores: check "
            "that rollout.temperature is what the engine applies, that the engine reports log-probs "
            "of the untruncated distribution (top_p/top_k), and that the engines loaded the latest "
            "weights. Raise train.logp_mismatch_stop, or set it to null, to train anyway."
        )
    if log and cfg.logp_mismatch_warn is not None and mean > cfg.logp_mismatch_warn:
        logger.warning(
            "version %d: mean abs(logp_engine - logp_trainer) = %.4f over %d fresh tokens of the first "
            "minibatch exceeds train.logp_mismatch_warn=%s (temperature, top_p/top_k, or stale "
            "engine weights?)",
            version, mean, int(fresh_tokens), cfg.logp_mismatch_warn,
        )  # fmt: skip
    return mean


@dataclass
class TrainStats:
    """What one rank reports for one train step. Ratios and means are global (identical on every
    rank, so the controller's mean over ranks is the global value); counts and times are local."""

    loss: float
    num_samples: int
    """Samples this rank trained on (after balancing)."""
    num_tokens: int
    """Response tokens this rank trained on."""
    clip_frac: float
    imp_weight_mean: float
    imp_weight_max: float
    capped_frac: float
    """Fraction of response tokens whose pi_prox / pi_behav left [floor, cap] (masked or clamped)."""
    behav_prox_logp_diff: float
    """mean |logp_behav - logp_prox| over response tokens: engine vs trainer mismatch."""
    grad_norm: float
    lr: float
    reward_mean: float
    """Mean raw reward of the global batch."""
    adv_abs_mean: float
    fetch_s: float
    prox_s: float
    """No-grad passes: proximal and reference log-probs, critic values, advantages."""
    update_s: float
    skipped_steps: int = 0
    """Optimizer steps skipped in this train step for a non-finite gradient norm."""
    token_imbalance: float = 1.0
    """max / mean of per-rank token counts after balancing."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Every figure above and more, slash-namespaced ('train/...', 'perf/...'), global."""


def summarize(
    cfg: TrainConfig,
    world_size: int,
    totals: dict[str, float],
    peaks: dict[str, float],
    info: dict,
    batch: dict[str, float],
    num_samples: int,
    num_tokens: int,
    times: tuple[float, float, float, float],
) -> TrainStats:
    """``totals``: the step's sums over ranks; ``peaks``: maxima over ranks (``neg_imp_min`` is the
    max of -min); ``info``: this rank's optimizer results; ``batch``: balancing and reward figures."""
    t0, t1, t2, t3 = times
    mask_tokens = max(totals["mask_tokens"], 1.0)
    counted = max(totals["tokens"], 1.0)
    mean_update_s = totals["update_s"] / world_size
    imp_min = -peaks["neg_imp_min"] if peaks["neg_imp_min"] > -float("inf") else 0.0
    m = {
        "train/loss": totals["loss"] / cfg.ppo_minibatches,
        "train/clip_frac": totals["clipped"] / counted,
        "train/dual_clip_frac": totals["dual"] / counted,
        "train/imp_weight_mean": totals["imp_sum"] / counted,
        "train/imp_weight_max": peaks["imp_max"],
        "train/imp_weight_min": imp_min,
        "train/imp_weight_capped_frac": totals["capped"] / mask_tokens,
        "train/logp_mismatch": totals["diff"] / mask_tokens,
        "train/logp_mismatch_max": peaks["diff_max"],
        "train/entropy": totals["entropy"] / mask_tokens,
        "train/grad_norm": info["grad_norm"],
        "train/lr": info["lr"],
        "train/adv_abs_mean": totals["adv_abs"] / mask_tokens,
        "train/skipped_steps": float(info["skipped"]),
        "train/skipped_steps_total": float(info["skipped_total"]),
        "train/micro_batches": peaks["micro_batches"],
        "train/pad_frac": 1.0 - totals["real_tokens"] / max(totals["slots"], 1.0),
        "train/token_imbalance": batch["imbalance_after"],
        "train/token_imbalance_before": batch["imbalance_before"],
        "train/rank_time_imbalance": peaks["update_s"] / mean_update_s if mean_update_s > 0 else 1.0,
        "train/samples_moved": batch["moved"],
        "perf/train_tokens_per_s": totals["real_tokens"] / max(peaks["update_s"], 1e-9),
    }
    if totals["fresh_tokens"] > 0:
        m["train/logp_mismatch_fresh"] = totals["fresh_diff"] / totals["fresh_tokens"]
    if cfg.policy_loss == "m2po":
        m["train/m2po_masked_frac"] = totals["m2po_masked"] / mask_tokens
    if cfg.kl.coef > 0:
        m["train/kl"] = totals["kl"] / mask_tokens
    if cfg.algo == "ppo":
        m["train/value_loss"] = totals["value_loss"] / cfg.ppo_minibatches
        m["train/value_clip_frac"] = totals["value_clipped"] / mask_tokens
        m["train/critic_grad_norm"] = info["critic_grad_norm"]
    return TrainStats(
        loss=m["train/loss"],
        num_samples=num_samples,
        num_tokens=num_tokens,
        clip_frac=m["train/clip_frac"],
        imp_weight_mean=m["train/imp_weight_mean"],
        imp_weight_max=m["train/imp_weight_max"],
        capped_frac=m["train/imp_weight_capped_frac"],
        behav_prox_logp_diff=m["train/logp_mismatch"],
        grad_norm=info["grad_norm"],
        lr=info["lr"],
        reward_mean=batch["reward_mean"],
        adv_abs_mean=m["train/adv_abs_mean"],
        fetch_s=t1 - t0,
        prox_s=t2 - t1,
        update_s=t3 - t2,
        skipped_steps=int(info["skipped"]),
        token_imbalance=batch["imbalance_after"],
        metrics=m,
    )
