"""The GSM8K recipe on CPU, small: a tiny Qwen2 with the Qwen tokenizer built on start, GSM8K-format
prompt files through the chat template, the gsm8k reward; and the SFT-then-RL script."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = [
    "model.build.hidden_size=32",
    "model.build.num_heads=2",
    "model.build.num_kv_heads=1",
    "model.build.intermediate_size=64",
    "rollout.group_size=2",
    "rollout.groups_per_generate=2",
    "rollout.max_new_tokens=6",
    "train.batch_groups=2",
    "datastore.num_storage_units=1",
    "run.tensorboard=false",
    "run.plot=false",
]
QUESTIONS = [
    ("Mia has 3 apples. She buys 4 more apples. How many apples does Mia have now?", "3 + 4 = 7\n#### 7"),
    ("Tom has 9 cards. He gives 2 cards to a friend. How many cards does Tom have now?", "9 - 2 = 7\n#### 7"),
    ("Ava has 5 coins. She finds 1 more coin. How many coins does Ava have now?", "5 + 1 = 6\n#### 6"),
]


def _gsm8k_file(path) -> str:
    """A GSM8K-format jsonl (question/answer keys, extra keys ignored) outside the repository."""
    with open(path, "w") as f:
        for question, answer in QUESTIONS:
            f.write(json.dumps({"question": question, "answer": answer, "source": "test"}) + "\n")
    return str(path)


def _run(argv: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_gsm8k_cpu_recipe_trains_on_any_gsm8k_file_and_logs_the_chat_prompt(tmp_path):
    from transformers import AutoTokenizer

    data = _gsm8k_file(tmp_path / "gsm.jsonl")
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "areal_like.cli", "train", "--config", "configs/gsm8k_cpu.yaml"]
    overrides = [
        f"run.dir={run_dir}",
        "train.max_steps=2",
        f"task.train_path={data}",
        f"task.eval_path={data}",
        "task.prompt_key=question",
        "task.answer_key=answer",
    ]
    proc = _run(argv + SMALL + overrides, timeout_s=900)
    assert "done: steps 0->2" in proc.stdout

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "init_model", local_files_only=True)
    assert len(tokenizer) >= 151_643 and tokenizer.chat_template
    assert [r["step"] for r in _read_jsonl(run_dir / "metrics.jsonl")] == [1, 2]
    evals = _read_jsonl(run_dir / "eval.jsonl")
    assert [e["when"] for e in evals] == ["before", "after"]
    sent = {
        "<|im_start|>system\nSolve the problem.<|im_end|>\n<|im_start|>user\n"
        f"{question}<|im_end|>\n<|im_start|>assistant\n"
        for question, _ in QUESTIONS
    }
    for example in evals[-1]["examples"]:
        assert example["prompt"] in sent
        assert example["answer"].endswith(("#### 7", "#### 6"))
        assert "<|im_end|>" not in example["response"]  # stop/special tokens are not in the text

    # `areal-like eval` on the run reads any file in the run's format (question/answer keys) and
    # sends the prompts through the run's templates.
    from areal_like.evaluation import evaluate

    report = evaluate(str(run_dir), data=data, max_new_tokens=4)
    assert report.num_prompts == len(QUESTIONS)
    assert {p.prompt for p in report.prompts} == sent


def test_sft_then_rl_script_warms_up_then_trains_from_the_sft_model(tmp_path):
    data = _gsm8k_file(tmp_path / "gsm.jsonl")
    run_dir = tmp_path / "run"
    argv = [
        sys.executable,
        "scripts/sft_then_rl.py",
        "--config",
        "configs/gsm8k_cpu.yaml",
        "--sft-config",
        "configs/sft_gsm8k_cpu.yaml",
        *SMALL,
        f"run.dir={run_dir}",
        "train.max_steps=1",
        f"task.train_path={data}",
        f"task.eval_path={data}",
        "eval.enabled=false",
        "sft.epochs=1",
        "sft.batch_size=3",
        "sft.torch_threads=1",
    ]
    proc = _run(argv, timeout_s=900)
    assert "sft done: 1 steps over 3 samples" in proc.stdout
    assert "done: RL steps 0->1" in proc.stdout
    sft_rows = _read_jsonl(run_dir / "sft_data.jsonl")
    assert sft_rows[0]["prompt"].startswith("<|im_start|>system\nSolve the problem.<|im_end|>\n")
    assert sft_rows[0]["prompt"].endswith("<|im_start|>assistant\n")
    assert sft_rows[0]["response"] == QUESTIONS[0][1]
    with open(run_dir / "config.yaml") as f:
        assert f"path: {run_dir / 'sft_model'}" in f.read()  # RL started from the warm-up's output
