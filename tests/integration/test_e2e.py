"""The real system, small: Ray local, DeepSpeed on gloo, the HF engine, a tiny Qwen2 model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from areal_like.config import load_config
from areal_like.controller import run_training
from trainer.worker import state_dict_digest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = [
    "model.build.hidden_size=32",
    "model.build.intermediate_size=64",
    "model.build.num_heads=2",
    "model.build.num_kv_heads=1",
    "task.num_train_prompts=64",
    "task.num_eval_prompts=8",
    "rollout.group_size=4",
    "rollout.groups_per_generate=4",
    "rollout.max_new_tokens=3",
    "train.batch_groups=2",
    "train.micro_batch_size=4",
    "datastore.num_storage_units=1",
    "run.tensorboard=false",
    "ray.num_cpus=2",
]


def cli_train(*overrides) -> list[str]:
    """The `areal-like train` command line on the quickstart recipe, run as a subprocess."""
    return [
        sys.executable,
        "-m",
        "areal_like.cli",
        "train",
        "--config",
        "configs/quickstart.yaml",
        *overrides,
    ]


def tiny_config(run_dir, *extra):
    return load_config(
        os.path.join(ROOT, "configs", "quickstart.yaml"), [*TINY, f"run.dir={run_dir}", *extra]
    )


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def module_weights(checkpoint_dir):
    path = os.path.join(checkpoint_dir, "trainer", "trainer", "mp_rank_00_model_states.pt")
    state = torch.load(path, map_location="cpu", weights_only=False)
    return state["module"], state["global_steps"]


def test_a_short_async_run_trains_logs_and_respects_eta(tmp_path):
    run_dir = tmp_path / "run"
    summary = run_training(tiny_config(run_dir, "train.max_steps=4", "rollout.max_staleness=1"))
    assert summary.last_step == 4 and summary.version == 4
    assert summary.engines_in_sync
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        for key in ("version", "reward/mean", "staleness/max", "timing/step_s", "train/loss"):
            assert key in r, key
        assert r["staleness/max"] <= 1
    assert (run_dir / "config.yaml").exists()
    assert (run_dir / "curves.png").stat().st_size > 1000
    evals = read_jsonl(run_dir / "eval.jsonl")
    assert [e["when"] for e in evals] == ["before", "after"]
    assert os.path.isdir(run_dir / "checkpoints" / "step_000004")
    check_export_and_eval(run_dir, tmp_path)


def check_export_and_eval(run_dir, tmp_path):
    """Export round trip (same logits as the trainer's weights) and eval through the same engine."""
    from transformers import AutoModelForCausalLM

    from areal_like.evaluation import evaluate
    from areal_like.export import export_checkpoint

    out = export_checkpoint(str(run_dir), str(tmp_path / "hf"))
    assert any(name.endswith(".safetensors") for name in os.listdir(out))
    exported = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    trained, _ = module_weights(run_dir / "checkpoints" / "step_000004")
    reference = AutoModelForCausalLM.from_pretrained(run_dir / "init_model", local_files_only=True)
    before = reference(torch.tensor([[3, 4, 5, 6]])).logits
    reference.load_state_dict(trained)
    ids = torch.tensor([[5, 6, 4, 7, 10]])
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, reference(ids).logits)
    assert not torch.equal(before, reference(torch.tensor([[3, 4, 5, 6]])).logits)  # training changed it

    from_dir = evaluate(out, data=_heldout_file(tmp_path), max_new_tokens=3, out=str(tmp_path / "r.json"))
    from_ckpt = evaluate(str(run_dir), data=_heldout_file(tmp_path))  # max_new_tokens from the run: 3
    assert from_dir.num_prompts == 3 and json.loads((tmp_path / "r.json").read_text())["num_prompts"] == 3
    assert [p.responses for p in from_dir.prompts] == [p.responses for p in from_ckpt.prompts]
    sampled = evaluate(str(run_dir), data=_heldout_file(tmp_path), k=2, samples_per_prompt=4)
    assert sampled.samples_per_prompt == 4 and sampled.pass_at_k >= sampled.pass_at_1


