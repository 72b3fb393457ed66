"""Faults a new user meets, end to end through the CLI: a stop signal while no batch can come, a
killed dispatcher or datastore controller, a killed driver (no Ray process may outlive it)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time

import pytest

from tests.integration.test_e2e import ROOT, TINY, cli_train

pytestmark = pytest.mark.slow

QUIET = ["eval.enabled=false", "run.plot=false"]


@contextlib.contextmanager
def running(cmd: list[str]):
    """The CLI as a subprocess (output on a pipe); killed if the test leaves it running."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for_line(proc: subprocess.Popen, needle: str, timeout_s: float = 300.0) -> list[str]:
    """Read the run's output until a line contains ``needle``; the lines read so far."""
    lines, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"no line with {needle!r} within {timeout_s}s:\n{''.join(lines)}")


def test_sigint_while_no_batch_can_come_checkpoints_and_stops_within_seconds(tmp_path):
    # Every reward sleeps past a long timeout, one call at a time: no batch for minutes.
    run_dir = tmp_path / "run"
    cmd = cli_train(
        *TINY,
        *QUIET,
        f"run.dir={run_dir}",
        "train.max_steps=5",
        "task.reward_fn=tests.unit.reward_fixtures:sleep_unless_fast",
        "task.reward_timeout_s=300",
        "task.reward_pool.concurrency=1",
    )
    with running(cmd) as proc:
        wait_for_line(proc, "placement:")
        time.sleep(8)  # generation started; the reward pool is inside a 300 s call
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
        stop_s = time.monotonic() - sent
    assert proc.returncode == 130, output
    assert "stopped by SIGINT after step 0" in output
    assert (run_dir / "checkpoints" / "step_000000").is_dir(), output
    assert stop_s < 45, stop_s  # checkpoint and Ray shutdown included, on a shared 2-core machine
    print(f"stopped {stop_s:.1f} s after SIGINT")
