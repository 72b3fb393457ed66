"""Multi-turn rollouts in the real system: a rollout worker on local Ray running episodes whose tools
hang and raise (the worker goes on, both counted, the samples reach the datastore with their loss
mask), and `areal-like train` on the multi-turn recipe, small."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import ray

from areal_like.core.models import ModelBuildConfig, build_model, load_tokenizer
from areal_like.dispatch import PromptDispatcher
from areal_like.tasks.calculator import ALPHABET, CalculatorTask
from datastore import DataStoreConfig, make_datastore
from rollout.config import RolloutConfig
from rollout.env import EpisodeConfig
from rollout.samples import META_COLUMN, SampleMetadata
from rollout.tools import ToolCall, ToolEnv
from rollout.worker import RolloutWorker

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GROUPS, GROUP_SIZE = 2, 4


class HangThenRaise:
    """Parser: the first turn calls a tool that hangs, the second one that raises, then the answer."""

    def __init__(self) -> None:
        self.turns = iter([[ToolCall("hang", {})], [ToolCall("boom", {})]])

    def parse(self, text: str):
        return next(self.turns, [])


class Hang:
    name, description = "hang", "sleeps"

    def __call__(self) -> str:
        time.sleep(5)
        return "late"


class Boom:
    name, description = "boom", "raises"

    def __call__(self) -> str:
        raise RuntimeError("tool bug")


class FaultyToolsEnv(ToolEnv):
    def __init__(self, tool_timeout_s: float) -> None:
        super().__init__(tools=(Hang(), Boom()), parser=HangThenRaise(), tool_timeout_s=tool_timeout_s)

    def score(self, answer: str, task) -> float:
        return float(len(answer) % 2)  # some variety in a group's rewards


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = ModelBuildConfig(
        hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1, alphabet=ALPHABET,
        max_position_embeddings=256,
    )  # fmt: skip
    return build_model(cfg, str(tmp_path_factory.mktemp("model") / "tiny"))


def test_a_worker_runs_episodes_through_a_hanging_and_a_raising_tool_and_writes_masked_samples(
    ray_local, model_dir
):
    records = CalculatorTask().make_prompts("train", 8, seed=0)
    tokenizer = load_tokenizer(model_dir)
    ids = [tokenizer.encode(r.text, add_special_tokens=False) for r in records]
    dispatcher = (
        ray.remote(PromptDispatcher)
        .options(num_cpus=0)
        .remote(records, ids, GROUP_SIZE, GROUPS, 0, GROUPS, 0)
    )
    store = make_datastore(DataStoreConfig(num_storage_units=1))
    episode = EpisodeConfig(
        env=f"{__name__}:FaultyToolsEnv", env_args={"tool_timeout_s": 0.2}, max_turns=3, max_total_tokens=200
    )
    config = RolloutConfig(
        group_size=GROUP_SIZE, max_new_tokens=6, groups_per_generate=GROUPS, episode=episode
    )
    worker = (
        ray.remote(RolloutWorker)
        .options(num_cpus=0, max_concurrency=4)
        .remote(0, config, model_dir, "tests.unit.reward_fixtures:exact", 5.0, 1, dispatcher, store, 0, 0)
    )
    try:
        ray.get(worker.start.remote(), timeout=120)
        columns = ["response_ids", "versions", "loss_mask", "behav_logprobs", META_COLUMN]
        batch = store.get_batch_meta("test", columns, GROUPS, min_version=None, timeout_s=120)
        data = store.get_data(batch.samples, columns)
        assert ray.get(worker.stop.remote(), timeout=60)
        health = ray.get(worker.health.remote(), timeout=30)  # after the loop ended: counters complete
    finally:
        store.shutdown()
        for handle in (worker, dispatcher):
            ray.kill(handle)

    assert len(data) == GROUPS * GROUP_SIZE
    for sample in data:
        meta = SampleMetadata.from_column(sample[META_COLUMN])
        mask = sample["loss_mask"].astype(bool)
        assert (meta.num_turns, meta.finish_reason) == (3, "stop")
        assert meta.env_tokens == int((~mask).sum()) > 0
        assert (sample["versions"][~mask] == -1).all() and (sample["versions"][mask] == 0).all()
        assert (sample["behav_logprobs"][~mask] == 0).all() and (sample["behav_logprobs"][mask] < 0).all()
        env_text = tokenizer.decode(sample["response_ids"][~mask].tolist())
        assert "error: hang timed out after 0.2s" in env_text and "error: boom failed:" in env_text
    totals = health.episode_totals
    assert health.episodes_done >= len(data)
    assert totals.tool_calls == totals.tool_errors == 2 * health.episodes_done
    assert totals.num_turns == 3 * health.episodes_done and totals.env_errors == 0
    assert health.interrupted_samples == 0  # env tokens (version -1) are not a second policy version


def test_train_on_the_multiturn_recipe_logs_tool_calls_per_episode(tmp_path):
    run_dir = tmp_path / "run"
    overrides = [
        f"run.dir={run_dir}",
        "model.build.hidden_size=32",
        "model.build.intermediate_size=64",
        "model.build.num_heads=2",
        "model.build.num_kv_heads=1",
        "task.num_train_prompts=64",
        "task.num_eval_prompts=4",
        "task.warmup_steps=2",
        "rollout.group_size=4",
        "rollout.groups_per_generate=2",
        "rollout.max_new_tokens=12",
        "train.batch_groups=2",
        "train.max_steps=2",
        "run.tensorboard=false",
        "eval.every_steps=0",
    ]
    cmd = [
        sys.executable,
        "-m",
        "areal_like.cli",
        "train",
        "--config",
        "configs/multiturn_cpu.yaml",
        *overrides,
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "warmup_model" / "config.json").exists()
    with open(run_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f if line.strip()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        for key in ("rollout/tool_calls", "rollout/tool_errors", "rollout/env_s", "rollout/env_tokens"):
            assert key in r, key
    first = records[0]  # its episodes are the first ones finished: the per-episode ratios are there
    for key in ("rollout/tool_calls_per_episode", "rollout/turns_per_episode", "rollout/env_time_fraction",
                "rollout/env_token_fraction"):  # fmt: skip
        assert key in first, key
    assert first["rollout/turns_per_episode"] >= 1.0
    assert np.isfinite([r["train/loss"] for r in records]).all()
