"""Errors that say what happened: a full disk is named as such, exit codes separate config errors
(2, never retried) from runtime failures (1, resumed by scripts/train.sh)."""

from __future__ import annotations

import errno
import os
import pickle

import pytest
import torch
from ray.exceptions import RayTaskError

from areal_like import checkpoint as ckpt
from areal_like import cli
from areal_like.checkpoint_saver import CheckpointDiskFull, disk_full_error, is_disk_full
from areal_like.config import ConfigError, ModelConfig
from tests.unit.test_checkpoint import save

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def enospc_from_the_kernel() -> OSError:
    """A real ENOSPC: /dev/full fails every write with it."""
    try:
        with open("/dev/full", "wb", buffering=0) as f:
            pickle.dump(b"x" * 1000, f)
    except OSError as err:
        return err
    raise AssertionError("/dev/full accepted a write")


def in_a_ray_task(err: Exception) -> Exception:
    """``err`` as ``ray.get`` raises it when a remote task (a trainer rank) failed with it."""
    try:
        raise err
    except Exception as raised:
        import traceback

        task_error = RayTaskError("TrainerRank.save_checkpoint", traceback.format_exc(), raised)
        return task_error.as_instanceof_cause()


def test_enospc_is_recognised_through_wrapping_and_ray(tmp_path):
    err = enospc_from_the_kernel()
    assert err.errno == errno.ENOSPC
    assert is_disk_full(err, str(tmp_path), needed=1)
    try:
        raise RuntimeError("saving failed") from err
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped, str(tmp_path), needed=1)
    assert is_disk_full(in_a_ray_task(err), str(tmp_path), needed=1)


def test_torch_stream_errors_count_as_disk_full_only_when_the_disk_lacks_room(tmp_path):
    with pytest.raises(RuntimeError) as info:
        torch.save({"w": torch.zeros(1000)}, "/dev/full")  # C++ stream: no errno, "unexpected pos"
    stream_error = in_a_ray_task(info.value)
    assert is_disk_full(stream_error, str(tmp_path), needed=1 << 60)  # more than any disk has free
    assert not is_disk_full(stream_error, str(tmp_path), needed=1)  # a roomy disk: another fault
    assert not is_disk_full(in_a_ray_task(ValueError("bad shape")), str(tmp_path), needed=1 << 60)


def test_the_disk_full_message_names_path_bytes_and_the_intact_checkpoint(tmp_path):
    save(tmp_path, 2)
    staged = ckpt.step_dir(str(tmp_path), 3) + ".tmp"
    err = disk_full_error(str(tmp_path), staged, 3, written=1000, free=400_000)
    size = ckpt.directory_bytes(ckpt.step_dir(str(tmp_path), 2))
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert str(err) == (
        f"No space left on device: checkpoint of step 3 into {staged} needs about "
        f"{size / 1e6:.1f} MB (the size of step 2), 400.0 kB free there; the previous checkpoint, "
        "step 2, is intact; free space and re-run the same command to resume from it"
    )


def _train_argv(tmp_path):
    return ["train", "--config", os.path.join(ROOT, "configs", "quickstart.yaml"), f"run.dir={tmp_path}"]


def test_cli_exit_codes_separate_config_errors_from_runtime_failures(tmp_path, monkeypatch, capsys):
    import areal_like.controller as controller

    def fails_with(err):
        def run_training(config):
            raise err

        monkeypatch.setattr(controller, "run_training", run_training)

    fails_with(ConfigError("rollout.max_staleness=-2: must be >= 0"))
    assert cli.main(_train_argv(tmp_path)) == cli.EXIT_CONFIG == 2
    # A file that vanished under a running job is a runtime failure: not mapped to 2, so the
    # process exits 1 with its traceback and train.sh resumes the run.
    fails_with(FileNotFoundError("checkpoints/step_000004/trainer: removed while loading"))
    with pytest.raises(FileNotFoundError):
        cli.main(_train_argv(tmp_path))
    message = "No space left on device: checkpoint of step 3 into /r needs ..."
    fails_with(CheckpointDiskFull(message))
    capsys.readouterr()
    assert cli.main(_train_argv(tmp_path)) == cli.EXIT_RUNTIME == 1
    assert capsys.readouterr().err == f"error: {message}\n"


def test_commands_that_only_read_user_paths_report_missing_files_as_input_errors(tmp_path, capsys):
    code = cli.main(["export", "--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert code == 2 and "neither a checkpoint directory" in capsys.readouterr().err


def test_a_missing_model_path_is_a_config_error(tmp_path):
    from areal_like.launch import resolve_model_path

    with pytest.raises(ConfigError, match="model.path="):
        resolve_model_path(ModelConfig(path=str(tmp_path / "no_model")), str(tmp_path))
