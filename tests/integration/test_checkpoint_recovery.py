"""Checkpoints users can trust, on the real system (Ray local, DeepSpeed on gloo, a tiny model):
damage falls back to the newest intact checkpoint, a full disk stops the run cleanly, counters
survive a resume, a run resumes on another trainer layout, and asynchronous saves resume exactly."""

from __future__ import annotations

import os
import subprocess

import pytest

from areal_like import checkpoint as ckpt
from areal_like.checkpoint_manifest import verify
from areal_like.controller import run_training
from tests.integration.test_e2e import ROOT, TINY, cli_train, read_jsonl, tiny_config

pytestmark = pytest.mark.slow

QUIET = ["eval.enabled=false", "run.plot=false"]
MODEL_FILE = os.path.join("trainer", "trainer", "mp_rank_00_model_states.pt")


def test_a_truncated_model_file_resumes_from_the_previous_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    common = ["run.checkpoint_every=1", "run.keep_checkpoints=3", *QUIET]
    run_training(tiny_config(run_dir, "train.max_steps=2", *common))
    damaged = os.path.join(ckpt.step_dir(str(run_dir), 2), MODEL_FILE)
    size = os.path.getsize(damaged)
    with open(damaged, "r+b") as f:
        f.truncate(size // 2)
    capsys.readouterr()

    resumed = run_training(tiny_config(run_dir, "train.max_steps=3", *common))
    out = capsys.readouterr().out
    assert "step 2: trainer/trainer/mp_rank_00_model_states.pt truncated" in out, out
    assert "; resuming from step 1" in out
    assert resumed.first_step == 1 and resumed.last_step == 3
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]  # each once
    # Counters go on from step 1's values although the rollout worker and datastore restarted.
    counters = [k for k in records[0] if k.endswith("_total")]
    assert "rollout/samples_total" in counters and "datastore/lost_samples_total" in counters
    for key in counters:
        values = [r[key] for r in records]
        assert values == sorted(values), (key, values)
    assert ckpt.committed_steps(str(run_dir)) == [1, 2, 3]
    assert verify(ckpt.step_dir(str(run_dir), 2)) is None  # saved again, intact


FULL_DISK_SCENARIO = r"""
set -u
mount -t tmpfs -o size=32m tmpfs "$MNT"
train() { python -m areal_like.cli train --config configs/quickstart.yaml $TINY run.dir="$MNT/run" \
    run.checkpoint_every=1 run.keep_checkpoints=1 eval.enabled=false run.plot=false "$@"; }
train train.max_steps=2 > "$OUT/run1.log" 2>&1; echo $? > "$OUT/run1.rc"
ckpt=$(du -sb "$MNT/run/checkpoints/step_000002" | cut -f1)
free=$(df --output=avail -B1 "$MNT" | tail -1)
head -c $((free - ckpt / 3)) /dev/zero > "$MNT/filler"  # room for a third of a checkpoint
train train.max_steps=3 > "$OUT/run2.log" 2>&1; echo $? > "$OUT/run2.rc"
ls "$MNT/run/checkpoints" > "$OUT/run2.ls"
rm "$MNT/filler"
train train.max_steps=3 > "$OUT/run3.log" 2>&1; echo $? > "$OUT/run3.rc"
ls "$MNT/run/checkpoints" > "$OUT/run3.ls"
cp "$MNT/run/metrics.jsonl" "$OUT/"
"""


