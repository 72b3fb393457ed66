"""From rewards to per-token advantages, as the trainer config asks (glue over ``algorithms``).

Order (AReaL's): overlong penalty, bias, scale, clip, optional batch normalisation, GRPO's group
normalisation (algo grpo); then per token: the sequence score on the last response token, minus
``kl.coef`` x KL on every token when the KL is placed in the reward, then GAE with the critic's
values (algo ppo) or with zero values (grpo: the reward-to-go, discounted by ``gamma`` only when
there are KL rewards), then optional batch normalisation.
Everything here works on the response layout [N, R] of one rank, or on the global batch's scalars.
"""

from __future__ import annotations

import torch

from trainer.algorithms import batch_normalize, gae_advantages, grpo_advantages, overlong_penalty
from trainer.config import TrainConfig


def sequence_scores(
    rewards: torch.Tensor,
    response_lengths: torch.Tensor,
    group_ids: torch.Tensor,
    cfg: TrainConfig,
    max_new_tokens: int | None,
) -> torch.Tensor:
    """Shaped and normalised scalar score of every sample of the global batch. All [N] -> [N]."""
    rc = cfg.reward
    scores = rewards.float()
    if rc.overlong_tokens > 0:
        assert max_new_tokens is not None, "overlong penalty needs max_new_tokens"
        scores = scores + overlong_penalty(
            response_lengths, max_new_tokens, rc.overlong_tokens, rc.overlong_penalty_factor
        )
    scores = (scores + rc.bias) * rc.scale
    if rc.clip is not None:
        scores = scores.clamp(-rc.clip, rc.clip)
    if rc.normalize:
        scores = batch_normalize(scores)
    if cfg.algo == "grpo":
        scores = grpo_advantages(
            scores, group_ids, std_norm=cfg.adv_std_norm, leave_one_out=cfg.adv_leave_one_out
        )
    return scores


def token_advantages(
    scores: torch.Tensor,
    mask: torch.Tensor,
    cfg: TrainConfig,
    kl: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (advantages, returns) [N, R] for this rank's samples.

    scores [N]; mask [N, R]; kl [N, R] the per-token KL estimate (only when placed in the reward);
    values [N, R] the critic's old values (algo ppo). Batch normalisation of advantages is the
    caller's (it needs the global statistics).
    """
    lengths = mask.sum(dim=1).long()
    token_rewards = torch.zeros_like(mask)
    rows = torch.arange(mask.shape[0])
    has_response = lengths > 0
    token_rewards[rows[has_response], lengths[has_response] - 1] = scores[has_response].float()
    if kl is not None:
        token_rewards = token_rewards - cfg.kl.coef * kl * mask
    if values is None:
        # GRPO: no critic; with zero values GAE is the discounted reward-to-go for any lambda. As
        # train.gamma says, it discounts only when KL rewards make the rewards per token; the
        # sequence score alone reaches every token of its response undiscounted.
        gamma = cfg.gamma if kl is not None else 1.0
        return gae_advantages(token_rewards, torch.zeros_like(mask), mask, gamma, 1.0)
    return gae_advantages(token_rewards, values, mask, cfg.gamma, cfg.gae_lambda)


def normalize_with(advantages: torch.Tensor, mask: torch.Tensor, mean: float, std: float, eps: float = 1e-6):
    """(A - mean) / std on the response tokens, with statistics gathered over all ranks."""
    return (advantages - mean) / (std + eps) * mask


__all__ = ["batch_normalize", "normalize_with", "sequence_scores", "token_advantages"]
