"""Whole runs on GPUs: vLLM rollout engines, DeepSpeed bf16 trainer ranks, Ray, the datastore
(``pytest -m gpu`` on the GPU machine; configs/gpu_addition.yaml with a few steps).

Colocated (one GPU, generation and training taking turns) with both weight paths, and split (two
GPUs) through the reallocation plan over NCCL. Each run must finish its steps with every token within
eta versions and end with every engine holding exactly the trainer's weights (sha256).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from areal_like.config import load_config
from areal_like.controller import run_training

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPUS < 1, reason="needs a CUDA GPU")]

STEPS = 4


def _run(run_dir, *overrides):
    config = load_config(
        os.path.join(ROOT, "configs", "gpu_addition.yaml"),
        [
            f"run.dir={run_dir}",
            f"train.max_steps={STEPS}",
            "train.batch_groups=8",
            "rollout.groups_per_generate=16",
            "task.num_eval_prompts=8",
            "run.tensorboard=false",
            "rollout.vllm.enforce_eager=true",  # the recipe runs with CUDA graphs; a test wants a fast start
            # A random policy almost never answers right (all rewards 0, no gradient); the overlong
            # penalty on responses past one token makes rewards differ so that the weights move.
            "train.reward.overlong_tokens=2",
            *overrides,
        ],
    )
    summary = run_training(config)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return summary, rows


def _check(summary, rows, eta):
    assert summary.last_step == STEPS and summary.version == STEPS
    assert summary.engines_in_sync, "an engine's weights differ from the trainer's after the last sync"
    assert summary.final_weights_digest != summary.start_weights_digest  # the policy moved
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert max(r["staleness/max"] for r in rows) <= eta


# A dense Qwen3: q/k norms, no q/k/v biases, head dim 128 at hidden 256 and 4 heads (as Qwen3 sets it).
QWEN3 = ("model.build.architecture=qwen3", "model.build.head_dim=128")


@pytest.mark.parametrize(
    ("realloc", "model"),
    [(True, ()), (False, ()), (True, QWEN3)],
    ids=["ipc_plan", "object_store", "ipc_plan_qwen3"],
)
def test_colocated_run_on_one_gpu(tmp_path, realloc, model):
    eta = 1 if realloc else 0
    summary, rows = _run(
        tmp_path / "run",
        "placement.devices=colocated",
        "realloc.placement=colocated",
        f"realloc.enabled={str(realloc).lower()}",
        f"rollout.max_staleness={eta}",
        *model,
    )
    _check(summary, rows, eta)


@pytest.mark.skipif(GPUS < 2, reason="split placement needs 2 GPUs")
def test_split_run_on_two_gpus_through_nccl(tmp_path):
    summary, rows = _run(tmp_path / "run", "placement.devices=split", "rollout.max_staleness=2")
    _check(summary, rows, 2)
