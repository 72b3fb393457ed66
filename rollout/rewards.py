"""Reward functions run in a pool of worker processes, with a per-call timeout and counted retries.

Plugging in a reward: any importable ``fn(response: str, answer: str) -> float`` in a module that
does not import torch. Name it in the run config as ``task.reward_fn=package.module:function`` (the
attribute may be dotted); it replaces the task's own reward, is imported once at startup in the
driver (a bad path fails before any actor starts) and once per reward worker process. Built in:
``areal_like.tasks.arithmetic:addition_reward`` (synthetic addition), ``areal_like.tasks.math_reward:
math_reward`` (GSM8K/MATH answers, math-verify) and ``areal_like.tasks.code_reward:code_reward`` (test
cases run in ``areal_like.tasks.sandbox``). A function that needs more than ``task.reward_timeout_s`` per
item scores 0.0 'timeout'.

Dataflow:
- ``RewardPool.score`` (caller's thread) cuts a batch into chunks and keeps one chunk in flight per
  worker. It blocks in ``connection.wait`` on the workers' pipes, at most until the earliest worker
  deadline, and returns when every item has a ``RewardResult``.
- Each worker is a fresh interpreter (``python -c``; like "spawn", since the caller has torch and
  threads and fork is unsafe) talking over a socketpair ``Connection``. It imports the reward
  function once, then for each item of a chunk: bumps a call counter in a shared memory page, arms a
  SIGALRM timer of ``timeout_s``, calls the function. A call that raises scores 0.0 'error'; one the
  timer interrupts scores 0.0 'timeout'; the worker lives on. It sends the chunk's results in one
  message (per-item messages cost ~10 ms per 256 items in wakeups and syscalls).
- Backstop: a call the timer cannot interrupt (stuck in C code holding the GIL, or a function that
  clears the alarm) stops the worker's call counter, which the parent samples a few times per
  timeout. A worker whose counter has not moved for ``timeout_s + _HARD_KILL_GRACE_S`` is killed
  (at most 1.25 times that after the call began): the item it was running scores 0.0 'timeout', the
  rest of its chunk (finished items included: their results died with it) is requeued, and a fresh
  worker replaces it. A worker that dies mid-call is handled the same way, except that the item it
  was running is first retried on the fresh worker, up to ``max_retries`` times (counted as
  'retries'), before it scores 0.0 'error': a crash can be the machine's (OOM killer), not the
  function's. Raising and timing out are the function's own verdicts and are not retried. A
  worker found dead while idle is replaced with no item blamed.
- Shutdown: ``close()`` sends each worker None and kills any still alive after a second; a pool never
  closed is killed by a finalizer at garbage collection or interpreter exit. A worker whose parent
  vanished sees EOF on its pipe and exits.

Why not ``multiprocessing`` "spawn": it re-runs the caller's ``__main__`` script in every child,
importing torch into each worker (or crashing a script without an ``if __name__ == "__main__"`` guard).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib
import json
import logging
import math
import mmap
import multiprocessing as mp
import numbers
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

logger = logging.getLogger(__name__)

RewardFn = Callable[[str, str], float]

_HARD_KILL_GRACE_S = 1.0
"""Silence past ``timeout_s`` after which a worker is killed: its in-worker timer had its chance."""
_START_TIMEOUT_S = 60.0
"""Longest wait for a new worker to import its reward function and report ready."""
_CHUNKS_PER_WORKER = 4
"""A batch is cut into about this many chunks per worker, so one slow chunk does not idle the rest."""
_SAMPLES_PER_TIMEOUT = 4
"""How often, per ``timeout_s + _HARD_KILL_GRACE_S``, a busy worker's call counter is read."""
_COUNTER = struct.Struct("<q")
"""Layout of the shared page: the number of calls the worker has started."""


@dataclass(frozen=True)
class RewardResult:
    """The reward of one (response, answer) item."""

    value: float
    """The reward function's return value as a float; 0.0 unless status is 'ok'."""
    status: str
    """'ok', 'error' (raised, returned a non-finite or non-number, or its worker died) or 'timeout'."""
    error: str | None = None
    """Why the status is not 'ok' (exception type and message); None when ok."""


