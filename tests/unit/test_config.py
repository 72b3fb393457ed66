"""Config loading: every shipped recipe, overrides, and errors that name the key and the fix."""

from __future__ import annotations

import glob
import os

import pytest

from areal_like.config import Config, ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
RL_RECIPE = os.path.join(ROOT, "configs", "quickstart.yaml")


def test_there_are_shipped_recipes():
    assert any(path.endswith("quickstart.yaml") for path in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_every_shipped_recipe_loads_into_typed_config(path):
    if os.path.basename(path).startswith("sft"):
        from trainer.sft import SFTConfig

        config = load_config(path, schema_class=SFTConfig)
        assert isinstance(config, SFTConfig) and config.model_path and config.train_path
        return
    config = load_config(path)
    assert isinstance(config, Config)
    assert config.run.dir
    assert config.rollout.max_staleness >= 0


def test_overrides_take_precedence_over_the_recipe():
    config = load_config(RL_RECIPE, ["train.max_steps=7", "rollout.max_staleness=0", "run.dir=/tmp/x"])
    assert config.train.max_steps == 7
    assert config.rollout.max_staleness == 0
    assert config.run.dir == "/tmp/x"


def test_unknown_override_key_names_the_key_and_suggests_the_fix():
    with pytest.raises(ConfigError) as err:
        load_config(RL_RECIPE, ["rollout.max_stalenes=2"])
    message = str(err.value)
    assert "rollout.max_stalenes" in message
    assert "rollout.max_staleness" in message  # the suggestion


def test_unknown_key_in_a_yaml_file_is_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run:\n  dir: /tmp/r\ntrain:\n  max_step: 3\n")
    with pytest.raises(ConfigError, match="train.max_step"):
        load_config(str(path))


def test_negative_eta_is_refused_with_the_allowed_range():
    with pytest.raises(ConfigError, match=r"rollout.max_staleness=-1.*>= 0"):
        load_config(RL_RECIPE, ["rollout.max_staleness=-1"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(RL_RECIPE, ["train.max_steps=many"])


def test_missing_config_file_says_where_recipes_live():
    with pytest.raises(ConfigError, match="config file not found.*configs/"):
        load_config("configs/does_not_exist.yaml")


def test_malformed_override_is_refused():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(RL_RECIPE, ["train.max_steps"])


def test_run_dir_is_required(tmp_path):
    path = tmp_path / "norundir.yaml"
    path.write_text("train:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match="run.dir"):
        load_config(str(path))


def test_batch_groups_must_split_evenly_over_ranks():
    with pytest.raises(ConfigError, match="num_ranks"):
        load_config(RL_RECIPE, ["train.batch_groups=3", "train.num_ranks=2"])


def test_unknown_task_fails_before_any_work(tmp_path):
    from areal_like.prompts import load_prompt_records

    config = load_config(RL_RECIPE, ["task.name=sorting", f"run.dir={tmp_path}"])
    with pytest.raises(ValueError, match="known tasks"):
        load_prompt_records(config.task, seed=0)


def test_overlong_window_must_fit_inside_the_response_budget():
    with pytest.raises(ConfigError, match="overlong_tokens=8 must be below rollout.max_new_tokens=4"):
        load_config(RL_RECIPE, ["train.reward.overlong_tokens=8", "rollout.max_new_tokens=4"])
