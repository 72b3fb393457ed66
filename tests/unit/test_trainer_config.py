"""Trainer config: new knobs load from YAML overrides, and mistakes name the field and the fix."""

from __future__ import annotations

import os

import pytest

from areal_like.config import ConfigError, load_config
from trainer.config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")


def test_quickstart_keeps_the_decoupled_grpo_defaults():
    train = load_config(QUICKSTART, ["run.dir=/tmp/x"]).train
    assert train.use_decoupled_loss and train.behav_imp_weight_cap == 5.0
    assert train.behav_imp_weight_mode == "mask" and train.prox_logp == "recompute"
    assert train.algo == "grpo" and train.adv_std_norm and train.loss_agg == "token_mean"


def test_nested_sections_are_set_from_overrides():
    overrides = [
        "run.dir=/tmp/x",
        "train.algo=ppo",
        "train.kl.coef=0.05",
        "train.kl.estimator=k2",
        "train.critic.value_clip=null",
        "train.reward.overlong_tokens=8",
        "rollout.max_new_tokens=16",
        "train.max_tokens_per_micro_batch=4096",
        "train.eps_clip_high=0.28",
    ]
    train = load_config(QUICKSTART, overrides).train
    assert train.algo == "ppo" and train.kl.coef == 0.05 and train.kl.estimator == "k2"
    assert train.critic.value_clip is None and train.reward.overlong_tokens == 8
    assert train.max_tokens_per_micro_batch == 4096 and train.eps_clip_high == 0.28


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.algo=dpo", "train.algo='dpo'"),
        ("train.kl.estimator=k5", "train.kl.estimator='k5'"),
        ("train.behav_imp_weight_mode=drop", "train.behav_imp_weight_mode='drop'"),
        ("train.dual_clip=0.5", "train.dual_clip=0.5"),
        ("train.max_tokens_per_micro_batch=1", "train.max_tokens_per_micro_batch=1"),
        ("train.critic.lr=0", "train.critic.lr=0"),
    ],
)
def test_bad_values_name_the_field_and_the_value(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(QUICKSTART, ["run.dir=/tmp/x", override])


def test_loglinear_prox_needs_the_decoupled_loss():
    with pytest.raises(ValueError, match="use_decoupled_loss"):
        TrainConfig(prox_logp="loglinear", use_decoupled_loss=False)


def test_stale_deepspeed_build_locks_are_removed_and_fresh_ones_kept(tmp_path, monkeypatch):
    import os
    import time

    from trainer.deepspeed_engine import clear_stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    fresh = tmp_path / "py311_cpu" / "deepspeed_other" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir(parents=True)
        lock.write_text("")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    assert clear_stale_build_locks(max_age_s=600) == [str(stale)]
    assert not stale.exists() and fresh.exists()  # a build may be running: leave it


def test_joining_the_trainer_group_on_cpu_builds_no_deepspeed_op(tmp_path):
    # DeepSpeed would JIT-build its shared-memory all-reduce op (~24 s here) into TORCH_EXTENSIONS_DIR;
    # the trainer never uses it. One rank joins the group in a fresh process and all-reduces.
    import os
    import subprocess
    import sys

    code = (
        "import torch, torch.distributed as dist\n"
        "from areal_like.core.net import free_port\n"
        "from trainer.deepspeed_engine import init_distributed\n"
        "init_distributed(0, 1, '127.0.0.1', free_port(), 60)\n"
        "x = torch.ones(2); dist.all_reduce(x); print('sum', x.tolist())\n"
    )
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sum [1.0, 1.0]" in done.stdout
    assert not any("shm_comm" in path for path, _, _ in os.walk(tmp_path)), list(os.walk(tmp_path))
