"""Bad inputs are refused before Ray starts and before the run directory exists, with exit code 2
and a message naming the field or the file and line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from areal_like import cli
from areal_like.config import ConfigError, load_config
from areal_like.core.models import ModelBuildConfig, build_model
from areal_like.preflight import check_run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")
CLI = [sys.executable, "-m", "areal_like.cli", "train"]


def train(run_dir, *overrides, config=QUICKSTART) -> int:
    return cli.main(["train", "--config", config, f"run.dir={run_dir}", *overrides])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model directory (context 64 tokens) built once for the module."""
    cfg = ModelBuildConfig(hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)
    return build_model(cfg, str(tmp_path_factory.mktemp("model") / "tiny"))


def write_prompts(path, prompts):
    with open(path, "w") as f:
        for prompt in prompts:
            f.write(json.dumps({"prompt": prompt, "answer": "1"}) + "\n")
    return str(path)


@pytest.fixture(autouse=True)
def no_ray_start(monkeypatch):
    """Starting Ray in this module is a failure: every refusal must come before it. (Checking
    ``ray.is_initialized()`` instead would depend on whether an earlier test left a session's Ray up.)"""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("ray.init was called before preflight refused the run")

    monkeypatch.setattr(ray, "init", refuse)


def refused(capsys, run_dir, *overrides) -> str:
    """Run the CLI in-process; assert exit 2 (never Ray's AssertionError from ``no_ray_start``),
    no run directory; the error text."""
    assert train(run_dir, *overrides) == 2
    assert not os.path.exists(run_dir), "the run directory was created before the check"
    return capsys.readouterr().err


