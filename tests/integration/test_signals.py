"""SIGTERM during a run: the current step finishes, a checkpoint is written, Ray is shut down, and
re-running the same command resumes with no lost or repeated steps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.integration.test_e2e import ROOT, TINY, cli_train, read_jsonl
from tests.integration.test_fault_tolerance import descendants

pytestmark = pytest.mark.slow


def run_raylets(pid: int) -> set[int]:
    """The raylets of the Ray instance this run started (its descendants; other Ray instances on the
    machine, e.g. another test session's, are not counted)."""
    return {p for p, args in descendants(pid) if "/raylet" in args.split(" ")[0]}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"  # a zombie is gone, waiting to be reaped
    except FileNotFoundError:
        return False


def train_command(run_dir, max_steps):
    return cli_train(
        *TINY,
        f"run.dir={run_dir}",
        f"train.max_steps={max_steps}",
        "run.checkpoint_every=1000",
        "eval.enabled=false",
        "run.plot=false",
    )


def test_sigterm_checkpoints_and_the_run_resumes_without_gaps(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        train_command(run_dir, 500), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(read_jsonl(metrics)) >= 3:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read()
    raylets = run_raylets(proc.pid)
    assert raylets, "the run started no Ray instance of its own"
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "stopped by SIGTERM" in output

    steps = [r["step"] for r in read_jsonl(metrics)]
    last = steps[-1]
    assert steps == list(range(1, last + 1))
    assert (run_dir / "checkpoints" / f"step_{last:06d}").is_dir()  # saved on the signal, not on schedule
    assert json.loads((run_dir / "summary.json").read_text())["stopped_by"] == "SIGTERM"
    deadline = time.time() + 10
    while time.time() < deadline and any(alive(p) for p in raylets):
        time.sleep(0.2)
    assert not [p for p in raylets if alive(p)]  # the run's Ray instance is gone, no orphans

    resumed = subprocess.run(
        train_command(run_dir, last + 2), cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert [r["step"] for r in read_jsonl(metrics)] == list(range(1, last + 3))
    assert os.path.isdir(run_dir / "checkpoints" / f"step_{last + 2:06d}")
