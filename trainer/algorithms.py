"""Advantage estimators, reward shaping and losses (pure tensor functions, no framework state).

Shapes: N = sequences, T = tokens per sequence (padded). ``mask`` marks response tokens that count
in the loss. Log-probs are per token, aligned with the token they score. The trainer calls these on
a response-only layout ([N, R_max], one row per sample) for advantages and on micro-batch layouts
for losses; none of them knows which.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")


# ---- rewards and advantages ------------------------------------------------------------------------
def grpo_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    std_norm: bool = True,
    leave_one_out: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Group-relative advantages: reward minus a group baseline, optionally over the group's std.

    rewards [N], group_ids [N] (samples of one prompt share an id) -> [N].
    Baseline: the group mean, or with ``leave_one_out`` the mean of the *other* members (RLOO;
    equals the group-mean advantage times n / (n - 1)). The std is the unbiased sample std of the
    group's rewards; a group with equal rewards gets zero advantage.
    """
    advantages = torch.zeros_like(rewards, dtype=torch.float32)
    for gid in torch.unique(group_ids):
        members = group_ids == gid
        group = rewards[members].float()
        n = group.numel()
        centred = group - group.mean()
        if leave_one_out and n > 1:
            centred = centred * n / (n - 1)
        if std_norm and n > 1:
            centred = centred / (group.std(unbiased=True) + eps)
        advantages[members] = centred
    return advantages


def batch_normalize(values: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-6):
    """(x - mean) / std over the masked entries (all entries when mask is None); others become 0."""
    if mask is None:
        mask = torch.ones_like(values)
    mask = mask.to(values.dtype)
    count = mask.sum().clamp(min=1.0)
    mean = (values * mask).sum() / count
    var = (((values - mean) ** 2) * mask).sum() / (count - 1).clamp(min=1.0)
    return (values - mean) / (var.sqrt() + eps) * mask


def overlong_penalty(response_lengths: torch.Tensor, max_tokens: int, overlong_tokens: int, factor: float):
    """DAPO's soft overlong penalty, added to the reward: 0 up to ``max_tokens - overlong_tokens``,
    then falling linearly to ``-factor`` at ``max_tokens``. response_lengths [N] -> [N]."""
    if overlong_tokens <= 0:
        return torch.zeros_like(response_lengths, dtype=torch.float32)
    free = max_tokens - overlong_tokens
    over = (response_lengths.float() - free).clamp(min=0.0)
    return -factor * torch.clamp(over / overlong_tokens, max=1.0)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1/k2/k3).

    With d = logp - ref_logp: k1 = d (unbiased, can be negative), k2 = d^2 / 2,
    k3 = exp(-d) - 1 + d (unbiased, always >= 0). Gradients flow through ``logp``.
    """
    d = logp - ref_logp
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.exp(-d) - 1.0 + d
    raise ValueError(f"unknown KL estimator {estimator!r}; use one of {KL_ESTIMATORS}")


def gae_advantages(
    token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's contiguous run of masked tokens.

    token_rewards, values, mask [N, T] -> (advantages [N, T], returns [N, T]), both zero off-mask.
    delta_t = r_t + gamma * V_{t+1} - V_t (V after the last response token is 0: the episode ends),
    A_t = delta_t + gamma * lam * A_{t+1}; returns = A + V (the critic's regression target).
    With values = 0 and gamma = lam = 1, A_t is the plain reward-to-go.
    """
    mask = mask.to(values.dtype)
    num_rows, num_tokens = values.shape
    advantages = torch.zeros_like(values)
    last = torch.zeros(num_rows, dtype=values.dtype, device=values.device)
    for t in reversed(range(num_tokens)):
        next_mask = mask[:, t + 1] if t + 1 < num_tokens else torch.zeros_like(last)
        next_value = values[:, t + 1] * next_mask if t + 1 < num_tokens else torch.zeros_like(last)
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * next_mask * last
        advantages[:, t] = last * mask[:, t]
    return advantages, (advantages + values) * mask


