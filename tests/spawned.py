"""Run test jobs in spawned processes and collect what they report.

Each job is ``(fn, args)``; it is called as ``fn(*args, out)`` in a fresh ``spawn`` process and
puts ``(key, value)`` pairs on ``out``. ``run_spawned`` returns ``{key: value}`` once every process
has reported, and fails at once (not at the deadline) when one of them dies without reporting.
"""

from __future__ import annotations

import queue
import time

import pytest
import torch.multiprocessing as mp


def run_spawned(jobs, timeout_s: float = 480, what: str = "test process") -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=fn, args=(*args, out)) for fn, args in jobs]
    for p in procs:
        p.start()
    collected: dict = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(collected) < len(procs):
            try:
                key, value = out.get(timeout=2)
                collected[key] = value
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    pytest.fail(f"{what}(es) died with exit code(s) {dead}; see the captured output")
                if time.monotonic() > deadline:
                    pytest.fail(f"{what}(es) timed out after {timeout_s:.0f} s; got {sorted(collected)}")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return collected
