"""The GPU benchmarks' random models (benchmarks/_models.py), checked on CPU: every shape's config
builds the model the weight-reallocation plan describes, Qwen3 included, and a saved model is reused."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from benchmarks._models import dims, hf_config, random_model, shape_names
from benchmarks.device_copy import shapes


@pytest.mark.parametrize("shape", ["1.5b", "7b", "qwen3-1.7b"])
def test_a_shapes_model_has_the_tensors_the_plan_describes(shape):
    config = hf_config(shape, 4096)
    assert config.max_position_embeddings == 4096
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    held = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    assert held == [(s.name, s.shape) for s in dims(shape).specs("bfloat16")]
    assert sum(r * c for r, c in shapes(shape)) == sum(p.numel() for p in model.parameters())
    assert (config.model_type == "qwen3") == shape.startswith("qwen3")


def test_short_names_are_the_qwen25_shapes_and_unknown_ones_are_listed():
    assert dims("1.5b") == dims("qwen2.5-1.5b")
    assert {"0.5b", "1.5b", "7b", "qwen3-0.6b"} <= set(shape_names())
    with pytest.raises(ValueError, match=r"--shape '3b': known shapes \['0.5b'"):
        hf_config("3b", 4096)


def test_a_saved_model_is_reused_with_room_for_longer_sequences(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 1024}))
    assert random_model("1.5b", str(tmp_path), max_len=4096) == str(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["max_position_embeddings"] == 4096