def test_the_gpu_recipe_on_a_cpu_machine_exits_2_at_once(tmp_path):
    run_dir = tmp_path / "run"
    started = time.monotonic()
    proc = subprocess.run(
        [*CLI, "--config", "configs/gpu_addition.yaml", f"run.dir={run_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert time.monotonic() - started < 60  # imports only; Ray would have waited forever
    assert "placement.devices='split' needs 2 GPU(s)" in proc.stderr
    assert "vllm is not installed" in proc.stderr
    assert not run_dir.exists()


def test_one_sample_per_group_with_grpo_is_refused(tmp_path, capsys):
    err = refused(capsys, tmp_path / "run", "rollout.group_size=1")
    assert "rollout.group_size=1 with train.algo='grpo'" in err and "gradient are 0" in err


def test_a_missing_model_directory_is_refused(tmp_path, capsys):
    err = refused(capsys, tmp_path / "run", f"model.path={tmp_path / 'nowhere'}")
    assert f"model.path='{tmp_path / 'nowhere'}' is not a directory" in err


def test_a_corrupt_config_json_is_refused_naming_the_file_and_line(tmp_path, capsys, model_dir):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    lines = (broken / "config.json").read_text().splitlines()
    line = next(i for i, text in enumerate(lines) if text.rstrip().endswith(",") and ": " in text)
    lines[line] = lines[line].rstrip().rstrip(",")  # a missing comma: the next line is the error
    (broken / "config.json").write_text("\n".join(lines))
    err = refused(capsys, tmp_path / "run", f"model.path={broken}")
    assert f"{broken}/config.json: line {line + 2}," in err and "not valid JSON" in err


def test_a_model_without_its_tokenizer_is_refused(tmp_path, capsys, model_dir):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(os.path.join(model_dir, "config.json"), bare / "config.json")
    err = refused(capsys, tmp_path / "run", f"model.path={bare}")
    assert "the tokenizer does not load" in err


def test_overlong_prompts_are_refused_naming_file_and_line_or_filtered(tmp_path, capsys, model_dir):
    prompts = write_prompts(tmp_path / "p.jsonl", ["1+1", "9" * 10_000_000, "1" * 100] + ["2+2"] * 40)
    overrides = [f"model.path={model_dir}", f"task.train_path={prompts}", "rollout.max_new_tokens=8"]
    err = refused(capsys, tmp_path / "run", *overrides)
    assert f"{prompts} line 2 (10,000,000 characters)" in err  # judged by length, never tokenized
    assert f"{prompts} line 3 (100 tokens)" in err and "at most 56 prompt tokens" in err
    assert "preflight.overlong_prompts=filter" in err

    config = load_config(
        QUICKSTART, [f"run.dir={tmp_path / 'run'}", *overrides, "preflight.overlong_prompts=filter"]
    )
    checked = check_run(config)
    assert checked.num_overlong == 2 and checked.context_tokens == 64
    assert [r.prompt_id for r in checked.records.train[:2]] == ["p.jsonl:1", "p.jsonl:4"]
    assert not os.path.exists(tmp_path / "run")


def test_a_dataset_smaller_than_a_batch_is_refused_or_warned(tmp_path, capsys, caplog):
    prompts = write_prompts(tmp_path / "few.jsonl", ["1+1", "2+2", "3+3"])
    overrides = [f"task.train_path={prompts}", "train.batch_groups=4"]
    err = refused(capsys, tmp_path / "run", *overrides)
    assert "gives 3 training prompts, fewer than train.batch_groups=4" in err and "small_dataset=warn" in err
    config = load_config(QUICKSTART, [f"run.dir={tmp_path}", *overrides, "preflight.small_dataset=warn"])
    assert len(check_run(config).records.train) == 3
    assert "fewer than train.batch_groups=4" in caplog.text


def test_a_prompt_the_tokenizer_cannot_encode_is_refused_before_ray(tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", ["1+1"] * 40 + ["x+1"])
    err = refused(capsys, tmp_path / "run", f"task.train_path={prompts}")
    assert f"{prompts} line 41" in err and "cannot encode" in err and "'x'" in err


def test_every_problem_is_reported_at_once(tmp_path):
    config = load_config(
        QUICKSTART, [f"run.dir={tmp_path}", "rollout.group_size=1", f"model.path={tmp_path / 'none'}"]
    )
    with pytest.raises(ConfigError, match=r"2 problem\(s\)") as err:
        check_run(config)
    assert "rollout.group_size=1" in str(err.value) and "is not a directory" in str(err.value)


def test_the_quickstart_recipe_passes(tmp_path):
    checked = check_run(load_config(QUICKSTART, [f"run.dir={tmp_path / 'run'}"]))
    assert len(checked.records.train) == 2000 and checked.num_overlong == 0
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize(("key", "value"), [("overlong_prompts", "drop"), ("small_dataset", "ignore")])
def test_preflight_options_are_checked(tmp_path, key, value):
    with pytest.raises(ConfigError, match=f"preflight.{key}='{value}'"):
        load_config(QUICKSTART, [f"run.dir={tmp_path}", f"preflight.{key}={value}"])


def test_a_code_reward_without_bubblewrap_is_refused_unless_the_weak_sandbox_is_chosen(tmp_path, monkeypatch):
    from areal_like.tasks import sandbox

    monkeypatch.setattr(sandbox, "bubblewrap_path", lambda: None)
    code = ["task.reward_fn=areal_like.tasks.code_reward:code_reward", f"run.dir={tmp_path / 'run'}"]
    with pytest.raises(
        ConfigError, match="task.sandbox='bwrap'.*apt-get install -y bubblewrap.*task.sandbox=weak"
    ):
        check_run(load_config(QUICKSTART, code))
    check_run(load_config(QUICKSTART, [*code, "task.sandbox=weak"]))
    assert not os.path.exists(tmp_path / "run")


def test_a_built_model_is_checked_with_the_tokenizer_it_will_be_built_with(tmp_path):
    # A Qwen-vocabulary build must not be judged by the character tokenizer (which cannot encode
    # ordinary English prompts).
    from areal_like.preflight import check_model

    cfg = load_config(QUICKSTART, [f"run.dir={tmp_path / 'run'}", "model.build.tokenizer=qwen"])
    tokenizer, _ = check_model(cfg)
    assert len(tokenizer) >= 151_643
    assert tokenizer.decode(tokenizer("How many apples?")["input_ids"]) == "How many apples?"


def test_a_model_family_the_weight_plan_does_not_map_is_refused_before_the_run(tmp_path, capsys, model_dir):
    llama = tmp_path / "llama"
    shutil.copytree(model_dir, llama)
    config = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    err = refused(capsys, tmp_path / "run", f"model.path={llama}", "realloc.enabled=true")
    assert "model_type 'llama' is not one the weight-reallocation plan" in err
    assert "set realloc.enabled=false" in err