def _heldout_file(tmp_path):
    path = tmp_path / "heldout.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) + "\n" for a in (1, 2, 3))
    )
    return str(path)


def test_eta_zero_is_the_synchronous_baseline(tmp_path):
    run_dir = tmp_path / "sync"
    run_training(
        tiny_config(
            run_dir, "train.max_steps=3", "rollout.max_staleness=0", "eval.enabled=false", "run.plot=false"
        )
    )
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["staleness/max"] for r in records] == [0, 0, 0]


def test_resume_continues_the_step_count_with_restored_weights_and_optimizer(tmp_path):
    run_dir = tmp_path / "resume"
    common = ["run.checkpoint_every=1", "run.keep_checkpoints=3", "eval.enabled=false", "run.plot=false"]
    first = run_training(tiny_config(run_dir, "train.max_steps=2", *common))
    assert first.last_step == 2
    saved_weights, saved_steps = module_weights(run_dir / "checkpoints" / "step_000002")
    assert saved_steps == 2

    second = run_training(tiny_config(run_dir, "train.max_steps=4", *common))
    assert second.first_step == 2 and second.last_step == 4 and second.version == 4
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # no gap, no repeat
    # The resumed trainer started from the saved weights (not the init) ...
    assert second.start_weights_digest == state_dict_digest(saved_weights)
    # ... and from the saved optimizer: Adam's step count went on from 2, not from 0.
    _, final_steps = module_weights(run_dir / "checkpoints" / "step_000004")
    assert final_steps == 4
    optim = torch.load(
        run_dir
        / "checkpoints"
        / "step_000004"
        / "trainer"
        / "trainer"
        / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        map_location="cpu",
        weights_only=False,
    )
    adam_state = optim["optimizer_state_dict"]["base_optimizer_state"]["state"]
    assert int(next(iter(adam_state.values()))["step"]) == 4


def test_cli_reports_config_errors_without_a_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "areal_like.cli",
            "train",
            "--config",
            "configs/quickstart.yaml",
            f"run.dir={tmp_path}",
            "rollout.max_staleness=-2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "rollout.max_staleness=-2" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_refuses_a_malformed_prompt_file_naming_the_line(tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=" "answer": "4"}\n')
    run_dir = tmp_path / "run"
    result = subprocess.run(
        cli_train(f"run.dir={run_dir}", f"task.train_path={bad}"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "prompts.jsonl" in result.stderr and "line 2" in result.stderr
    assert not run_dir.exists()  # nothing was started or written


@pytest.mark.parametrize(
    "model",
    [
        [],
        # a dense Qwen3 (q/k norms, no q/k/v biases, head dim 32 at hidden 64 and 4 heads)
        ["model.build.architecture=qwen3", "model.build.hidden_size=64", "model.build.head_dim=32"],
    ],
    ids=["qwen2", "qwen3"],
)
def test_weights_reach_the_engines_through_the_reallocation_plan(tmp_path, model):
    run_dir = tmp_path / "realloc"
    summary = run_training(
        tiny_config(
            run_dir,
            "train.max_steps=3",
            "train.zero_stage=3",
            "realloc.enabled=true",
            "realloc.bucket_mb=0.25",
            "eval.enabled=false",
            "run.plot=false",
            "task.reward_fn=tests.unit.reward_fixtures:response_length",
            *model,
        )
    )
    config = json.loads((run_dir / "init_model" / "config.json").read_text())
    assert config["model_type"] == ("qwen3" if model else "qwen2")
    assert summary.last_step == 3 and summary.version == 3
    assert summary.final_weights_digest != summary.start_weights_digest  # training moved the weights
    assert summary.engines_in_sync  # sha256 of the engine's weights == the trainer's after step 3
    assert all(r["timing/weight_sync_s"] > 0 for r in read_jsonl(run_dir / "metrics.jsonl"))
