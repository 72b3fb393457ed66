"""Policy losses and off-policy corrections, chosen by config (``train.policy_loss`` and the
``train.behav_imp_weight_*`` knobs); formulas and papers in docs/algorithms.md.

Three policies score every response token (AReaL's decoupled view):
  pi_behav  the engine's weights that sampled it (log-prob recorded by the engine),
  pi_prox   the trainer's weights before this step's update (the trust-region anchor),
  pi_theta  the weights being trained (carries the gradient).
Each loss is  loss_t = w_t * keep_t * l_t(u_t, A_t), aggregated by the caller's token weights, where
  u = pi_theta / pi_prox  the policy ratio, which the surrogate l (``SURROGATES[policy_loss]``) shapes;
  w = pi_prox / pi_behav  the behaviour weight (``behav_weights``): engine/trainer mismatch and
                          staleness, truncated (TIS), masked (MIS) or band-masked (IcePop), per
                          token or per sequence;
  keep                    the loss mask after MIS/IcePop and, for M2PO, the second-moment mask.
Without the decoupled loss pi_prox := pi_behav, so w = 1 and u = pi_theta / pi_behav.

Shapes: every tensor is one micro-batch's layout [B, L] (padded rows or packed rows).
``segments`` [B, L] holds, for each response token, the index of its sequence within the
micro-batch (-1 elsewhere): sequence-level quantities (GSPO's ratio, sequence-level weights) sum
over it, so packed rows holding several sequences need no reshaping. A sequence never spans two
micro-batches, so these sums are exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from trainer.algorithms import PolicyLossStats
from trainer.config import TrainConfig

# exp() of a sequence's summed log-ratio overflows fp32 past ~88; weights past e^20 are outside any
# sensible bound anyway, so clamping there changes no mask or truncation decision.
MAX_SEQUENCE_LOG_WEIGHT = 20.0


@dataclass
class LossStats(PolicyLossStats):
    """``PolicyLossStats`` plus the counters of the new losses (sums over loss tokens)."""

    m2po_masked_tokens: float = 0.0
    """Tokens M2PO's second-moment mask removed."""


@dataclass
class Surrogate:
    """A surrogate's per-token loss before the behaviour weight, and which tokens it clipped."""

    loss: torch.Tensor
    """[B, L] l_t, differentiable in logp."""
    clipped: torch.Tensor
    """bool [B, L] tokens whose ratio the surrogate clipped (no gradient, or a truncated weight)."""
    dual_clipped: torch.Tensor | None = None
    """bool [B, L] PPO's dual clip (None elsewhere)."""


# ---- sequence helpers ------------------------------------------------------------------------------
def span_segments(
    shape: tuple[int, int], rows: list[int], starts: list[int], lengths: list[int], device=None
) -> torch.Tensor:
    """Segment ids [B, L] of a micro-batch's response spans (``MicroBatch.rows/starts/lengths``):
    span i holds i, every other position -1."""
    segments = torch.full(shape, -1, dtype=torch.long, device=device)
    for i, (row, start, k) in enumerate(zip(rows, starts, lengths, strict=True)):
        segments[row, start : start + k] = i
    return segments