def loglinear_prox_logp(
    behav_logp: torch.Tensor, logp: torch.Tensor, versions: torch.Tensor, prox_version: int
) -> torch.Tensor:
    """AReaL's log-linear approximation of log pi_prox, used instead of a recompute forward pass.

    log pi_prox ~= log pi_behav + alpha (log pi_theta - log pi_behav), alpha = (v_prox - v_behav) /
    (v_theta - v_behav), with v_prox the version of the pre-update weights and v_theta = v_prox + 1
    the version being trained. A fresh token (v_behav = v_prox) keeps its behaviour log-prob
    (alpha = 0); older tokens move toward the current policy. Non-generated tokens (version < 0)
    get alpha = 0. All inputs [N, T]; the result carries no gradient.
    """
    v_behav = versions.to(torch.float32)
    gap = float(prox_version) - v_behav
    alpha = torch.where((versions >= 0) & (gap > 0), gap / (gap + 1.0).clamp(min=1.0), torch.zeros_like(gap))
    return (behav_logp + alpha * (logp.detach() - behav_logp)).detach()


# ---- losses ----------------------------------------------------------------------------------------
def loss_token_weights(
    mask: torch.Tensor,
    aggregation: str,
    global_tokens: float,
    global_sequences: float,
    norm_tokens: int | None = None,
) -> torch.Tensor:
    """Per-token weights w such that loss = sum_t w_t l_t aggregates over the *global* minibatch.

    mask [N, T] (one row per sequence) -> [N, T]. ``global_tokens`` / ``global_sequences`` are the
    totals over all ranks and micro-batches of the minibatch, so micro-batches and ranks add up to
    one aggregate, never a mean of per-micro-batch means.
      token_mean:          1 / global_tokens                    (DAPO / AReaL default)
      seq_mean_token_mean: 1 / (len_i * global_sequences)       (original GRPO)
      seq_mean_token_sum:  1 / (norm_tokens * global_sequences) (Dr.GRPO: no length normalisation)
    """
    mask = mask.float()
    if aggregation == "token_mean":
        return mask / max(global_tokens, 1.0)
    if aggregation == "seq_mean_token_mean":
        lengths = mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        return mask / lengths / max(global_sequences, 1.0)
    if aggregation == "seq_mean_token_sum":
        assert norm_tokens, "seq_mean_token_sum needs norm_tokens"
        return mask / (float(norm_tokens) * max(global_sequences, 1.0))
    raise ValueError(f"unknown loss aggregation {aggregation!r}; use one of {LOSS_AGGREGATIONS}")


