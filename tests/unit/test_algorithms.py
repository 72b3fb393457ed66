"""Losses, advantages and estimators against hand-computed references."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.advantages import token_advantages
from trainer.algorithms import (
    decoupled_ppo_loss,
    gae_advantages,
    grpo_advantages,
    kl_estimate,
    loglinear_prox_logp,
    loss_token_weights,
    overlong_penalty,
    token_logprobs,
    token_logprobs_and_entropy,
    value_loss,
)
from trainer.config import KLConfig, TrainConfig


def reference_token_loss(logp, prox, behav, adv, eps, eps_high, cap, decoupled):
    """Scalar, written straight from AReaL's Eq. 5: w * max(-A u, -A clip(u))."""
    if not decoupled:
        prox = behav
    u = math.exp(logp - prox)
    clipped = min(max(u, 1 - eps), 1 + eps_high)
    pg = max(-adv * u, -adv * clipped)
    w = math.exp(prox - behav) if decoupled else 1.0
    if cap is not None and w > cap:
        return 0.0, True
    return w * pg, False


CASES = [
    # logp, prox, behav, adv
    (-1.0, -1.2, -1.1, 1.0),  # ratio 1.22 > 1.2 with A>0: clipped
    (-2.0, -1.5, -1.6, -0.5),  # ratio 0.61 < 0.8 with A<0: clipped
    (-0.7, -0.7, -2.5, 2.0),  # w = e^1.8 = 6.05 > cap 5: masked
    (-0.3, -0.35, -0.3, -1.5),  # inside the clip range
]


@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("cap", [None, 5.0])
def test_decoupled_loss_matches_the_per_token_reference(decoupled, cap):
    logp = torch.tensor([[c[0] for c in CASES]], requires_grad=True)
    prox = torch.tensor([[c[1] for c in CASES]])
    behav = torch.tensor([[c[2] for c in CASES]])
    adv = torch.tensor([[c[3] for c in CASES]])
    mask = torch.ones_like(prox)
    loss, stats = decoupled_ppo_loss(
        logp, prox, behav, adv, mask, eps_clip=0.2, behav_imp_weight_cap=cap, use_decoupled_loss=decoupled
    )
    per_token = [reference_token_loss(*c, 0.2, 0.2, cap, decoupled) for c in CASES]
    expected = sum(v for v, _ in per_token) / len(CASES)  # denominator keeps the masked tokens
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats.capped_tokens == sum(m for _, m in per_token)


def test_decoupled_loss_hand_computed_numbers():
    # One token, logp = prox (u = 1, inside the clip), A = 1, prox - behav = 0.5:
    # loss = -w * A * u = -e^0.5 = -1.6487
    loss, _ = decoupled_ppo_loss(
        torch.tensor([[-1.0]]),
        torch.tensor([[-1.0]]),
        torch.tensor([[-1.5]]),
        torch.tensor([1.0]),
        torch.ones(1, 1),
        eps_clip=0.2,
    )
    assert loss.item() == pytest.approx(-1.6487213, abs=1e-6)
    # Standard PPO on the same token ignores the proximal policy: u = e^(-1 + 1.5) = 1.6487 is
    # clipped to 1.2 for A = 1, so loss = max(-1.6487, -1.2) = -1.2
    loss, _ = decoupled_ppo_loss(
        torch.tensor([[-1.0]]),
        torch.tensor([[-1.0]]),
        torch.tensor([[-1.5]]),
        torch.tensor([1.0]),
        torch.ones(1, 1),
        eps_clip=0.2,
        use_decoupled_loss=False,
    )
    assert loss.item() == pytest.approx(-1.2, abs=1e-6)


def test_clip_higher_uses_the_upper_bound_only_above_one():
    logp, prox = torch.tensor([[0.0]]), torch.tensor([[-0.25]])  # u = e^0.25 = 1.284
    loss, _ = decoupled_ppo_loss(
        logp, prox, prox, torch.tensor([1.0]), torch.ones(1, 1), eps_clip=0.2, eps_clip_high=0.28
    )
    assert loss.item() == pytest.approx(-1.28, abs=1e-6)


def test_loss_denominator_is_the_global_token_count():
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss_local, _ = decoupled_ppo_loss(logp, logp, logp, torch.tensor([1.0, 1.0]), mask, eps_clip=0.2)
    loss_global, _ = decoupled_ppo_loss(
        logp, logp, logp, torch.tensor([1.0, 1.0]), mask, eps_clip=0.2, loss_denominator=12.0
    )
    assert loss_local.item() == pytest.approx(-1.0)
    assert loss_global.item() == pytest.approx(-3.0 / 12.0)


