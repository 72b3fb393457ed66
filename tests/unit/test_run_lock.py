"""The run lock: one run per run directory; a stale lock is taken over, a live one refused."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time

import pytest

from areal_like.run_lock import LOCK_FILE, RunDirLocked, RunLock

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _hold_lock(run_dir: str, ready, release) -> None:
    lock = RunLock.acquire(run_dir)
    ready.set()
    release.wait(60)
    lock.release()


@pytest.fixture
def held_by_another_process(tmp_path):
    """``tmp_path/run`` locked by a live child process until the test ends."""
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(str(tmp_path / "run"), ready, release))
    proc.start()
    assert ready.wait(60), "the lock-holding child did not start"
    yield tmp_path / "run", proc.pid
    release.set()
    proc.join(30)


def test_a_second_run_on_a_locked_dir_is_refused_naming_the_holder(held_by_another_process):
    run_dir, pid = held_by_another_process
    with pytest.raises(RunDirLocked) as err:
        RunLock.acquire(str(run_dir))
    assert f"pid {pid} on host {socket.gethostname()}" in str(err.value)
    assert "another run.dir" in str(err.value)


def test_a_released_lock_can_be_taken_again_and_records_the_holder(tmp_path):
    first = RunLock.acquire(str(tmp_path))
    holder = json.loads((tmp_path / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(RunDirLocked):  # a second open file in this very process is refused too
        RunLock.acquire(str(tmp_path))
    first.release()
    first.release()  # idempotent
    RunLock.acquire(str(tmp_path)).release()


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(
        json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": time.time() - 60})
    )
    with caplog.at_level(logging.WARNING, logger="areal_like.run_lock"):
        lock = RunLock.acquire(str(tmp_path))
    assert f"stale lock of pid {dead.pid}" in caplog.text and "that process is gone" in caplog.text
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_lock_written_on_another_host_is_refused_with_the_way_to_take_it_over(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "node-7", "started": time.time()}))
    with pytest.raises(RunDirLocked) as err:
        RunLock.acquire(str(tmp_path))
    assert "pid 1 on host node-7" in str(err.value) and f"delete {tmp_path / LOCK_FILE}" in str(err.value)


def test_cli_train_on_a_locked_dir_exits_2_before_starting_anything(held_by_another_process):
    run_dir, pid = held_by_another_process
    result = subprocess.run(
        [sys.executable, "-m", "areal_like.cli", "train", "--config", "configs/quickstart.yaml",
         f"run.dir={run_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"is in use by pid {pid}" in result.stderr and "Traceback" not in result.stderr
    assert sorted(os.listdir(run_dir)) == [LOCK_FILE]  # no config.yaml, model or metrics written