@dataclass
class PolicyLossStats:
    """Per-batch statistics of the policy loss, summed over loss tokens (divide by num_tokens)."""

    num_tokens: float
    """Tokens that count in the loss (after the importance-weight mask)."""
    clipped_tokens: float
    imp_weight_sum: float
    imp_weight_max: float
    imp_weight_min: float
    capped_tokens: float
    """Tokens whose pi_prox / pi_behav exceeded the cap (masked or clamped)."""
    dual_clipped_tokens: float
    behav_prox_abs_diff_sum: float
    """sum |logp_behav - logp_prox|: the engine/trainer log-prob mismatch."""
    behav_prox_abs_diff_max: float


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
    imp_weight_cap_mode: str = "mask",
    dual_clip: float | None = None,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """AReaL's decoupled PPO objective (Eq. 5), token-level, as a loss to minimise.

    per token: u = pi_theta / pi_prox, w = pi_prox / pi_behav,
               loss_t = w * max(-A u, -A clip(u, 1 - eps, 1 + eps_high))
    With ``dual_clip`` = c > 1, tokens with A < 0 are further capped at c |A| (dual-clip PPO).
    With ``use_decoupled_loss=False`` it is standard PPO: pi_prox := pi_behav and w = 1.
    ``behav_imp_weight_cap``: tokens with w > cap are masked out (``imp_weight_cap_mode='mask'``,
    AReaL's rejection sampling) or get w = cap ('clamp', truncated IS); None applies the full
    weight to every token, the paper's objective.
    Aggregation: ``token_weights`` [N, T] (from ``loss_token_weights``) when given; else the sum
    over loss tokens divided by ``loss_denominator`` (default: this mask's count). Masked tokens
    stay in the denominator, so masking never inflates the other tokens' weight.

    logp [N, T] (requires grad), prox_logp/behav_logp/mask [N, T], advantages [N, T] or [N].
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)
    mask = mask.to(logp.dtype)
    if not use_decoupled_loss:
        prox_logp = behav_logp
    prox_logp = prox_logp.detach()
    eps_high = eps_clip if eps_clip_high is None else eps_clip_high

    ratio = torch.exp(logp - prox_logp)
    clipped_ratio = torch.clamp(ratio, 1.0 - eps_clip, 1.0 + eps_high)
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * clipped_ratio
    pg_loss = torch.maximum(pg_unclipped, pg_clipped)
    dual_clipped = torch.zeros_like(mask, dtype=torch.bool)
    if dual_clip is not None:
        bound = dual_clip * advantages.abs()
        dual_clipped = (advantages < 0) & (pg_loss > bound)
        pg_loss = torch.where(dual_clipped, bound, pg_loss)

    imp_weight = torch.exp(prox_logp - behav_logp).detach()
    if not use_decoupled_loss:
        imp_weight = torch.ones_like(imp_weight)
    capped = torch.zeros_like(mask)
    if behav_imp_weight_cap is not None:
        capped = (imp_weight > behav_imp_weight_cap).to(mask.dtype) * mask
        if imp_weight_cap_mode == "mask":
            mask_after = mask * (1.0 - capped)
        elif imp_weight_cap_mode == "clamp":
            imp_weight = imp_weight.clamp(max=behav_imp_weight_cap)
            mask_after = mask
        else:
            raise ValueError(f"unknown imp_weight_cap_mode {imp_weight_cap_mode!r}; use 'mask' or 'clamp'")
    else:
        mask_after = mask
    token_loss = imp_weight * pg_loss * mask_after

    if token_weights is not None:
        loss = (token_loss * token_weights).sum()
    else:
        denominator = float(mask.sum().item()) if loss_denominator is None else loss_denominator
        loss = token_loss.sum() / max(denominator, 1.0)

    with torch.no_grad():
        counted = mask_after > 0
        diff = (prox_logp - behav_logp).abs()
        any_counted = bool(counted.any())
        stats = PolicyLossStats(
            num_tokens=float(counted.sum().item()),
            clipped_tokens=float(((pg_clipped > pg_unclipped) & counted).sum().item()),
            imp_weight_sum=float((imp_weight * mask_after).sum().item()),
            imp_weight_max=float(imp_weight[counted].max().item()) if any_counted else 0.0,
            imp_weight_min=float(imp_weight[counted].min().item()) if any_counted else 0.0,
            capped_tokens=float(capped.sum().item()),
            dual_clipped_tokens=float((dual_clipped & counted).sum().item()),
            behav_prox_abs_diff_sum=float((diff * mask).sum().item()),
            behav_prox_abs_diff_max=float(diff[mask > 0].max().item()) if bool((mask > 0).any()) else 0.0,
        )
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    token_weights: torch.Tensor,
    value_clip: float | None,
) -> tuple[torch.Tensor, float]:
    """PPO critic loss: 0.5 max((V - R)^2, (clip(V, V_old +- c) - R)^2), aggregated by
    ``token_weights`` [N, T] (zero off the response). Returns (loss, clipped token count)."""
    err = (values - returns) ** 2
    if value_clip is None:
        return 0.5 * (err * token_weights).sum(), 0.0
    clipped_values = old_values + (values - old_values).clamp(-value_clip, value_clip)
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * (torch.maximum(err, err_clipped) * token_weights).sum()
    num_clipped = float(((err_clipped > err) & (token_weights > 0)).sum().item())
    return loss, num_clipped


def sft_loss(logp: torch.Tensor, token_weights: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the target tokens, aggregated by ``token_weights`` [N, T]."""
    return -(logp * token_weights).sum()