def resolve_reward_fn(path: str) -> RewardFn:
    """Import "package.module:function" (the attribute may be dotted) and return the callable."""
    module_name, sep, attr_path = path.partition(":")
    if not sep or not module_name or not attr_path or ":" in attr_path:
        raise ValueError(f"reward function path {path!r} is malformed; expected 'package.module:function'")
    try:
        target = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward function path {path!r}: cannot import module {module_name!r}: {e}") from e
    for attr in attr_path.split("."):
        if not hasattr(target, attr):
            raise ValueError(f"reward function path {path!r}: {target!r} has no attribute {attr!r}")
        target = getattr(target, attr)
    if not callable(target):
        raise ValueError(f"reward function path {path!r} names a {type(target).__name__}, not a callable")
    return target


class RewardPool:
    """Scores (response, answer) pairs with the reward function at ``fn_path`` in worker processes.

    Workers start on the first ``score`` call and are reused. Calls from several threads are
    serialised by a lock.
    """

    def __init__(self, fn_path: str, num_workers: int = 1, timeout_s: float = 5.0, max_retries: int = 1):
        if num_workers < 1:
            raise ValueError(f"num_workers={num_workers}; must be >= 1")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s}; must be > 0")
        if max_retries < 0:
            raise ValueError(f"max_retries={max_retries}; must be >= 0 (0 = never retry)")
        resolve_reward_fn(fn_path)  # a bad path fails here, in the caller, not in a worker
        self.fn_path = fn_path
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self._workers: list[_Worker] = []
        """Mutated in place only: the finalizer holds this list."""
        self._lock = threading.Lock()
        self._counters = {"ok": 0, "error": 0, "timeout": 0, "worker_restarts": 0, "retries": 0}
        self._closed = False
        self._finalizer = weakref.finalize(self, _kill_all, self._workers)

    @property
    def counters(self) -> dict[str, int]:
        """Totals over the pool's life: items per final status ('ok', 'error', 'timeout'), worker
        restarts, and retries (items run again because their worker died while running them)."""
        return dict(self._counters)

    def score(self, items: list[tuple[str, str]]) -> list[RewardResult]:
        """One result per (response, answer) item, in order."""
        with self._lock:
            if self._closed:
                raise RuntimeError("RewardPool.score called after close()")
            if not items:
                return []
            try:
                if not self._workers:
                    self._start_workers()
                results = self._run_batch(items)
            except BaseException:
                self._stop_workers()  # a worker failed to start: the next call starts afresh
                raise
            for result in results:
                self._counters[result.status] += 1
        return results

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        with self._lock:
            self._closed = True
            self._stop_workers()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _stop_workers(self) -> None:
        for worker in self._workers:
            worker.stop()
        self._workers.clear()

    def _start_workers(self) -> None:
        started = time.perf_counter()
        self._workers.extend(_Worker(self.fn_path, self.timeout_s) for _ in range(self.num_workers))
        for worker in self._workers:
            worker.wait_ready()
        logger.info(
            "reward pool: %d workers for %s ready in %.2f s",
            self.num_workers, self.fn_path, time.perf_counter() - started,
        )  # fmt: skip

    def _run_batch(self, items: list[tuple[str, str]]) -> list[RewardResult]:
        results: list[RewardResult | None] = [None] * len(items)
        chunk_size = max(1, math.ceil(len(items) / (self.num_workers * _CHUNKS_PER_WORKER)))
        pending = collections.deque(
            [_Job(i, *items[i]) for i in range(start, min(start + chunk_size, len(items)))]
            for start in range(0, len(items), chunk_size)
        )
        while True:
            for worker in list(self._workers):
                if not worker.in_flight and pending:
                    if worker.process.poll() is not None:  # died while idle: no item to blame
                        worker = self._restart_worker(worker, f"exited with code {worker.process.returncode}")
                    worker.send(pending.popleft())
            busy = [w for w in self._workers if w.in_flight]
            if not busy:
                break
            wait([w.conn for w in busy], timeout=max(0.0, min(w.deadline for w in busy) - time.monotonic()))
            for worker in busy:
                # Collect before checking the deadline, so a result that just arrived is not timed out.
                failure = worker.collect(results)
                if failure is None and worker.in_flight and worker.is_stuck():
                    failure = RewardResult(0.0, "timeout", f"no progress in {self.timeout_s}s; worker killed")
                if failure is not None:
                    # Blame the item it was running (or retry it, if its worker crashed); requeue the
                    # rest of its chunk (finished items included: their results died with the worker).
                    current = worker.current_job()
                    rest = [job for job in worker.in_flight if job is not current]
                    if failure.status == "error" and current.attempt < self.max_retries:
                        rest.insert(0, dataclasses.replace(current, attempt=current.attempt + 1))
                        self._counters["retries"] += 1
                    else:
                        results[current.index] = failure
                    if rest:
                        pending.appendleft(rest)
                    self._restart_worker(worker, f"{failure.error} on batch item {current.index}")
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _restart_worker(self, worker: _Worker, reason: str) -> _Worker:
        logger.warning("reward worker pid %s: %s; restarting it", worker.process.pid, reason)
        worker.stop(kill=True)
        replacement = _Worker(self.fn_path, self.timeout_s)
        self._workers[self._workers.index(worker)] = replacement
        replacement.wait_ready()
        self._counters["worker_restarts"] += 1
        return replacement


