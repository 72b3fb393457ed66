"""Advantage estimators and policy losses (pure tensor functions, no framework state).

Shapes: N = sequences, T = padded tokens per sequence. ``mask`` marks response tokens that count
in the loss. Log-probs are per token, aligned with the token they score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, std_norm: bool = True, eps: float = 1e-6):
    """Group-relative advantages: reward minus its group's mean, optionally over the group's std.

    rewards [N], group_ids [N] (any integer ids; samples of one prompt share an id) -> [N].
    The std is the unbiased sample std; a group with equal rewards gets zero advantage.
    """
    advantages = torch.zeros_like(rewards, dtype=torch.float32)
    for gid in torch.unique(group_ids):
        members = group_ids == gid
        group = rewards[members].float()
        centred = group - group.mean()
        if std_norm and group.numel() > 1:
            centred = centred / (group.std(unbiased=True) + eps)
        advantages[members] = centred
    return advantages


@dataclass
class PolicyLossStats:
    """Per-batch statistics of the policy loss, summed over loss tokens (divide by num_tokens)."""

    num_tokens: float
    clipped_tokens: float
    imp_weight_sum: float
    imp_weight_max: float
    capped_tokens: float
    behav_prox_abs_diff_sum: float
    """sum |logp_behav - logp_prox|: the engine/trainer log-prob mismatch."""


def decoupled_ppo_loss(
    logp: torch.Tensor,
    prox_logp: torch.Tensor,
    behav_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_clip: float,
    eps_clip_high: float | None = None,
    behav_imp_weight_cap: float | None = None,
    use_decoupled_loss: bool = True,
    loss_denominator: float | None = None,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """AReaL's decoupled PPO objective (Eq. 5), token-level, as a loss to minimise.

    per token: u = pi_theta / pi_prox, w = pi_prox / pi_behav,
               loss_t = w * max(-A u, -A clip(u, 1 - eps, 1 + eps_high))
    With ``use_decoupled_loss=False`` it is standard PPO: pi_prox := pi_behav and w = 1.
    Tokens with w > behav_imp_weight_cap are masked out (None keeps every token at full weight).
    The sum over loss tokens is divided by ``loss_denominator`` (the token count of the whole
    global batch, so micro-batches and ranks add up to a token mean); default: this mask's count.

    logp [N, T] (requires grad), prox_logp/behav_logp/mask [N, T], advantages [N, T] or [N].
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)
    mask = mask.to(logp.dtype)
    if not use_decoupled_loss:
        prox_logp = behav_logp
    eps_high = eps_clip if eps_clip_high is None else eps_clip_high

    ratio = torch.exp(logp - prox_logp.detach())
    clipped_ratio = torch.clamp(ratio, 1.0 - eps_clip, 1.0 + eps_high)
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * clipped_ratio
    pg_loss = torch.maximum(pg_unclipped, pg_clipped)

    imp_weight = torch.exp(prox_logp - behav_logp).detach()
    if not use_decoupled_loss:
        imp_weight = torch.ones_like(imp_weight)
    capped = torch.zeros_like(mask)
    if behav_imp_weight_cap is not None:
        capped = (imp_weight > behav_imp_weight_cap).to(mask.dtype) * mask
        mask = mask * (1.0 - capped)
    token_loss = imp_weight * pg_loss * mask

    denominator = (
        float(mask.sum().item() + capped.sum().item()) if loss_denominator is None else loss_denominator
    )
    loss = token_loss.sum() / max(denominator, 1.0)

    with torch.no_grad():
        counted = mask > 0
        stats = PolicyLossStats(
            num_tokens=float(counted.sum().item()),
            clipped_tokens=float(((pg_clipped > pg_unclipped) & counted).sum().item()),
            imp_weight_sum=float((imp_weight * mask).sum().item()),
            imp_weight_max=float(imp_weight[counted].max().item()) if counted.any() else 0.0,
            capped_tokens=float(capped.sum().item()),
            behav_prox_abs_diff_sum=float(((prox_logp - behav_logp).abs() * mask).sum().item()),
        )
    return loss, stats


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-prob of each next token: logits [N, T, V] predict tokens [N, T] (already shifted).

    Divides by the sampling temperature so the trainer scores tokens under the same distribution
    the engine sampled from (temperature 0 means greedy and is scored at temperature 1).
    """
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return torch.gather(logprobs, -1, tokens.unsqueeze(-1)).squeeze(-1)
