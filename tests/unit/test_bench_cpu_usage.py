"""The CPU accounting of the GPU rollout benchmark (benchmarks/_cpu_usage.py), checked on CPU: a run's
client CPU comes from the clock it is given, the engine core's from the child processes, and a
profile names the function that used the time."""

from __future__ import annotations

import cProfile
import subprocess
import sys
import time

from benchmarks._cpu_usage import measured, top_functions

SPIN = "import time\nend = time.monotonic() + 30\nwhile time.monotonic() < end: pass\n"


def spin(seconds: float) -> int:
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        n += 1
    return n


def test_a_run_counts_the_childs_cpu_as_engine_core_and_the_given_clock_as_client():
    child = subprocess.Popen([sys.executable, "-c", SPIN])  # stands in for vLLM's engine core
    try:
        time.sleep(0.3)  # started and spinning
        out, waiting = measured(lambda: time.sleep(1.0) or "done", time.thread_time)
        _, computing = measured(lambda: spin(1.0), time.thread_time)
    finally:
        child.kill()
        child.wait()
    assert out == "done"
    assert 0.95 < waiting.seconds < 5 and waiting.client_cpu_s < 0.1
    # the child had a core (or a share of one on a loaded 2-core machine) throughout
    assert waiting.engine_core_cpu_s > 0.15, waiting
    assert computing.client_cpu_s > 0.15, computing
    figures = computing.as_dict()
    assert figures["client_busy"] == round(computing.client_cpu_s / computing.seconds, 3)
    assert set(figures) == {"seconds", "client_cpu_s", "engine_core_cpu_s", "client_busy", "engine_core_busy"}


def test_the_profile_puts_the_function_that_used_the_time_first():
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(3):
        spin(0.1)
    time.sleep(0.1)
    profile.disable()
    rows = top_functions(profile, 5)
    assert len(rows) <= 5
    assert rows[0]["function"].endswith("(spin)") and rows[0]["calls"] == 3, rows
    assert rows[0]["cumulative_s"] >= 0.25 and 0 < rows[0]["own_s"] <= rows[0]["cumulative_s"]
