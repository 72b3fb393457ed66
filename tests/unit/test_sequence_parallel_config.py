"""``train.sequence_parallel``: what the config refuses on its own, what is checked against the
model's head counts, and that the override reaches the trainer config."""

from __future__ import annotations

import os

import pytest

from areal_like.config import load_config
from trainer.config import TrainConfig
from trainer.sequence_parallel import check_model_heads

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")


def qwen2(heads: int, kv_heads: int, **kwargs):
    from transformers import Qwen2Config

    return Qwen2Config(
        hidden_size=8 * heads,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        num_hidden_layers=2,
        **kwargs,
    )


def test_sequence_parallel_is_off_by_default_and_set_by_an_override():
    assert TrainConfig().sequence_parallel == 1
    overrides = ["run.dir=/tmp/x", "train.num_ranks=4", "train.batch_groups=4", "train.sequence_parallel=2"]
    assert load_config(QUICKSTART, overrides).train.sequence_parallel == 2


def test_sequence_parallel_below_one_is_refused():
    with pytest.raises(ValueError, match=r"train.sequence_parallel=0: must be >= 1"):
        TrainConfig(sequence_parallel=0)


def test_sequence_parallel_must_divide_the_rank_count():
    with pytest.raises(ValueError, match=r"sequence_parallel=2 must divide train.num_ranks=3.*multiple of 2"):
        TrainConfig(num_ranks=3, sequence_parallel=2)
    assert TrainConfig(num_ranks=4, sequence_parallel=2).sequence_parallel == 2
    assert TrainConfig(num_ranks=2, sequence_parallel=2).sequence_parallel == 2


@pytest.mark.parametrize("attn", ["eager", "flash_attention_2", "flex_attention"])
def test_sequence_parallel_needs_sdpa(attn):
    with pytest.raises(ValueError, match=rf"needs train.attn_implementation='sdpa'.*not '{attn}'"):
        TrainConfig(num_ranks=2, sequence_parallel=2, attn_implementation=attn)
    TrainConfig(num_ranks=1, attn_implementation=attn)  # without it, any backend


def test_sequence_parallel_with_a_critic_is_refused():
    with pytest.raises(ValueError, match=r"sequence_parallel=2 does not support the critic.*algo='grpo'"):
        TrainConfig(num_ranks=2, sequence_parallel=2, algo="ppo")


def test_heads_must_split_over_the_group():
    with pytest.raises(ValueError, match=r"sequence_parallel=4 must divide the model's 6 attention heads"):
        check_model_heads(qwen2(6, 2), 4)


def test_kv_heads_and_the_group_size_must_divide_one_another():
    with pytest.raises(ValueError, match=r"sequence_parallel=4 and the model's 3 KV heads must divide"):
        check_model_heads(qwen2(12, 3), 4)
    check_model_heads(qwen2(4, 2), 2)  # as many KV heads as ranks
    check_model_heads(qwen2(4, 1), 2)  # fewer: replicated per rank
    check_model_heads(qwen2(8, 4), 2)  # more: split
    check_model_heads(qwen2(4, 4), 1)


def test_sliding_window_models_are_refused():
    config = qwen2(4, 2, use_sliding_window=True, sliding_window=16, max_window_layers=1)
    with pytest.raises(ValueError, match=r"sliding-window attention.*sequence_parallel=1"):
        check_model_heads(config, 2)
