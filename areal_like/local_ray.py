"""A local Ray instance whose processes die with the driver, however the driver ends.

``ray.init(address="local")`` starts Ray's processes (GCS, raylet, dashboard, monitors) as children
of the driver, and the raylet starts its agents (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``)
and the workers. ``ray.shutdown`` ends them, but a driver killed with SIGKILL runs no code: the
raylet and workers then exit on their own while the two agents stay (about 180 MB and a port each,
ignoring SIGTERM), one pair per killed run.

``init`` therefore starts, next to Ray, a small reaper process in a session of its own (so Ctrl-C
and a kill of the driver's process group do not reach it). It holds the read end of a pipe whose
write end only the driver has, and every second records the processes Ray started (the driver's
children that appeared during ``ray.init``, and their descendants, each with its start time so a
reused pid is never hit). When the pipe closes (the driver exited, was killed, or called
``shutdown``), it SIGKILLs every recorded process still alive, then exits.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

logger = logging.getLogger(__name__)

_REAPER = r"""
import json, os, select, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)

def start_time(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None

def children(pid):
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):  # children of every thread, not just the main one
            with open(f"/proc/{pid}/task/{task}/children", "rb") as f:
                found.extend(int(c) for c in f.read().split())
    except (OSError, ValueError):
        pass
    return found

tracked = {pid: start_time(pid) for pid in json.loads(sys.argv[1])}
while True:
    for pid in list(tracked):
        if start_time(pid) == tracked[pid]:
            for child in children(pid):
                tracked.setdefault(child, start_time(child))
    ready, _, _ = select.select([0], [], [], 1.0)
    if ready and not os.read(0, 1):
        break
for pid, started in tracked.items():
    if started is not None and start_time(pid) == started:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
"""

_reaper: subprocess.Popen | None = None


def init(num_cpus: int | None, **kwargs) -> None:
    """``ray.init(address="local", ...)`` plus the reaper (Linux; elsewhere plain ``ray.init``)."""
    global _reaper
    import ray

    before = set(_children(os.getpid()))
    ray.init(address="local", num_cpus=num_cpus, **kwargs)
    if not sys.platform.startswith("linux"):
        return
    started = sorted(set(_children(os.getpid())) - before)
    _reaper = subprocess.Popen(
        [sys.executable, "-c", _REAPER, json.dumps(started)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    logger.info("local Ray: %d processes, reaper pid %d", len(started), _reaper.pid)


def shutdown() -> None:
    """``ray.shutdown``, then the reaper ends what is left of the instance."""
    global _reaper
    import ray

    ray.shutdown()
    if _reaper is not None:
        assert _reaper.stdin is not None, "the reaper is started with stdin=PIPE"
        _reaper.stdin.close()
        try:
            _reaper.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _reaper.kill()
        _reaper = None


def _children(pid: int) -> list[int]:
    """Children of every thread of ``pid`` (Linux /proc)."""
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found.extend(int(c) for c in f.read().split())
    except OSError:
        pass
    return found