def test_gradient_flows_only_through_the_current_policy():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    prox = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, _ = decoupled_ppo_loss(
        logp, prox, torch.tensor([[-1.0, -2.0]]), torch.tensor([1.0]), torch.ones(1, 2), eps_clip=0.2
    )
    loss.backward()
    assert prox.grad is None or torch.all(prox.grad == 0)
    assert torch.allclose(logp.grad, torch.tensor([[-0.5, -0.5]]))  # d(-u/2)/dlogp at u = 1


def test_grpo_advantages_are_group_centred_and_std_scaled():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    groups = torch.tensor([7, 7, 7, 9, 9, 9])
    adv = grpo_advantages(rewards, groups, std_norm=False)
    assert torch.allclose(adv, torch.tensor([2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3]))
    adv = grpo_advantages(rewards, groups, std_norm=True)
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)  # unbiased std of [1, 0, 0]
    assert adv[0].item() == pytest.approx((2 / 3) / std, rel=1e-4)


def test_equal_rewards_give_zero_advantage():
    adv = grpo_advantages(torch.ones(4), torch.zeros(4, dtype=torch.long))
    assert torch.all(adv == 0)


def test_token_logprobs_apply_the_sampling_temperature():
    logits = torch.tensor([[[2.0, 0.0]]])
    got = token_logprobs(logits, torch.tensor([[0]]), temperature=2.0)
    expected = 1.0 - math.log(math.exp(1.0) + 1.0)
    assert got.item() == pytest.approx(expected, abs=1e-6)


# ---- objective options ------------------------------------------------------------------------
def test_dual_clip_caps_the_loss_of_negative_advantages():
    # u = 5 with A = -1: PPO's max(-A u, -A clip(u)) = max(5, 1.2) = 5; dual clip c = 3 caps it at 3.
    logp, prox = torch.tensor([[math.log(5.0)]]), torch.tensor([[0.0]])
    args = (logp, prox, prox, torch.tensor([-1.0]), torch.ones(1, 1))
    loss, _ = decoupled_ppo_loss(*args, eps_clip=0.2)
    assert loss.item() == pytest.approx(5.0, rel=1e-6)
    loss, stats = decoupled_ppo_loss(*args, eps_clip=0.2, dual_clip=3.0)
    assert loss.item() == pytest.approx(3.0, rel=1e-6)
    assert stats.dual_clipped_tokens == 1
    # positive advantages are untouched by the dual clip: max(-5, -1.2) = -1.2
    loss, _ = decoupled_ppo_loss(logp, prox, prox, torch.tensor([1.0]), torch.ones(1, 1), 0.2, dual_clip=3.0)
    assert loss.item() == pytest.approx(-1.2, rel=1e-6)


def test_clamp_mode_truncates_the_importance_weight_instead_of_masking():
    # w = e^1.8 = 6.05 > cap 5; u = 1, A = 2: mask mode drops the token (loss 0 over 1 token),
    # clamp mode keeps it with w = 5: loss = -5 * 2 = -10.
    logp = prox = torch.tensor([[-0.7]])
    behav = torch.tensor([[-2.5]])
    common = dict(eps_clip=0.2, behav_imp_weight_cap=5.0)
    masked, stats = decoupled_ppo_loss(logp, prox, behav, torch.tensor([2.0]), torch.ones(1, 1), **common)
    assert masked.item() == 0.0 and stats.capped_tokens == 1 and stats.num_tokens == 0
    clamped, stats = decoupled_ppo_loss(
        logp, prox, behav, torch.tensor([2.0]), torch.ones(1, 1), imp_weight_cap_mode="clamp", **common
    )
    assert clamped.item() == pytest.approx(-10.0, rel=1e-6)
    assert stats.capped_tokens == 1 and stats.num_tokens == 1


def test_without_a_cap_the_paper_objective_weights_every_token_fully():
    logp = prox = torch.tensor([[-0.7]])
    loss, stats = decoupled_ppo_loss(
        logp, prox, torch.tensor([[-2.5]]), torch.tensor([2.0]), torch.ones(1, 1), eps_clip=0.2
    )
    assert loss.item() == pytest.approx(-2.0 * math.exp(1.8), rel=1e-6)
    assert stats.capped_tokens == 0


