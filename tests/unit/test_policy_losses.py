"""The policy losses and off-policy corrections of trainer/policy_losses.py against hand-computed
references, and the engine/trainer mismatch guard of trainer/stats.py."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from trainer.algorithms import decoupled_ppo_loss
from trainer.config import TrainConfig
from trainer.policy_losses import behav_weights, m2po_keep, policy_loss, span_segments
from trainer.stats import LogpMismatchError, check_logp_mismatch, fresh_mismatch


def cfg(**kw) -> TrainConfig:
    kw.setdefault("behav_imp_weight_cap", None)
    return TrainConfig(**kw)


def grad_of(loss, logp):
    (grad,) = torch.autograd.grad(loss, logp)
    return grad


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# One row, four tokens: logp - prox = log u, prox - behav = log w.
LOG_U = [math.log(1.5), math.log(0.5), 0.0, math.log(1.1)]
LOG_W = [0.3, -0.2, 1.8, 0.0]
ADV = [1.0, -1.0, 2.0, -0.5]


def row_inputs(log_u=LOG_U, log_w=LOG_W, adv=ADV):
    behav = torch.tensor([[-2.0, -1.0, -3.0, -0.5]])
    prox = behav + torch.tensor([log_w])
    logp = (prox + torch.tensor([log_u])).requires_grad_(True)
    return logp, prox, behav, torch.tensor([adv]), torch.ones(1, len(adv))


# ---- PPO through the registry is the existing decoupled loss --------------------------------------
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(behav_imp_weight_cap=5.0),
        dict(behav_imp_weight_cap=2.0, behav_imp_weight_mode="clamp"),
        dict(use_decoupled_loss=False, behav_imp_weight_cap=5.0),
        dict(eps_clip_high=0.28, dual_clip=3.0, behav_imp_weight_cap=5.0),
    ],
)
def test_ppo_from_the_registry_equals_the_decoupled_ppo_loss(options):
    c = cfg(**options)
    logp, prox, behav, adv, mask = row_inputs()
    loss, st = policy_loss(c, logp, prox, behav, adv, mask)
    ref, ref_st = decoupled_ppo_loss(
        logp, prox, behav, adv, mask, eps_clip=c.eps_clip, eps_clip_high=c.eps_clip_high,
        behav_imp_weight_cap=c.behav_imp_weight_cap, use_decoupled_loss=c.use_decoupled_loss,
        imp_weight_cap_mode=c.behav_imp_weight_mode, dual_clip=c.dual_clip,
    )  # fmt: skip
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(grad_of(loss, logp), grad_of(ref, logp))
    for name in ("num_tokens", "clipped_tokens", "imp_weight_sum", "capped_tokens", "dual_clipped_tokens"):
        assert getattr(st, name) == pytest.approx(getattr(ref_st, name)), name


# ---- CISPO ------------------------------------------------------------------------------------------
def test_cispo_weights_every_tokens_gradient_by_its_truncated_ratio():
    # u = 1.5 -> 1.28 (eps_high 0.28); u = 0.5 stays (no lower bound); u = 1; u = 1.1.
    # loss_t = -w r_hat A, d loss_t / d logp_t = -w r_hat A (the paper's sg(r_hat) A log pi).
    logp, prox, behav, adv, mask = row_inputs()
    loss, st = policy_loss(cfg(policy_loss="cispo"), logp, prox, behav, adv, mask)
    r_hat = [1.28, 0.5, 1.0, 1.1]
    per_token = [-math.exp(w) * r * a for w, r, a in zip(LOG_W, r_hat, ADV, strict=True)]
    assert loss.item() == pytest.approx(sum(per_token) / 4, rel=1e-6)
    assert torch.allclose(grad_of(loss, logp), torch.tensor([per_token]) / 4, rtol=1e-6)
    assert st.clipped_tokens == 1
    # PPO drops the first token's gradient (u above the clip with A > 0); CISPO keeps it.
    logp, prox, behav, adv, mask = row_inputs()
    ppo, _ = policy_loss(cfg(), logp, prox, behav, adv, mask)
    assert grad_of(ppo, logp)[0, 0].item() == 0.0


def test_cispo_lower_bound_when_set():
    logp, prox, behav, adv, mask = row_inputs()
    loss, st = policy_loss(cfg(policy_loss="cispo", cispo_eps_low=0.2), logp, prox, behav, adv, mask)
    grad = grad_of(loss, logp)
    assert grad[0, 1].item() == pytest.approx(-math.exp(-0.2) * 0.8 * -1.0 / 4, rel=1e-6)  # 0.5 -> 0.8
    assert st.clipped_tokens == 2


def test_cispo_without_the_decoupled_loss_is_the_papers_objective():
    # pi_prox := pi_behav, so r = pi_theta / pi_behav and no behaviour weight.
    logp = torch.tensor([[math.log(0.3), math.log(0.2)]], requires_grad=True)
    behav = torch.tensor([[math.log(0.2), math.log(0.2)]])
    adv = torch.tensor([[1.0, -1.0]])
    loss, _ = policy_loss(
        cfg(policy_loss="cispo", use_decoupled_loss=False), logp, behav, behav, adv, torch.ones(1, 2)
    )
    paper = -(torch.tensor([[1.28, 1.0]]) * adv * logp).sum() / 2  # r = 1.5 -> 1.28, r = 1
    assert torch.allclose(grad_of(loss, logp), grad_of(paper, logp))


# ---- GSPO -------------------------------------------------------------------------------------------
def gspo_reference(logp, prox, adv_per_seq, spans, eps_low, eps_high):
    """GSPO as the paper writes it: s_i = (pi_theta(y_i) / pi_old(y_i))^(1 / |y_i|), loss =
    mean_i max(-A_i s_i, -A_i clip(s_i)), with gradient through s_i."""
    losses = []
    for (start, end), a in zip(spans, adv_per_seq, strict=True):
        s = torch.exp((logp[0, start:end] - prox[0, start:end]).mean())
        losses.append(torch.maximum(-a * s, -a * s.clamp(1 - eps_low, 1 + eps_high)))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("eps", [0.05, 3e-4])
def test_gspo_on_a_packed_row_matches_the_sequence_level_objective(eps):
    # Two sequences packed in one row (positions 1-3 and 5-6; 0 and 4 are prompt tokens).
    logp = torch.tensor([[-1.0, -0.8, -1.2, -0.4, -9.0, -2.0, -0.1]], requires_grad=True)
    prox = torch.tensor([[-1.0, -0.9, -1.0, -0.6, -9.0, -1.9, -0.05]])
    adv_seq = [1.0, -0.5]
    segments = span_segments((1, 7), rows=[0, 0], starts=[1, 5], lengths=[3, 2])
    assert segments.tolist() == [[-1, 0, 0, 0, -1, 1, 1]]
    mask = (segments >= 0).float()
    adv = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0, -0.5, -0.5]])
    # seq_mean_token_mean weights: 1 / (len_i * num_sequences)
    weights = torch.tensor([[0.0, 1 / 6, 1 / 6, 1 / 6, 0.0, 1 / 4, 1 / 4]])
    c = cfg(policy_loss="gspo", gspo_eps_clip=eps, gspo_eps_clip_high=eps)
    loss, st = policy_loss(c, logp, prox, prox, adv, mask, weights, segments)
    ref = gspo_reference(logp, prox, adv_seq, [(1, 4), (5, 7)], eps, eps)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(grad_of(loss, logp), grad_of(ref, logp), atol=1e-7)
    # seq 0: mean log u = (0.1 - 0.2 + 0.2) / 3 -> s = 1.0339: inside 1 +- 0.05, above 1 + 3e-4
    # with A > 0 (clipped); seq 1: (-0.1 - 0.05) / 2 -> s = 0.928 below both bounds with A < 0
    clipped = (0 if eps > 0.04 else 3) + 2
    assert st.clipped_tokens == clipped


# ---- SAPO -------------------------------------------------------------------------------------------
def test_sapo_gate_value_and_gradient():
    # token 0: u = 1, A = 1 -> loss -(4/1) sigmoid(0) = -2, gradient -A * 4 s (1 - s) u = -1
    # token 1: u = 2, A = -1, tau_neg = 1.05 -> loss (4 / 1.05) sigmoid(1.05),
    #          gradient -A * 4 s (1 - s) u with s = sigmoid(1.05), u = 2
    logp = torch.tensor([[-1.0, math.log(0.4)]], requires_grad=True)
    prox = torch.tensor([[-1.0, math.log(0.2)]])
    adv = torch.tensor([[1.0, -1.0]])
    loss, st = policy_loss(cfg(policy_loss="sapo"), logp, prox, prox, adv, torch.ones(1, 2))
    s = sigmoid(1.05)
    assert loss.item() == pytest.approx((-2.0 + 4 / 1.05 * s) / 2, rel=1e-6)
    expected = torch.tensor([[-1.0, 4 * s * (1 - s) * 2.0]]) / 2
    assert torch.allclose(grad_of(loss, logp), expected, rtol=1e-5)
    assert st.clipped_tokens == 0


# ---- M2PO -------------------------------------------------------------------------------------------
def test_m2po_mask_drops_the_largest_second_moments_until_the_mean_fits():
    # squared log ratios 0.25, 0.01, 0.01, 0: mean 0.0675 > 0.04; without 0.25 the mean is 0.0067
    log_ratio = torch.tensor([[0.5, 0.1, -0.1, 0.0]])
    mask = torch.ones(1, 4)
    assert m2po_keep(log_ratio, mask, 0.04).tolist() == [[0.0, 1.0, 1.0, 1.0]]
    assert m2po_keep(log_ratio, mask, 0.07).tolist() == [[1.0, 1.0, 1.0, 1.0]]
    assert m2po_keep(log_ratio, mask, 0.001).tolist() == [[0.0, 0.0, 0.0, 1.0]]  # 0.005 > 0.001
    # masked positions neither count nor get kept
    assert m2po_keep(log_ratio, torch.tensor([[0.0, 1.0, 1.0, 0.0]]), 0.04).tolist() == [[0.0, 1.0, 1.0, 0.0]]


def test_m2po_loss_is_the_unclipped_ratio_over_the_kept_tokens():
    # log(pi_theta / pi_behav) = log u + log w: [log 1.5 + 0.3, log 0.5 - 0.2, 1.8, log 1.1]
    # squared: 0.498, 0.800, 3.24, 0.0091 -> dropping 3.24, 0.800 and 0.498 leaves 0.0091 <= 0.04
    logp, prox, behav, adv, mask = row_inputs()
    loss, st = policy_loss(cfg(policy_loss="m2po"), logp, prox, behav, adv, mask)
    assert st.m2po_masked_tokens == 3
    expected = -math.exp(0.0) * 1.1 * -0.5 / 4  # w = 1 for the kept token
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert torch.allclose(grad_of(loss, logp), torch.tensor([[0.0, 0.0, 0.0, expected]]), rtol=1e-6)


# ---- behaviour weights: TIS, MIS, IcePop, token and sequence level --------------------------------
def weights_for(log_w, **kw):
    behav = torch.zeros(1, len(log_w))
    return behav_weights(torch.tensor([log_w]), behav, torch.ones(1, len(log_w)), **kw)


def test_token_level_truncated_and_masked_importance_sampling():
    log_w = [0.3, -0.2, 1.8, -1.0]  # w = 1.35, 0.82, 6.05, 0.37
    w, keep, out = weights_for(log_w, cap=2.0, mode="clamp")  # TIS
    assert torch.allclose(w, torch.tensor([[math.exp(0.3), math.exp(-0.2), 2.0, math.exp(-1.0)]]))
    assert keep.tolist() == [[1.0, 1.0, 1.0, 1.0]] and out.tolist() == [[False, False, True, False]]
    w, keep, _ = weights_for(log_w, cap=2.0, mode="mask")  # MIS
    assert keep.tolist() == [[1.0, 1.0, 0.0, 1.0]]
    assert w[0, 0].item() == pytest.approx(math.exp(0.3))


def test_icepop_masks_tokens_outside_the_band_on_both_sides():
    _, keep, out = weights_for([0.3, -0.2, 1.8, -1.0], cap=2.0, floor=0.5, mode="mask")
    assert keep.tolist() == [[1.0, 1.0, 0.0, 0.0]]  # 6.05 > 2 and 0.37 < 0.5
    assert int(out.sum()) == 2


def test_sequence_level_weight_is_the_product_and_geometric_the_mean():
    # two sequences in one row: log w [0.5, 0.4] -> e^0.9 = 2.46; [-0.2, 1.8] -> e^1.6 = 4.95
    log_w = [0.5, 0.4, -0.2, 1.8]
    segments = torch.tensor([[0, 0, 1, 1]])
    w, keep, _ = weights_for(log_w, cap=3.0, mode="mask", level="sequence", segments=segments)
    assert torch.allclose(w, torch.tensor([[math.exp(0.9)] * 2 + [math.exp(1.6)] * 2]))
    assert keep.tolist() == [[1.0, 1.0, 0.0, 0.0]]  # Seq-MIS drops the whole second sequence
    w, keep, _ = weights_for(log_w, cap=3.0, mode="clamp", level="sequence", segments=segments)
    assert torch.allclose(w, torch.tensor([[math.exp(0.9)] * 2 + [3.0] * 2]))  # Seq-TIS
    w, _, _ = weights_for(log_w, cap=3.0, mode="mask", level="geometric", segments=segments)
    assert torch.allclose(w, torch.tensor([[math.exp(0.45)] * 2 + [math.exp(0.8)] * 2]))


def test_sequence_level_masking_enters_the_loss_and_keeps_the_denominator():
    logp = torch.tensor([[-1.0, -1.0, -1.0, -1.0]], requires_grad=True)
    behav = logp.detach() - torch.tensor([[0.5, 0.4, -0.2, 1.8]])  # prox = logp: u = 1
    segments = torch.tensor([[0, 0, 1, 1]])
    c = cfg(behav_imp_weight_cap=3.0, behav_imp_weight_level="sequence")
    loss, st = policy_loss(c, logp, logp.detach(), behav, torch.ones(1, 4), torch.ones(1, 4), None, segments)
    # only sequence 0 counts, with weight e^0.9 and A u = 1, over all 4 tokens
    assert loss.item() == pytest.approx(-2 * math.exp(0.9) / 4, rel=1e-6)
    assert st.num_tokens == 2 and st.capped_tokens == 2


def test_config_refuses_corrections_that_cannot_apply():
    with pytest.raises(ValueError, match="behav_imp_weight_floor=1.5"):
        TrainConfig(behav_imp_weight_floor=1.5)
    with pytest.raises(ValueError, match="use_decoupled_loss=true"):
        TrainConfig(behav_imp_weight_level="sequence", use_decoupled_loss=False)
    with pytest.raises(ValueError, match="dual_clip"):
        TrainConfig(policy_loss="cispo", dual_clip=3.0)
    with pytest.raises(ValueError, match="train.policy_loss='grpo'"):
        TrainConfig(policy_loss="grpo")
    with pytest.raises(ValueError, match="logp_mismatch_stop"):
        TrainConfig(logp_mismatch_stop=0.0)


# ---- the mismatch guard -----------------------------------------------------------------------------
def test_fresh_mismatch_counts_only_tokens_of_the_current_version():
    behav = torch.tensor([[-1.0, -2.0, -3.0, 0.0]])
    logp = torch.tensor([[-1.5, -2.0, -1.0, -7.0]])
    versions = torch.tensor([[4, 4, 3, 4]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert fresh_mismatch(behav, logp, versions, mask, version=4) == (0.5, 2.0)


def test_mismatch_guard_stops_an_all_fresh_first_minibatch_and_names_the_knob():
    c = TrainConfig()  # on by default: warn 0.05, stop 0.25
    with pytest.raises(LogpMismatchError, match="train.logp_mismatch_stop=0.25"):
        check_logp_mismatch(c, diff_sum=30.0, fresh_tokens=100.0, loss_tokens=100.0, version=0, log=False)
    # the same gap on a first minibatch that also holds older tokens does not stop the run
    assert check_logp_mismatch(c, 30.0, 100.0, 150.0, version=3, log=False) == pytest.approx(0.3)
    assert check_logp_mismatch(c, 0.0, 0.0, 150.0, version=3, log=False) is None
    assert check_logp_mismatch(TrainConfig(logp_mismatch_stop=None), 30.0, 100.0, 100.0, 0, False) == 0.3


def test_mismatch_guard_warns_above_the_warning_threshold(caplog):
    c = TrainConfig()
    with caplog.at_level(logging.WARNING, logger="trainer.stats"):
        check_logp_mismatch(c, 1.0, 100.0, 100.0, version=2, log=True)  # 0.01: quiet
        assert not caplog.records
        check_logp_mismatch(c, 10.0, 100.0, 100.0, version=2, log=True)  # 0.1
    assert "logp_mismatch_warn=0.05" in caplog.text and "0.1000" in caplog.text