class _Worker:
    """Parent-side handle of one worker process and the chunk it is working on."""

    def __init__(self, fn_path: str, timeout_s: float):
        self.timeout_s = timeout_s
        self.in_flight: list[_Job] = []
        """The chunk sent and not yet answered, in the order the worker runs it."""
        self.deadline = math.inf
        """When to read the call counter next (while a chunk is in flight)."""
        self._stuck_after_s = timeout_s + _HARD_KILL_GRACE_S
        self._counter_at_send = 0
        self._counter_seen = 0
        self._last_progress = 0.0
        """monotonic time at which the counter was first seen at its current value."""
        with tempfile.TemporaryFile() as page_file:  # the mapping outlives the file object
            page_file.truncate(mmap.PAGESIZE)
            self._page = mmap.mmap(page_file.fileno(), mmap.PAGESIZE)
            self.conn, child_conn = mp.Pipe(duplex=True)  # a socketpair on POSIX
            fds = (child_conn.fileno(), page_file.fileno())
            argv = [json.dumps(sys.path), *map(str, fds), fn_path, repr(timeout_s)]
            self.process = subprocess.Popen(
                [sys.executable, "-c", _WORKER_BOOTSTRAP, *argv], pass_fds=fds, stdin=subprocess.DEVNULL
            )
            child_conn.close()

    def wait_ready(self) -> None:
        if not self.conn.poll(_START_TIMEOUT_S):
            self.stop(kill=True)
            raise RuntimeError(f"reward worker did not start within {_START_TIMEOUT_S}s")
        try:
            message = self.conn.recv()
        except EOFError:
            message = f"exited with code {self.process.wait(timeout=5.0)} before reporting ready"
        if message != "ready":
            self.stop(kill=True)
            raise RuntimeError(f"reward worker failed to start: {message}")

    def send(self, jobs: list[_Job]) -> None:
        # Read the counter before sending: a fast worker may start the first call before send returns.
        self._counter_at_send = self._counter_seen = self._calls_started()
        self.in_flight = jobs
        # A worker that dies just now fails the send; collect() then sees EOF and the pool replaces it.
        with contextlib.suppress(OSError):
            self.conn.send(jobs)
        self._last_progress = time.monotonic()
        self.deadline = self._last_progress + self._stuck_after_s / _SAMPLES_PER_TIMEOUT

    def collect(self, results: list[RewardResult | None]) -> RewardResult | None:
        """Store the chunk's results if they arrived; a failure result if the worker died."""
        try:
            if not self.conn.poll():
                return None
            chunk_results: list[RewardResult] = self.conn.recv()
        except (EOFError, OSError):
            try:
                exit_code = self.process.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                exit_code = None
            return RewardResult(0.0, "error", f"reward worker died (exit code {exit_code})")
        for job, result in zip(self.in_flight, chunk_results, strict=True):
            results[job.index] = result
        self.in_flight = []
        self.deadline = math.inf
        return None

    def is_stuck(self) -> bool:
        """Sample the call counter when due; stuck if it has not moved for ``timeout_s`` + grace."""
        now = time.monotonic()
        if now < self.deadline:
            return False
        calls_started = self._calls_started()
        if calls_started != self._counter_seen:
            self._counter_seen, self._last_progress = calls_started, now
        self.deadline = now + self._stuck_after_s / _SAMPLES_PER_TIMEOUT
        return now - self._last_progress >= self._stuck_after_s

    def current_job(self) -> _Job:
        """The item the worker was running (the first of the chunk if it had not started one)."""
        num_started = self._calls_started() - self._counter_at_send
        return self.in_flight[max(0, min(num_started, len(self.in_flight)) - 1)]

    def stop(self, kill: bool = False) -> None:
        """Ask the worker to exit (kill=False) and kill it if still alive after a second."""
        if not kill:
            with contextlib.suppress(OSError, ValueError, subprocess.TimeoutExpired):
                self.conn.send(None)
                self.process.wait(timeout=1.0)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=5.0)
        self.conn.close()
        self._page.close()

    def _calls_started(self) -> int:
        return _COUNTER.unpack_from(self._page)[0]


