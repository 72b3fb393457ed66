"""Models with random weights at realistic sizes, for GPU benchmarks (no hub: built from a config).

Shapes are the named shapes of ``areal_like.core.models.SHAPES`` (the public Qwen2.5 and Qwen3
config.json values; Qwen2.5 1.5B: tied embeddings, 7B: untied), under their full names or the short
Qwen2.5 ones ('0.5b', '1.5b', '7b'). Weights are bf16 normal(0, 0.02) from transformers' initialiser,
made on the GPU and saved as safetensors; there is no tokenizer (vLLM runs with
``skip_tokenizer_init``, the benchmarks feed token ids).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from areal_like.core.realloc import Qwen2Dims

SHORT_NAMES = {"0.5b": "qwen2.5-0.5b", "1.5b": "qwen2.5-1.5b", "7b": "qwen2.5-7b"}


def shape_names() -> list[str]:
    from areal_like.core.models import SHAPES

    return sorted(SHORT_NAMES) + sorted(SHAPES)


def hf_config(shape: str, max_len: int):
    """The transformers config of ``shape`` (a short or full name) with ``max_len`` positions."""
    from areal_like.core.models import SHAPES, ModelBuildConfig, hf_model_config

    name = SHORT_NAMES.get(shape, shape)
    if name not in SHAPES:
        raise ValueError(f"--shape {shape!r}: known shapes {shape_names()}")
    build = ModelBuildConfig(shape=name)
    build.max_position_embeddings = max_len
    return hf_model_config(build, bos=None, eos=None, pad=None)


def dims(shape: str) -> Qwen2Dims:
    """The tensor shapes of ``shape`` as the weight-reallocation plan sees them."""
    from areal_like.core.realloc import Qwen2Dims

    return Qwen2Dims.from_config(hf_config(shape, 8192))


def vocab_size(shape: str) -> int:
    return dims(shape).vocab_size


def random_model(shape: str, path: str, max_len: int = 8192, seed: int = 0) -> str:
    """Save a random bf16 model of ``shape`` into ``path`` (reused when it is already there, its
    ``max_position_embeddings`` raised to ``max_len`` when smaller)."""
    import torch
    from transformers import AutoModelForCausalLM

    config_file = os.path.join(path, "config.json")
    if os.path.exists(config_file):  # reused; rope weights do not depend on the longest position
        with open(config_file) as f:
            saved = json.load(f)
        if saved.get("max_position_embeddings", 0) < max_len:
            saved["max_position_embeddings"] = max_len
            with open(config_file, "w") as f:
                json.dump(saved, f, indent=2)
        return path
    config = hf_config(shape, max_len)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return path