def test_token_mean_over_micro_batches_and_ranks_is_the_global_token_mean():
    # Two micro-batches (or ranks): A holds one 3-token sequence with per-token losses 1, 2, 3;
    # B one 1-token sequence with loss 10. Global token mean = 16 / 4 = 4, whereas the mean of
    # per-micro-batch means would be (2 + 10) / 2 = 6.
    token_losses = [torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[10.0]])]
    masks = [torch.ones(1, 3), torch.ones(1, 1)]

    def total(aggregation, norm_tokens=None):
        weights = [loss_token_weights(m, aggregation, 4.0, 2.0, norm_tokens) for m in masks]
        return sum((loss * w).sum().item() for loss, w in zip(token_losses, weights, strict=True))

    assert total("token_mean") == pytest.approx(4.0)
    assert total("seq_mean_token_mean") == pytest.approx(6.0)  # GRPO: mean of sequence means
    assert total("seq_mean_token_sum", norm_tokens=4) == pytest.approx((6.0 + 10.0) / (4 * 2))  # Dr.GRPO


def test_policy_loss_with_token_weights_sums_to_the_global_aggregate():
    # Same tokens split in two micro-batches with global weights == one batch with its own mean.
    logp = torch.tensor([[-1.0, -2.0, -0.5, -0.1]])
    behav = logp - 0.1
    adv = torch.tensor([[1.0, -1.0, 0.5, 2.0]])
    mask = torch.ones(1, 4)
    whole, _ = decoupled_ppo_loss(logp, logp, behav, adv, mask, eps_clip=0.2)
    parts = 0.0
    for cols in (slice(0, 1), slice(1, 4)):
        w = loss_token_weights(mask[:, cols], "token_mean", 4.0, 1.0)
        part, _ = decoupled_ppo_loss(
            logp[:, cols], logp[:, cols], behav[:, cols], adv[:, cols], mask[:, cols], 0.2, token_weights=w
        )
        parts += part.item()
    assert parts == pytest.approx(whole.item(), rel=1e-6)


def test_gae_matches_a_hand_computed_recursion():
    # rewards [0, 0, 1], values [0.5, 0.6, 0.7], gamma 0.9, lambda 0.8:
    # delta = [0.9*0.6-0.5, 0.9*0.7-0.6, 1-0.7] = [0.04, 0.03, 0.3]
    # A2 = 0.3, A1 = 0.03 + 0.72*0.3 = 0.246, A0 = 0.04 + 0.72*0.246 = 0.21712
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0], [0.1, 0.3, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    adv, returns = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    assert torch.allclose(adv[0], torch.tensor([0.21712, 0.246, 0.3, 0.0]), atol=1e-6)
    assert torch.allclose(returns[0], torch.tensor([0.71712, 0.846, 1.0, 0.0]), atol=1e-6)
    # second row (shorter, padding values ignored): delta = [0.9*0.3-0.1, 2-0.3] = [0.17, 1.7]
    assert torch.allclose(adv[1], torch.tensor([0.17 + 0.72 * 1.7, 1.7, 0.0, 0.0]), atol=1e-6)


def test_gae_without_values_is_the_reward_to_go():
    rewards = torch.tensor([[-0.1, -0.2, 1.0]])
    adv, _ = gae_advantages(rewards, torch.zeros(1, 3), torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert torch.allclose(adv, torch.tensor([[0.7, 0.8, 1.0]]))


def test_value_clipping_takes_the_pessimistic_error():
    # V = 1.0, V_old = 0.5, R = 2.0, clip 0.2: unclipped err 1.0, clipped V = 0.7 -> err 1.69
    values, old, returns = torch.tensor([[1.0]]), torch.tensor([[0.5]]), torch.tensor([[2.0]])
    loss, clipped = value_loss(values, old, returns, torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(0.5 * 1.69) and clipped == 1
    loss, _ = value_loss(values, old, returns, torch.ones(1, 1), None)
    assert loss.item() == pytest.approx(0.5)


def test_leave_one_out_baseline_is_the_mean_of_the_other_samples():
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 0.0]), torch.zeros(3), std_norm=False, leave_one_out=True)
    assert torch.allclose(adv, torch.tensor([1.0, -0.5, -0.5]))


def test_kl_estimators_match_their_formulas():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])  # d = 0.5
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(0.5)
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.125)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(math.exp(-0.5) - 0.5, rel=1e-6)
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(logp, ref, "k4")


def test_loglinear_prox_interpolates_by_version_gap():
    # pre-update weights are version 3: alpha = (3 - v) / (4 - v) -> [0, 1/2, 2/3, 0 (prompt)]
    versions = torch.tensor([[3, 2, 1, -1]])
    behav, logp = torch.full((1, 4), -1.0), torch.full((1, 4), -2.0, requires_grad=True)
    prox = loglinear_prox_logp(behav, logp, versions, prox_version=3)
    assert torch.allclose(prox, torch.tensor([[-1.0, -1.5, -1.0 - 2 / 3, -1.0]]))
    assert not prox.requires_grad