def segment_mean(values: torch.Tensor, segments: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over each segment's masked tokens, broadcast back to its tokens [B, L]
    (0 off the segments). ``segment_sum`` is the same without dividing."""
    sums, counts, flat = _segment_totals(values, segments, mask)
    return (sums / counts.clamp(min=1.0))[flat].view_as(values) * (segments >= 0)


def segment_sum(values: torch.Tensor, segments: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    sums, _, flat = _segment_totals(values, segments, mask)
    return sums[flat].view_as(values) * (segments >= 0)


def _segment_totals(values, segments, mask):
    assert segments.shape == values.shape, (segments.shape, values.shape)
    num = int(segments.max().item()) + 1 if segments.numel() else 0
    flat = segments.reshape(-1).clamp(min=0)
    on = (segments.reshape(-1) >= 0) & (mask.reshape(-1) > 0)
    sums = torch.zeros(max(num, 1), dtype=values.dtype, device=values.device)
    # where() rather than multiplying by the mask: a NaN off the mask must not leak into a sum
    sums = sums.index_add(0, flat, torch.where(on, values.reshape(-1), torch.zeros_like(values.reshape(-1))))
    counts = torch.zeros(max(num, 1), dtype=values.dtype, device=values.device).index_add(
        0, flat, on.to(values.dtype)
    )
    return sums, counts, flat


# ---- the behaviour weight (TIS / MIS / IcePop) ---------------------------------------------------
def behav_weights(
    prox_logp: torch.Tensor,
    behav_logp: torch.Tensor,
    mask: torch.Tensor,
    cap: float | None,
    floor: float | None = None,
    mode: str = "mask",
    level: str = "token",
    segments: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w = pi_prox / pi_behav [B, L] (no gradient), bounded to [floor, cap] (None: unbounded).

    level: token (w_t), sequence (prod_t w_t of the token's sequence) or geometric (the
    geometric mean over the sequence). mode 'mask' drops tokens whose weight leaves the bounds
    (MIS; with a floor, IcePop), 'clamp' clamps the weight into them (TIS).
    Returns (weight, keep, out_of_bounds): keep is ``mask`` without the dropped tokens, and
    out_of_bounds marks the masked tokens whose weight left the bounds.
    """
    mask = mask.to(prox_logp.dtype)
    log_w = (prox_logp - behav_logp).detach()
    if level == "sequence":
        assert segments is not None, "sequence-level weights need segments"
        log_w = segment_sum(log_w, segments, mask).clamp(-MAX_SEQUENCE_LOG_WEIGHT, MAX_SEQUENCE_LOG_WEIGHT)
    elif level == "geometric":
        assert segments is not None, "geometric-mean weights need segments"
        log_w = segment_mean(log_w, segments, mask)
    elif level != "token":
        raise ValueError(f"unknown importance-weight level {level!r}; use token, sequence or geometric")
    weight = torch.exp(log_w)
    out = torch.zeros_like(mask, dtype=torch.bool)
    if cap is not None:
        out |= weight > cap
    if floor is not None:
        out |= weight < floor
    out &= mask > 0
    if mode == "mask":
        keep = mask * (~out).to(mask.dtype)
    elif mode == "clamp":
        weight = weight.clamp(min=floor, max=cap) if (cap, floor) != (None, None) else weight
        keep = mask
    else:
        raise ValueError(f"unknown importance-weight mode {mode!r}; use 'mask' or 'clamp'")
    return weight, keep, out


def m2po_keep(log_ratio: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """M2PO's second-moment mask [B, L]: drop the tokens with the largest log_ratio^2, fewest first,
    until the mean log_ratio^2 of the tokens kept is at most ``threshold`` (all are dropped when
    even the smallest exceeds it). ``log_ratio`` = log(pi_theta / pi_behav), detached."""
    mask = mask.to(log_ratio.dtype)
    on = mask.reshape(-1) > 0
    m2 = (log_ratio.detach() ** 2).reshape(-1)[on]
    keep_on = torch.ones_like(m2, dtype=torch.bool)
    if m2.numel():
        order = torch.argsort(m2, descending=True)
        ranked = m2[order]
        # mean of ranked[k:] for every k: the tokens kept after dropping the k largest
        suffix_mean = ranked.flip(0).cumsum(0).flip(0) / torch.arange(len(ranked), 0, -1, dtype=m2.dtype)
        fits = torch.nonzero(suffix_mean <= threshold)
        num_dropped = int(fits[0].item()) if len(fits) else len(ranked)
        keep_on[order[:num_dropped]] = False
    keep = torch.zeros_like(on)
    keep[on] = keep_on
    return keep.view_as(mask).to(mask.dtype) * mask


# ---- surrogates, keyed by train.policy_loss ------------------------------------------------------
def ppo_surrogate(logp, prox_logp, adv, mask, segments, cfg: TrainConfig) -> Surrogate:
    """max(-A u, -A clip(u, 1 - eps, 1 + eps_high)); dual clip caps A < 0 at dual_clip * abs(A)."""
    eps_high = cfg.eps_clip if cfg.eps_clip_high is None else cfg.eps_clip_high
    ratio = torch.exp(logp - prox_logp)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - cfg.eps_clip, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    dual = torch.zeros_like(mask, dtype=torch.bool)
    if cfg.dual_clip is not None:
        bound = cfg.dual_clip * adv.abs()
        dual = (adv < 0) & (loss > bound)
        loss = torch.where(dual, bound, loss)
    return Surrogate(loss, clipped > unclipped, dual)


def cispo_surrogate(logp, prox_logp, adv, mask, segments, cfg: TrainConfig) -> Surrogate:
    """-sg(clip(u, 1 - eps_low, 1 + eps_high)) A log pi_theta: every token keeps its gradient, the
    clipped ratio only weights it. Written as -sg(r) A exp(logp - sg(logp)), which has the paper's
    gradient and the value -r A (comparable with the other losses' values)."""
    ratio = torch.exp(logp - prox_logp).detach()
    low = 0.0 if cfg.cispo_eps_low is None else 1.0 - cfg.cispo_eps_low
    truncated = ratio.clamp(min=low, max=1.0 + cfg.cispo_eps_high)
    loss = -truncated * adv * torch.exp(logp - logp.detach())
    return Surrogate(loss, truncated != ratio)


def gspo_surrogate(logp, prox_logp, adv, mask, segments, cfg: TrainConfig) -> Surrogate:
    """GSPO-token: s_i = exp(mean_t log u_t) over the sequence, s_it = sg(s_i) pi_theta / sg(pi_theta);
    loss max(-A s_it, -A clip(s_it, 1 - eps, 1 + eps_high)). Its gradient is GSPO's when A is
    constant over the sequence (GRPO); the paper averages per sequence (loss_agg
    seq_mean_token_mean)."""
    assert segments is not None, "GSPO needs the sequence segments"
    seq_log_ratio = segment_mean((logp - prox_logp).detach(), segments, mask)
    ratio = torch.exp(seq_log_ratio + logp - logp.detach())
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - cfg.gspo_eps_clip, 1.0 + cfg.gspo_eps_clip_high)
    return Surrogate(torch.maximum(unclipped, clipped), clipped > unclipped)


def sapo_surrogate(logp, prox_logp, adv, mask, segments, cfg: TrainConfig) -> Surrogate:
    """-(4 / tau) sigmoid(tau (u - 1)) A, tau = tau_pos for A > 0 else tau_neg: a soft trust region
    whose gradient weight 4 sigma (1 - sigma) u is 1 at u = 1 and fades smoothly away from it."""
    tau = torch.where(adv > 0, cfg.sapo_tau_pos, cfg.sapo_tau_neg).to(logp.dtype)
    ratio = torch.exp(logp - prox_logp)
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    return Surrogate(-gate * adv, torch.zeros_like(mask, dtype=torch.bool))


def unclipped_surrogate(logp, prox_logp, adv, mask, segments, cfg: TrainConfig) -> Surrogate:
    """-A u: M2PO's objective, whose trust region is the second-moment mask instead of a clip."""
    return Surrogate(-adv * torch.exp(logp - prox_logp), torch.zeros_like(mask, dtype=torch.bool))


SurrogateFn = Callable[..., Surrogate]
SURROGATES: dict[str, SurrogateFn] = {
    "ppo": ppo_surrogate,
    "cispo": cispo_surrogate,
    "gspo": gspo_surrogate,
    "sapo": sapo_surrogate,
    "m2po": unclipped_surrogate,
}


def needs_segments(cfg: TrainConfig) -> bool:
    return cfg.policy_loss == "gspo" or (cfg.use_decoupled_loss and cfg.behav_imp_weight_level != "token")


# ---- the loss ------------------------------------------------------------------------------------
def policy_loss(
    cfg: TrainConfig,
    logp: torch.Tensor,
    prox_logp: torch.Tensor,
    behav_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LossStats]:
    """The configured policy loss of one micro-batch, to minimise, and its statistics.

    logp [B, L] (requires grad), prox_logp / behav_logp / mask [B, L], advantages [B, L] or [B].
    Aggregation: sum_t token_weights_t * loss_t (``loss_token_weights`` normalises them over the
    global minibatch); None means the mean over this mask. Tokens the corrections mask stay in
    the denominator, so masking never inflates the other tokens' weight.
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)
    mask = mask.to(logp.dtype)
    if token_weights is None:
        token_weights = mask / mask.sum().clamp(min=1.0)
    if not cfg.use_decoupled_loss:
        prox_logp = behav_logp
    prox_logp = prox_logp.detach()

    if cfg.use_decoupled_loss:
        level = cfg.behav_imp_weight_level
        weight, keep, out = behav_weights(
            prox_logp, behav_logp, mask, cfg.behav_imp_weight_cap, cfg.behav_imp_weight_floor,
            cfg.behav_imp_weight_mode, level, segments,
        )  # fmt: skip
    else:  # pi_prox = pi_behav: the weight is 1 and never leaves a bound above 1
        weight, keep, out = torch.ones_like(mask), mask, torch.zeros_like(mask, dtype=torch.bool)
    surrogate = SURROGATES[cfg.policy_loss](logp, prox_logp, advantages, mask, segments, cfg)
    m2po_dropped = torch.zeros_like(mask)
    if cfg.policy_loss == "m2po":
        kept = m2po_keep(logp.detach() - behav_logp, keep, cfg.m2po_threshold)
        m2po_dropped = keep - kept
        keep = kept
    loss = (weight * surrogate.loss * keep * token_weights).sum()

    with torch.no_grad():
        counted = keep > 0
        any_counted = bool(counted.any())
        diff = (prox_logp - behav_logp).abs()
        on = mask > 0
        dual = surrogate.dual_clipped
        stats = LossStats(
            num_tokens=float(counted.sum().item()),
            clipped_tokens=float((surrogate.clipped & counted).sum().item()),
            imp_weight_sum=float((weight * keep).sum().item()),
            imp_weight_max=float(weight[counted].max().item()) if any_counted else 0.0,
            imp_weight_min=float(weight[counted].min().item()) if any_counted else 0.0,
            capped_tokens=float(out.sum().item()),
            dual_clipped_tokens=float((dual & counted).sum().item()) if dual is not None else 0.0,
            behav_prox_abs_diff_sum=float((diff * mask).sum().item()),
            behav_prox_abs_diff_max=float(diff[on].max().item()) if bool(on.any()) else 0.0,
            m2po_masked_tokens=float(m2po_dropped.sum().item()),
        )
    return loss, stats