def _can_mount_tmpfs() -> bool:
    probe = "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d && umount $d && rmdir $d"
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", probe], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare -rm (user + mount namespaces) for a tmpfs")
def test_a_save_into_a_full_filesystem_stops_with_the_message_and_the_next_start_works(tmp_path):
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    env = {**os.environ, "MNT": str(mnt), "OUT": str(out), "TINY": " ".join(TINY)}
    subprocess.run(
        ["unshare", "-rm", "bash", "-c", FULL_DISK_SCENARIO], cwd=ROOT, env=env, timeout=900, check=True
    )
    logs = {n: (out / f"run{n}.log").read_text() for n in (1, 2, 3)}
    assert (out / "run1.rc").read_text().strip() == "0", logs[1]
    # The save of step 3 hit the full disk: a clear message, exit 1, step 2 intact, no .tmp left.
    assert (out / "run2.rc").read_text().strip() == "1", logs[2]
    assert "the first save will fail unless space is freed" in logs[2]
    message = next(line for line in logs[2].splitlines() if line.startswith("error: No space left on device"))
    assert "checkpoint of step 3 into " in message and "step_000003.tmp needs about " in message
    assert "(the size of step 2)" in message and "the previous checkpoint, step 2, is intact" in message
    assert "Traceback" not in logs[2]
    assert (out / "run2.ls").read_text().split() == ["latest", "step_000002"]
    # Space back: the same command resumes from step 2 and finishes.
    assert (out / "run3.rc").read_text().strip() == "0", logs[3]
    assert "resuming from" in logs[3] and "at step 2" in logs[3]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    assert (out / "run3.ls").read_text().split() == ["latest", "step_000003"]


def test_a_run_resumes_on_another_trainer_layout_through_a_universal_checkpoint(tmp_path):
    """The issue's command pair: 2 ranks (ZeRO-2) for 4 steps, then 1 rank at ZeRO-3 to step 8."""
    run_dir = tmp_path / "run"

    def train(*overrides):
        cmd = cli_train(*TINY, f"run.dir={run_dir}", *QUIET, *overrides)
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)

    first = train("train.num_ranks=2", "train.max_steps=4")
    assert first.returncode == 0, first.stdout + first.stderr
    second = train("train.num_ranks=1", "train.zero_stage=3", "train.max_steps=8")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "checkpoint step 4 was saved with train.num_ranks=2 train.zero_stage=2; converting it for " \
        "train.num_ranks=1 train.zero_stage=3" in second.stdout  # fmt: skip
    assert "done: steps 4->8" in second.stdout  # continued at step 5
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, 9))  # each once
    state = ckpt.read_state(ckpt.step_dir(str(run_dir), 8))
    assert (state.trainer_layout.num_ranks, state.trainer_layout.zero_stage) == (1, 3)
    assert not any(name.endswith(".tmp") for name in os.listdir(ckpt.checkpoints_root(str(run_dir))))


def _adam_step(checkpoint_dir) -> int:
    import torch

    path = os.path.join(checkpoint_dir, "trainer", "trainer", "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    optim = torch.load(path, map_location="cpu", weights_only=False)
    return int(next(iter(optim["optimizer_state_dict"]["base_optimizer_state"]["state"].values()))["step"])


def test_async_checkpoints_hold_their_step_and_resume_exactly(tmp_path):
    from tests.integration.test_e2e import module_weights
    from trainer.worker import state_dict_digest

    run_dir = tmp_path / "run"
    common = ["run.async_checkpoint=true", "run.checkpoint_every=1", "run.keep_checkpoints=5", *QUIET]
    first = run_training(tiny_config(run_dir, "train.max_steps=3", *common))
    assert first.last_step == 3 and ckpt.committed_steps(str(run_dir)) == [1, 2, 3]
    for step in (1, 2, 3):  # written while later steps trained, yet each holds its own step's state
        path = ckpt.step_dir(str(run_dir), step)
        assert verify(path) is None
        assert module_weights(path)[1] == step and _adam_step(path) == step
    saved_weights, _ = module_weights(ckpt.step_dir(str(run_dir), 3))

    second = run_training(tiny_config(run_dir, "train.max_steps=5", *common))
    assert second.first_step == 3 and second.last_step == 5
    assert second.start_weights_digest == state_dict_digest(saved_weights)  # resumed from step 3 exactly
    assert _adam_step(ckpt.step_dir(str(run_dir), 5)) == 5
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3, 4, 5]
