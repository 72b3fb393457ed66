"""Packed one-row micro-batches under flex-attention on a GPU (``pytest -m gpu``): the backward pass
(GPU-only for flex) must give the same loss and gradients as the padded sdpa batch of the same
sequences, so ``train.attn_implementation=flex_attention`` trains exactly what padding trains."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from areal_like.core.models import ModelBuildConfig, make_model
from trainer.algorithms import token_logprobs
from trainer.batch import SequenceSample, collate, collate_micro_batch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _loss_and_grads(model, micro) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    micro = micro.to("cuda")
    logp = token_logprobs(model(**micro.model_inputs()).logits, micro.targets)
    loss = -(logp * micro.loss_mask).sum() / micro.num_loss_tokens
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_flex_packed_row_trains_like_the_padded_batch():
    rng = np.random.default_rng(0)
    samples = [
        SequenceSample(
            rng.integers(3, 15, p), rng.integers(3, 15, r), np.zeros(r, np.float32), np.zeros(r, np.int64)
        )
        for p, r in [(8, 200), (16, 40), (5, 3), (30, 500), (12, 90)]
    ]
    indices = list(range(len(samples)))
    packed = collate_micro_batch(samples, indices, True, "flex_attention", 0)
    assert packed.input_ids.shape[0] == 1 and packed.num_slots >= sum(s.length for s in samples)
    build = ModelBuildConfig(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4)
    model, _ = make_model(build)
    model = model.to("cuda").train()
    model.set_attn_implementation("sdpa")
    padded_loss, padded_grads = _loss_and_grads(model, collate(samples, indices))
    model.set_attn_implementation("flex_attention")
    flex_loss, flex_grads = _loss_and_grads(model, packed)
    assert flex_loss == pytest.approx(padded_loss, rel=1e-4)
    for name, grad in padded_grads.items():  # relative error; attention across sequences gives O(1)
        assert (flex_grads[name] - grad).norm() <= 1e-3 * grad.norm() + 1e-8, name
