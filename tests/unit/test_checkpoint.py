"""Verified checkpoints: manifests, resume from the newest intact one, leftovers, pruning.

The checkpoints here are written by the real save path (staging dir, state.pkl, manifest, commit)
with a stand-in for DeepSpeed's files: what is tested is what happens to files on disk.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from areal_like import checkpoint as ckpt
from areal_like.checkpoint_manifest import MANIFEST, human_bytes, read_manifest, verify, write_manifest
from areal_like.dispatch import DispatcherState
from areal_like.staleness import GateState

MODEL_FILE = "trainer/trainer/mp_rank_00_model_states.pt"
OPTIM_FILE = "trainer/trainer/zero_pp_rank_0_mp_rank_00_optim_states.pt"


def run_state(step: int) -> ckpt.RunState:
    dispatcher = DispatcherState(gate=GateState(version=step), epoch=0, position=step, next_group_id=step)
    return ckpt.RunState(step, step, dispatcher, ckpt.capture_rng(), 0, "/models/tiny")


def save(run_dir, step: int, keep: int = 10, model_bytes: int = 1_200_000) -> str:
    """One checkpoint through the real staging -> manifest -> commit path."""
    staged = ckpt.staging_dir(str(run_dir), step)
    os.makedirs(os.path.join(staged, "trainer", "trainer"))
    rng = np.random.default_rng(step)
    for rel, size in ((MODEL_FILE, model_bytes), (OPTIM_FILE, 2 * model_bytes)):
        with open(os.path.join(staged, rel), "wb") as f:
            f.write(rng.bytes(size))
    with open(os.path.join(staged, "datastore.pkl"), "wb") as f:
        pickle.dump(list(range(step)), f)
    ckpt.write_state(staged, run_state(step))
    write_manifest(staged)
    return ckpt.commit(str(run_dir), staged, step, keep)


def truncate(path: str, keep_bytes: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(keep_bytes)


def test_manifest_lists_every_file_with_size_and_checksum(tmp_path):
    path = save(tmp_path, 1)
    entries = {e.path: e for e in read_manifest(path)}
    assert sorted(entries) == sorted([MODEL_FILE, OPTIM_FILE, "datastore.pkl", "state.pkl"])
    assert entries[MODEL_FILE].size == 1_200_000
    assert verify(path) is None


def test_a_truncated_model_file_resumes_from_the_previous_checkpoint_naming_the_damage(tmp_path):
    save(tmp_path, 18)
    newest = save(tmp_path, 20)
    truncate(os.path.join(newest, MODEL_FILE), 1_100_000)
    point = ckpt.find_resume_point(str(tmp_path))
    assert point.step == 18 and point.path == ckpt.step_dir(str(tmp_path), 18)
    assert point.describe().startswith(
        f"step 20: {MODEL_FILE} truncated, 1.1 MB of 1.2 MB; resuming from step 18"
    )
    assert ckpt.read_state(point.path).step == 18


def test_a_truncated_state_pkl_is_skipped(tmp_path):
    save(tmp_path, 1)
    newest = save(tmp_path, 2)
    state = os.path.join(newest, "state.pkl")
    truncate(state, os.path.getsize(state) // 2)
    point = ckpt.find_resume_point(str(tmp_path))
    assert point.step == 1
    assert point.skipped[0].startswith("step 2: state.pkl truncated")


def test_a_deleted_trainer_directory_is_named_as_such(tmp_path):
    save(tmp_path, 1)
    newest = save(tmp_path, 2)
    import shutil

    shutil.rmtree(os.path.join(newest, "trainer"))
    point = ckpt.find_resume_point(str(tmp_path))
    assert point.step == 1 and point.skipped == ["step 2: trainer/ missing (2 files)"]


def test_a_dangling_latest_pointer_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    import shutil

    save(tmp_path, 1)
    newest = save(tmp_path, 2)
    shutil.rmtree(newest)
    point = ckpt.find_resume_point(str(tmp_path))
    assert point.step == 1
    assert point.skipped == ["step_000002: directory missing (named by checkpoints/latest)"]


def test_a_flipped_byte_of_the_same_size_fails_the_checksum(tmp_path):
    save(tmp_path, 1)
    newest = save(tmp_path, 2)
    with open(os.path.join(newest, OPTIM_FILE), "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    point = ckpt.find_resume_point(str(tmp_path))
    assert point.step == 1 and point.skipped == [f"step 2: {OPTIM_FILE} checksum mismatch"]


def test_a_checkpoint_without_manifest_is_an_unfinished_save(tmp_path):
    save(tmp_path, 1)
    newest = save(tmp_path, 2)
    os.remove(os.path.join(newest, MANIFEST))
    os.remove(os.path.join(tmp_path, "checkpoints", "latest"))  # not the pointer's: not a legacy one
    point = ckpt.find_resume_point(str(tmp_path))
    assert point.step == 1 and "no manifest.json" in point.skipped[0]


def test_only_damaged_checkpoints_stop_the_run_with_the_way_to_start_over(tmp_path):
    newest = save(tmp_path, 1)
    truncate(os.path.join(newest, MODEL_FILE), 10)
    with pytest.raises(ckpt.CheckpointsUnusable) as err:
        ckpt.find_resume_point(str(tmp_path))
    assert f"step 1: {MODEL_FILE} truncated, 10 B of 1.2 MB" in str(err.value)
    assert "run.resume=false" in str(err.value)


def test_no_checkpoints_means_a_fresh_start(tmp_path):
    assert ckpt.find_resume_point(str(tmp_path)) is None
    assert ckpt.prepare(str(tmp_path), resume=True) is None


def test_leftover_tmp_directories_are_removed_at_start(tmp_path):
    save(tmp_path, 1)
    leftover = ckpt.staging_dir(str(tmp_path), 2)
    with open(os.path.join(leftover, "partial.pt"), "wb") as f:
        f.write(b"x" * 100)
    point = ckpt.prepare(str(tmp_path), resume=True)
    assert point.step == 1 and not os.path.exists(leftover)
    assert sorted(os.listdir(ckpt.checkpoints_root(str(tmp_path)))) == ["latest", "step_000001"]


def test_keep_checkpoints_prunes_the_oldest_and_never_the_one_just_committed(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, step, keep=2)
    assert ckpt.committed_steps(str(tmp_path)) == [2, 3]
    # A resume from step 2 (3 was damaged): the next save, step 3 again, replaces the damaged one;
    # with keep=1 only it remains.
    truncate(os.path.join(ckpt.step_dir(str(tmp_path), 3), MODEL_FILE), 5)
    assert ckpt.find_resume_point(str(tmp_path)).step == 2
    save(tmp_path, 3, keep=1)
    assert ckpt.committed_steps(str(tmp_path)) == [3]
    assert verify(ckpt.step_dir(str(tmp_path), 3)) is None


def test_checkpoints_of_an_abandoned_later_history_are_removed_at_the_next_commit(tmp_path):
    save(tmp_path, 10)
    save(tmp_path, 20)
    truncate(os.path.join(ckpt.step_dir(str(tmp_path), 20), MODEL_FILE), 5)
    assert ckpt.find_resume_point(str(tmp_path)).step == 10
    save(tmp_path, 11, keep=5)  # the resumed run's first save
    assert ckpt.committed_steps(str(tmp_path)) == [10, 11]
    assert ckpt.find_resume_point(str(tmp_path)).skipped == []


def test_human_bytes_reads_like_the_messages():
    sizes = (10, 1_100_000, 1_200_000, 3.4e9)
    assert [human_bytes(n) for n in sizes] == ["10 B", "1.1 MB", "1.2 MB", "3.4 GB"]


def test_export_and_eval_resolve_a_run_dir_to_its_newest_intact_checkpoint(tmp_path):
    from areal_like.config import ConfigError
    from areal_like.export import resolve_checkpoint

    older = save(tmp_path, 1)
    newest = save(tmp_path, 2)
    truncate(os.path.join(newest, "datastore.pkl"), 3)
    assert resolve_checkpoint(str(tmp_path)) == older
    with pytest.raises(ConfigError, match="datastore.pkl truncated"):
        resolve_checkpoint(newest)
    with pytest.raises(ConfigError, match="neither a checkpoint directory"):
        resolve_checkpoint(str(tmp_path / "nowhere"))
