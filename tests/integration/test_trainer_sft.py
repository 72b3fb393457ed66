"""SFT on the trainer's DeepSpeed engine: 2 Ray ranks learn a prompt/response jsonl and write an HF dir."""

from __future__ import annotations

import json

import pytest
import torch

from trainer.sft import SFTConfig, run_sft

pytestmark = pytest.mark.slow


def test_sft_lowers_the_loss_and_writes_a_loadable_model(tmp_path, ray_local):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from areal_like.core.models import ModelBuildConfig, build_model

    tiny = ModelBuildConfig(hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)
    init_dir = build_model(tiny, str(tmp_path / "init"))
    data = tmp_path / "sft.jsonl"
    with open(data, "w") as f:
        for a in range(8):
            for b in range(4):
                f.write(json.dumps({"prompt": f"{a}+{b}=", "response": str(a + b)}) + "\n")
    out_dir = tmp_path / "sft_model"
    config = SFTConfig(
        model_path=init_dir,
        train_path=str(data),
        output_dir=str(out_dir),
        epochs=6,
        batch_size=16,
        num_ranks=2,
        zero_stage=3,
        lr=2e-2,
        warmup_steps=2,
        max_tokens_per_micro_batch=40,
    )
    result = run_sft(config)

    assert result.num_samples == 32 and result.num_steps == 12 and result.skipped_steps == 0
    assert result.losses[-1] < 0.6 * result.losses[0]
    with open(out_dir / "sft_metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert [r["step"] for r in lines] == list(range(1, 13))
    tuned = AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True)
    init = AutoModelForCausalLM.from_pretrained(init_dir, local_files_only=True)
    assert AutoTokenizer.from_pretrained(out_dir, local_files_only=True).eos_token_id is not None
    changed = [
        not torch.equal(p, q)
        for p, q in zip(tuned.state_dict().values(), init.state_dict().values(), strict=True)
    ]
    assert all(changed)
