"""Where a benchmark's CPU time goes: the CPU seconds of this process's children (vLLM's engine-core
processes), a measured run's wall and CPU seconds, and the heaviest functions of a cProfile."""

from __future__ import annotations

import cProfile
import pstats
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any


def children_cpu_seconds() -> dict[int, float]:
    """User + system CPU seconds of every live descendant process, by pid."""
    import psutil

    out = {}
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        out[child.pid] = times.user + times.system
    return out


@dataclass
class RunCPU:
    """One measured run: wall seconds, CPU seconds of the client (the threads given by ``client``)
    and of the child processes (the engine core), and each as a share of the wall time."""

    seconds: float
    client_cpu_s: float
    engine_core_cpu_s: float

    def as_dict(self) -> dict[str, float]:
        out = {k: round(v, 4) for k, v in asdict(self).items()}
        out["client_busy"] = round(self.client_cpu_s / self.seconds, 3)
        out["engine_core_busy"] = round(self.engine_core_cpu_s / self.seconds, 3)
        return out


def measured(run: Callable[[], Any], client_cpu: Callable[[], float]) -> tuple[Any, RunCPU]:
    """``run()``'s result and its ``RunCPU``. ``client_cpu()`` reads the client's CPU seconds so far
    (for example ``time.thread_time`` of each client thread, summed)."""
    cores, client = children_cpu_seconds(), client_cpu()
    start = time.perf_counter()
    out = run()
    seconds = time.perf_counter() - start
    client = client_cpu() - client
    after = children_cpu_seconds()
    core = sum(v - cores.get(pid, 0.0) for pid, v in after.items())
    return out, RunCPU(seconds, client, core)


def top_functions(profile: cProfile.Profile, n: int = 25) -> list[dict[str, Any]]:
    """The ``n`` functions with the most own time in ``profile``: where, calls, own and cumulative s."""
    stats = pstats.Stats(profile).stats
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:n]
    return [
        {
            "function": f"{file}:{line}({name})",
            "calls": calls,
            "own_s": round(own, 4),
            "cumulative_s": round(cumulative, 4),
        }
        for (file, line, name), (_, calls, own, cumulative, _) in rows
    ]
