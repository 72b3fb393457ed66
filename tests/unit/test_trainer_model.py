"""The trainer's model loader: dropout off (the trainer runs in train mode), an optional fp32 output
head, and the critic's value head, all through core's ``load_model``."""

from __future__ import annotations

import json

import pytest
import torch

from areal_like.core.models import ModelBuildConfig, build_model, load_model, zero_dropout
from trainer.config import TrainConfig
from trainer.deepspeed_engine import EngineSpec, load_train_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model whose config asks for attention dropout 0.5."""
    path = build_model(
        ModelBuildConfig(hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1),
        str(tmp_path_factory.mktemp("trainer_model") / "model"),
    )
    with open(f"{path}/config.json") as f:
        config = json.load(f)
    config["attention_dropout"] = 0.5
    with open(f"{path}/config.json", "w") as f:
        json.dump(config, f)
    return path


INPUT_IDS = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10]])


def test_the_training_loader_turns_dropout_off_so_train_mode_scores_as_eval_mode(model_dir):
    spec = EngineSpec.of_train(TrainConfig(attn_implementation="eager"))
    model = load_train_model(model_dir, spec)
    assert model.config.attention_dropout == 0.0
    with torch.no_grad():
        model.eval()
        expected = model(input_ids=INPUT_IDS).logits
        model.train()
        for _ in range(3):
            torch.testing.assert_close(model(input_ids=INPUT_IDS).logits, expected, rtol=0, atol=0)


def test_the_plain_loader_keeps_the_configured_dropout(model_dir):
    """The contrast: with dropout 0.5 train mode is random (what the training loader prevents)."""
    model = load_model(model_dir, attn_implementation="eager")
    assert model.config.attention_dropout == 0.5
    model.train()
    with torch.no_grad():
        torch.manual_seed(0)
        first = model(input_ids=INPUT_IDS).logits
        second = model(input_ids=INPUT_IDS).logits
    assert not torch.equal(first, second)


@pytest.mark.parametrize("fp32_lm_head", [False, True])
def test_the_fp32_lm_head_multiplies_bf16_weights_in_fp32(model_dir, fp32_lm_head):
    spec = EngineSpec.of_train(TrainConfig(fp32_lm_head=fp32_lm_head))
    model = load_train_model(model_dir, spec).to(torch.bfloat16)  # as DeepSpeed's bf16 mode does
    hidden = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    logits = model.get_output_embeddings()(hidden)
    weight = model.get_output_embeddings().weight
    if fp32_lm_head:
        assert logits.dtype == torch.float32
        torch.testing.assert_close(logits, hidden.float() @ weight.float().T, rtol=1e-6, atol=1e-6)
        assert model(input_ids=INPUT_IDS).logits.dtype == torch.float32
    else:
        assert logits.dtype == torch.bfloat16


def test_the_value_head_model_gives_one_value_per_position(model_dir):
    model = load_train_model(model_dir, EngineSpec.of_train(TrainConfig()), value_head=True)
    assert model.config.num_labels == 1 and model.config.attention_dropout == 0.0
    assert model(input_ids=INPUT_IDS).logits.shape == (1, INPUT_IDS.shape[1], 1)


def test_zero_dropout_finds_every_dropout_field_by_name():
    from transformers import GPT2Config

    config = GPT2Config()  # resid_pdrop, embd_pdrop, attn_pdrop, summary_first_dropout: 0.1 each
    changed = zero_dropout(config)
    assert set(changed) == {"resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout"}
    assert config.resid_pdrop == config.embd_pdrop == config.attn_pdrop == config.summary_first_dropout == 0.0
    assert zero_dropout(config) == []