def _kill_all(workers: list[_Worker]) -> None:
    for worker in workers:
        if worker.process.poll() is None:
            worker.process.kill()


@dataclass(frozen=True)
class _Job:
    """Parent -> worker: one item to score; ``index`` is its position in the batch."""

    index: int
    response: str
    answer: str
    attempt: int = 0
    """How many times this item was already retried after its worker died."""


class _CallTimeout(BaseException):
    """Raised by the SIGALRM handler inside a reward call (a BaseException, so that a reward
    function's `except Exception` does not swallow it)."""


_WORKER_BOOTSTRAP = """\
import json, sys
sys.path[:] = json.loads(sys.argv[1])
from rollout.rewards import _worker_main
_worker_main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], float(sys.argv[5]))
"""
"""Worker entry: the caller's sys.path (the reward module imports as in the caller), then the loop."""


def _worker_main(conn_fd: int, page_fd: int, fn_path: str, timeout_s: float) -> None:
    """Worker process loop: import the function, then score each received chunk until None or EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    conn = Connection(conn_fd)
    page = mmap.mmap(page_fd, mmap.PAGESIZE)
    try:
        fn = resolve_reward_fn(fn_path)
    except Exception as e:
        conn.send(f"{type(e).__name__}: {e}")
        return
    in_call = False

    def on_alarm(signum: int, frame: object) -> None:
        if in_call:  # a signal delivered late, after the call returned, is ignored
            raise _CallTimeout

    use_alarm = hasattr(signal, "setitimer")
    if use_alarm:
        signal.signal(signal.SIGALRM, on_alarm)
    calls_started = 0
    conn.send("ready")
    while True:
        try:
            jobs: list[_Job] | None = conn.recv()
        except EOFError:
            return
        if jobs is None:
            return
        chunk_results = []
        for job in jobs:
            calls_started += 1
            _COUNTER.pack_into(page, 0, calls_started)
            try:
                in_call = True
                if use_alarm:
                    signal.setitimer(signal.ITIMER_REAL, timeout_s)
                try:
                    value = fn(job.response, job.answer)
                finally:
                    if use_alarm:
                        signal.setitimer(signal.ITIMER_REAL, 0)
                    in_call = False
                result = _checked(value)
            except _CallTimeout:
                result = RewardResult(0.0, "timeout", f"call exceeded {timeout_s}s")
            except Exception as e:
                result = RewardResult(0.0, "error", f"{type(e).__name__}: {e}"[:500])
            chunk_results.append(result)
        conn.send(chunk_results)


def _checked(value: object) -> RewardResult:
    """'ok' for a finite real number, else 'error' naming the offending value."""
    if isinstance(value, numbers.Real) and math.isfinite(float(value)):
        return RewardResult(float(value), "ok")
    return RewardResult(0.0, "error", f"reward function returned {value!r:.100}, expected a finite number")
