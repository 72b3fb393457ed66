"""Qwen2 models with random weights at realistic sizes, for GPU benchmarks (no hub: built from a config).

Shapes follow the public Qwen2.5 configs (1.5B: tied embeddings; 7B: untied). Weights are bf16
normal(0, 0.02) from transformers' initialiser, made on the GPU and saved as safetensors; there is no
tokenizer (vLLM runs with ``skip_tokenizer_init``, the benchmarks feed token ids).
"""

from __future__ import annotations

import json
import os

SHAPES: dict[str, dict] = {
    "0.5b": dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
    ),
    "1.5b": dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
    ),
    "7b": dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
    ),
}  # fmt: skip


def random_qwen2(shape: str, path: str, max_len: int = 8192, seed: int = 0) -> str:
    """Save a random bf16 Qwen2 of ``shape`` into ``path`` (reused when it is already there, its
    ``max_position_embeddings`` raised to ``max_len`` when smaller)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config_file = os.path.join(path, "config.json")
    if os.path.exists(config_file):  # reused; rope weights do not depend on the longest position
        with open(config_file) as f:
            saved = json.load(f)
        if saved.get("max_position_embeddings", 0) < max_len:
            saved["max_position_embeddings"] = max_len
            with open(config_file, "w") as f:
                json.dump(saved, f, indent=2)
        return path
    if shape not in SHAPES:
        raise ValueError(f"--shape {shape!r}: known shapes {sorted(SHAPES)}")
    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=max_len)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return path


def num_params(shape: str) -> int:
    """Parameters of ``shape`` (embeddings counted once when tied)."""
    s = SHAPES[shape]
    h, i, layers, v = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    hd = h // s["num_attention_heads"]
    q, kv = s["num_attention_heads"] * hd, s["num_key_value_heads"] * hd
    per_layer = h * q + q + 2 * (h * kv + kv) + q * h + 3 * h * i + 2 * h
    return layers * per_layer + v * h * (1 if s["tie_word_embeddings"] else 2) + h
