"""The decoupled PPO loss and GRPO advantages against hand-computed references."""

from __future__ import annotations

import math

import pytest
import torch

from areal_like.algorithms import decoupled_ppo_loss, grpo_advantages, token_logprobs


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