def test_overlong_penalty_is_linear_inside_the_window():
    lengths = torch.tensor([10, 15, 17, 20, 25])
    penalty = overlong_penalty(lengths, max_tokens=20, overlong_tokens=5, factor=1.0)
    assert torch.allclose(penalty, torch.tensor([0.0, 0.0, -0.4, -1.0, -1.0]))


# ---- log-probs and entropy -------------------------------------------------------------------------
def unchunked_logprobs_and_entropy(logits, tokens, temperature):
    """The reference: one fp32 log-softmax over every position, after the fp32 cast."""
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    logprobs = torch.log_softmax(z, dim=-1)
    chosen = logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return chosen, -(logprobs.exp() * logprobs).sum(-1)


@pytest.mark.parametrize("chunk_tokens", [1, 7, 64, 10_000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_entropy_and_gradients_equal_the_unchunked_path(chunk_tokens, temperature):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 41, 997, generator=gen, dtype=torch.float64) * 4).float()
    tokens = torch.randint(0, 997, (3, 41), generator=gen)
    upstream = torch.randn(3, 41, generator=gen)  # a loss that weights every token differently
    grads, outs = [], []
    for fn in (
        lambda x: token_logprobs_and_entropy(x, tokens, temperature, chunk_tokens=chunk_tokens),
        lambda x: unchunked_logprobs_and_entropy(x, tokens, temperature),
    ):
        x = logits.clone().requires_grad_()
        logp, entropy = fn(x)
        (logp * upstream).sum().backward()
        grads.append(x.grad)
        outs.append((logp.detach(), entropy))
    (logp, entropy), (ref_logp, ref_entropy) = outs
    assert not entropy.requires_grad
    torch.testing.assert_close(logp, ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, rtol=1e-5, atol=1e-5)
    rel = (grads[0] - grads[1]).norm() / grads[1].norm()
    assert rel < 1e-5
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_the_backward_keeps_no_fp32_tensor_over_the_vocabulary():
    """Autograd saves the logits themselves and per-position scalars, never a [tokens, V] fp32
    log-softmax (the unchunked path saves one per micro-batch: 10 GB at 16k tokens and V=151,936)."""
    logits = torch.randn(512, 4096, dtype=torch.bfloat16, requires_grad=True)
    tokens = torch.randint(0, 4096, (512,))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp, _ = token_logprobs_and_entropy(logits, tokens, 0.7)
    others = [t for t in saved if t.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr()]
    assert sum(t.numel() * t.element_size() for t in others) <= 512 * 16  # tokens and lse
    logp.sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and logits.grad.shape == logits.shape


def test_the_temperature_divides_the_fp32_logits():
    """vLLM casts to fp32 and then divides; dividing bf16 logits first rounds them to bf16 again."""
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(1, 256, 1024, generator=gen) * 8).to(torch.bfloat16)
    tokens = torch.randint(0, 1024, (1, 256), generator=gen)
    logp, entropy = token_logprobs_and_entropy(logits, tokens, temperature=0.7)
    ref_logp, ref_entropy = unchunked_logprobs_and_entropy(logits, tokens, 0.7)
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, rtol=0, atol=1e-5)


def test_greedy_sampling_is_scored_at_temperature_one():
    logits = torch.tensor([[[2.0, 0.0]]])
    assert token_logprobs(logits, torch.tensor([[0]]), temperature=0.0).item() == pytest.approx(
        2.0 - math.log(math.exp(2.0) + 1.0), abs=1e-6
    )


# ---- gamma ---------------------------------------------------------------------------------------
def test_grpo_without_kl_rewards_gives_every_token_the_sequence_advantage_whatever_gamma():
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    scores = torch.tensor([0.5, -1.0])
    adv, _ = token_advantages(scores, mask, TrainConfig(algo="grpo", gamma=0.9))
    torch.testing.assert_close(adv, scores[:, None] * mask)


def test_grpo_with_kl_rewards_discounts_by_gamma():
    mask = torch.ones(1, 3)
    kl = torch.tensor([[0.1, 0.2, 0.3]])
    cfg = TrainConfig(algo="grpo", gamma=0.9, kl=KLConfig(coef=0.5, placement="reward"))
    adv, _ = token_advantages(torch.tensor([1.0]), mask, cfg, kl=kl)
    rewards = [-0.05, -0.1, 1.0 - 0.15]
    expected = [rewards[0] + 0.9 * rewards[1] + 0.81 * rewards[2], rewards[1] + 0.9 * rewards[2], rewards[2]]
    torch.testing.assert_close(adv, torch.tensor([expected]))