LOGPROB_CHUNK_TOKENS = 1024
"""Tokens per chunk of the fp32 log-softmax (``token_logprobs_and_entropy``): a chunk's [1024, V]
fp32 at Qwen's V = 151,936 is 0.6 GB, against 10 GB for a whole 16k-token micro-batch (peak
memory: ``areal-like bench logprob_memory``)."""


def token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = LOGPROB_CHUNK_TOKENS,
) -> torch.Tensor:
    """Log-prob of each next token: logits [N, T, V] predict tokens [N, T] (already shifted).

    Divides by the sampling temperature so the trainer scores tokens under the same distribution
    the engine sampled from (temperature 0 means greedy and is scored at temperature 1).
    """
    logp, _ = token_logprobs_and_entropy(logits, tokens, temperature, False, chunk_tokens)
    return logp


def token_logprobs_and_entropy(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = True,
    chunk_tokens: int = LOGPROB_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``token_logprobs`` plus the entropy of each position's distribution [N, T] (no gradient).

    As vLLM does, the logits are cast to fp32 first and then divided by the temperature. The
    log-softmax runs over ``chunk_tokens`` positions at a time and the backward recomputes each
    chunk's softmax, so no fp32 [N * T, V] tensor exists at once besides the logits themselves and
    their gradient (in the model's dtype: bf16 on GPU unless train.fp32_lm_head). Results are fp32
    [N, T].
    """
    assert chunk_tokens >= 1, f"chunk_tokens={chunk_tokens}"
    vocab = logits.shape[-1]
    scored_at = temperature if temperature > 0 else 1.0
    logp, entropy = _ChunkedTokenLogprobs.apply(
        logits.reshape(-1, vocab), tokens.reshape(-1), scored_at, chunk_tokens, with_entropy
    )
    return logp.view(tokens.shape), entropy.view(tokens.shape) if with_entropy else None


def _tempered_fp32(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """A fresh fp32 copy of ``logits`` divided by ``temperature`` (the caller may modify it in place)."""
    z = logits.to(torch.float32, copy=True)
    if temperature != 1.0:
        z.div_(temperature)
    return z


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """logits [M, V], tokens [M] -> (log-prob of each token [M] fp32, entropy [M] fp32 or empty).

    Forward keeps only the per-position log-sum-exp [M]; backward rebuilds each chunk's softmax p
    from it: d logp_t / d z = (onehot(token_t) - p) / temperature.
    """

    @staticmethod
    def forward(ctx, logits, tokens, temperature: float, chunk_tokens: int, with_entropy: bool):
        num_positions = logits.shape[0]
        logp = torch.empty(num_positions, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(logp)
        entropy = torch.empty_like(logp) if with_entropy else logp.new_empty(0)
        for start in range(0, num_positions, chunk_tokens):
            end = min(start + chunk_tokens, num_positions)
            z = _tempered_fp32(logits[start:end], temperature)
            chunk_lse = torch.logsumexp(z, dim=-1)
            lse[start:end] = chunk_lse
            logp[start:end] = z.gather(-1, tokens[start:end, None]).squeeze(-1) - chunk_lse
            if with_entropy:  # in place: two [chunk, V] fp32 tensors at most
                z.sub_(chunk_lse[:, None])  # log-probs of the chunk
                entropy[start:end] = -z.exp().mul_(z).sum(-1)
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature, ctx.chunk_tokens = temperature, chunk_tokens
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        logits, tokens, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        grad_logits = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk_tokens):
            end = min(start + ctx.chunk_tokens, logits.shape[0])
            g = grad_logp[start:end, None].float()
            p = _tempered_fp32(logits[start:end], ctx.temperature).sub_(lse[start:end, None]).exp_()
            grad = p.mul_(-g).scatter_add_(-1, tokens[start:end, None], g)
            if ctx.temperature != 1.0:
                grad.div_(ctx.temperature)
            grad_logits[start:end] = grad
        return grad_logits, None, None, None, None
