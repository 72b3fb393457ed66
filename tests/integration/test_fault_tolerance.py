"""A rollout worker killed mid-run is replaced, re-synced and put back; the run finishes. With the
weight-reallocation plan, the plan's group is rebuilt around the replacement first."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.integration.test_e2e import ROOT, TINY, cli_train, read_jsonl

pytestmark = pytest.mark.slow


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process below ``pid`` (the run's own Ray workers only)."""
    rows = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    children: dict[int, list[tuple[int, str]]] = {}
    for row in rows.splitlines():
        parts = row.split(None, 2)
        if len(parts) == 3:
            children.setdefault(int(parts[1]), []).append((int(parts[0]), parts[2]))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child[0])
    return found


REALLOC = [
    "realloc.enabled=true",
    "realloc.backend=gloo",
    "realloc.bucket_mb=1",
    "realloc.timeout_s=15",
    "realloc.connect_timeout_s=120",
]


@pytest.mark.parametrize("weights", ["object_store", "realloc_plan"])
def test_a_killed_rollout_worker_is_restarted_and_the_run_finishes(tmp_path, weights):
    run_dir = tmp_path / "run"
    cmd = cli_train(
        *TINY,
        f"run.dir={run_dir}",
        "train.max_steps=8",
        "eval.enabled=false",
        "run.plot=false",
        *(REALLOC if weights == "realloc_plan" else []),
    )
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(read_jsonl(metrics)) >= 2:
            break
        time.sleep(0.2)
    workers = [pid for pid, args in descendants(proc.pid) if args.startswith("ray::RolloutWorker")]
    assert proc.poll() is None and len(workers) == 1, workers
    os.kill(workers[0], signal.SIGKILL)

    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    records = read_jsonl(metrics)
    assert [r["step"] for r in records] == list(range(1, 9))  # the run went on to the end
    assert records[-1]["rollout/engines_restarted_total"] >= 1
    assert records[-1]["rollout/engines_active"] == 1  # back in rotation
    if weights == "realloc_plan":
        assert "rebuilding the weight-reallocation group" in output
        assert "synced and started" in output
    else:
        assert "restarted and back in rotation" in output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["engines_in_sync"]  # the replacement holds the trainer's weights (sha256)


def test_the_launcher_resumes_a_failed_run_a_bounded_number_of_times(tmp_path):
    env = {**os.environ, "AREAL_LIKE_MAX_RESTARTS": "1"}
    failing = [
        "bash",
        "scripts/train.sh",
        "configs/quickstart.yaml",
        f"run.dir={tmp_path / 'a'}",
        "run.actor_timeout_s=0.001",
    ]  # every attempt times out waiting for the trainer
    result = subprocess.run(failing, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    assert "resuming from the latest checkpoint (restart 1/1)" in result.stderr
    assert "after 1 restarts; giving up" in result.stderr

    bad_config = [
        "bash",
        "scripts/train.sh",
        "configs/quickstart.yaml",
        f"run.dir={tmp_path / 'b'}",
        "rollout.max_staleness=-1",
    ]
    result = subprocess.run(bad_config, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "restart" not in result.stderr  # config errors are not retried
