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
  deadline (or the batch budget, or a tick that checks for ``cancel``), and returns when every item
  has a ``RewardResult``.
- Each worker is a fresh interpreter (``python -c``; like "spawn", since the caller has torch and
  threads and fork is unsafe) talking over a socketpair ``Connection``. It imports the reward
  function once, then for each item of a chunk: bumps a call counter in a shared memory page, arms a
  SIGALRM timer of ``timeout_s``, calls the function. A call that raises scores 0.0 'error'; one the
  timer interrupts scores 0.0 'timeout'; the worker lives on. It sends the chunk's results in one
  message (per-item messages cost ~10 ms per 256 items in wakeups and syscalls).
- Concurrent timeouts: once a call of a batch has timed out, or has run a quarter of its timeout
  without computing (it sleeps or waits: it is stopped and run again), the function has shown it
  can hang, so the worker runs the rest of that batch's items concurrently, each in a child forked
  from the worker (the function is already imported; fork is safe, the worker has one thread),
  killed with its process group at its deadline. Up to ``concurrency`` children run at once, and a
  new one starts only while fewer than the machine's cores are busy computing (CPU time of each
  child's process tree, read from /proc every tick): calls that sleep or wait overlap freely, calls
  that compute are not slowed by each other into spurious timeouts. So a batch of N sleeping calls
  takes about 1.25 to 1.6 timeouts (a quarter for the first call to be found waiting, then all
  together), not N. A child that dies is retried like a worker that dies (below). The next batch
  starts concurrent too if this one had a timeout (a reward that hangs usually hangs again: 512
  sleeping calls then take ~1.1-1.2 timeouts), with no ramp if none of this batch's calls was seen
  computing; a batch with no timeout returns to the cheap sequential mode.
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
- Guards over a whole batch (``RewardPoolConfig``): a budget after which every unscored item scores
  'timeout' and the busy workers are killed (replaced at the next batch); a warning line (at most one
  per ``_WARN_EVERY_S``) when the share of failed items of a batch passes a threshold, and the
  failure rate of the last ``_WINDOW_ITEMS`` items for the run's metrics; and, when asked, a
  ``RewardFunctionBroken`` error when a batch is all errors (the run then stops naming the function).
- Shutdown: ``cancel()`` (from another thread) makes a ``score`` in progress raise
  ``RewardsCancelled`` within a tick, killing the busy workers; ``close()`` sends each worker None and
  kills any still alive after a second; a pool never closed is killed by a finalizer at garbage
  collection or interpreter exit. A worker whose parent vanished sees EOF on its pipe and exits; its
  forked children die with it (parent-death signal).

Why not ``multiprocessing`` "spawn": it re-runs the caller's ``__main__`` script in every child,
importing torch into each worker (or crashing a script without an ``if __name__ == "__main__"`` guard).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import json
import logging
import math
import mmap
import multiprocessing as mp
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait

from rollout.reward_worker import (
    _COUNTER,
    RewardFn,
    RewardResult,
    _Chunk,
    _ChunkReply,
    _Job,
    _WentConcurrent,
    resolve_reward_fn,
)

__all__ = [
    "RewardFn",
    "RewardFunctionBroken",
    "RewardPool",
    "RewardPoolConfig",
    "RewardResult",
    "RewardsCancelled",
    "resolve_reward_fn",
]

logger = logging.getLogger(__name__)

_HARD_KILL_GRACE_S = 1.0
"""Silence past ``timeout_s`` after which a worker is killed: its in-worker timer had its chance."""
_START_TIMEOUT_S = 60.0
"""Longest wait for a new worker to import its reward function and report ready."""
_CHUNKS_PER_WORKER = 4
"""A batch is cut into about this many chunks per worker, so one slow chunk does not idle the rest."""
_SAMPLES_PER_TIMEOUT = 4
"""How often, per ``timeout_s + _HARD_KILL_GRACE_S``, a busy worker's call counter is read."""
_CANCEL_TICK_S = 0.2
"""Longest ``score`` blocks without looking at ``cancel`` and the batch budget."""
_WINDOW_ITEMS = 1024
"""The failure rate reported for metrics covers this many most recent items."""
_WARN_EVERY_S = 30.0
"""At most one failure-rate warning line per pool per this many seconds (the next one counts the rest)."""
_MIN_ERRORS_TO_STOP = 64
"""An all-error batch stops the run only after this many errors in a row, so that one prompt with a
malformed ground truth (a group of errors) does not."""


@dataclass
class RewardPoolConfig:
    """How the reward pool keeps a slow or broken reward function from stalling or poisoning a run."""

    concurrency: int = 1024
    """Most calls one reward worker runs at once after a call of the batch timed out (each in a
    forked child; new ones start only while fewer than the machine's cores are busy computing).
    A batch of hanging calls larger than this takes one more timeout per ``concurrency`` calls
    (512 sleeping calls: ~0.7 MB each, 350 MB measured). 1 = always one call at a time (a batch of
    N hanging calls then takes N timeouts)."""
    batch_budget_s: float | None = None
    """Most seconds one batch (the groups a rollout worker scores together) may spend in the reward
    pool; items still unscored then score 0 'timeout'. None = no budget (each call still has
    ``task.reward_timeout_s``)."""
    warn_failure_rate: float = 0.5
    """Log a warning when more than this share of a batch's rewards failed ('error' or 'timeout');
    ``rollout/reward_failure_rate`` reports the share over the last 1024 items. 1.0 = never warn."""
    stop_if_all_error: bool = True
    """Stop the run, naming the reward function and its error, when every reward of a batch raised or
    returned a non-number (and at least 64 in a row did): a broken reward function trains nothing."""

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"task.reward_pool.concurrency={self.concurrency}: must be >= 1")
        if self.batch_budget_s is not None and not self.batch_budget_s > 0:
            raise ValueError(
                f"task.reward_pool.batch_budget_s={self.batch_budget_s}: must be > 0 seconds or null "
                "(no budget)"
            )
        if not 0.0 <= self.warn_failure_rate <= 1.0:
            raise ValueError(
                f"task.reward_pool.warn_failure_rate={self.warn_failure_rate}: must be in [0, 1] "
                "(a share of the batch; 1.0 never warns)"
            )


class RewardFunctionBroken(RuntimeError):
    """Every reward of a batch was an error (``RewardPoolConfig.stop_if_all_error``)."""


class RewardsCancelled(RuntimeError):
    """``RewardPool.cancel`` was called while ``score`` ran; the batch has no results."""


class RewardPool:
    """Scores (response, answer) pairs with the reward function at ``fn_path`` in worker processes.

    Workers start on the first ``score`` call and are reused. Calls from several threads are
    serialised by a lock. ``config`` None: no budget, warnings at half the batch failing, and an
    all-error batch is scored, not raised (a run's pool gets ``task.reward_pool``).
    """

    def __init__(
        self,
        fn_path: str,
        num_workers: int = 1,
        timeout_s: float = 5.0,
        max_retries: int = 1,
        config: RewardPoolConfig | None = None,
    ):
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
        self.config = config or RewardPoolConfig(stop_if_all_error=False)
        self._workers: list[_Worker] = []
        """Mutated in place only: the finalizer holds this list."""
        self._lock = threading.Lock()
        self._counters = {"ok": 0, "error": 0, "timeout": 0, "worker_restarts": 0, "retries": 0}
        self._recent: collections.deque[bool] = collections.deque(maxlen=_WINDOW_ITEMS)
        """Per recent item: True when it failed ('error' or 'timeout')."""
        self._errors_in_a_row = 0
        self._warned_batches = 0
        self._unwarned_batches = 0
        self._last_warning = -math.inf
        self._batches = 0
        self._scoring = False
        self._cancel_requested = False
        self._closed = False
        self._finalizer = weakref.finalize(self, _kill_all, self._workers)

    @property
    def counters(self) -> dict[str, int]:
        """Totals over the pool's life: items per final status ('ok', 'error', 'timeout'), worker
        restarts, and retries (items run again because their worker died while running them)."""
        return dict(self._counters)

    @property
    def recent_failure_rate(self) -> float:
        """Share of the last (up to 1024) items scored 'error' or 'timeout'; 0.0 before any."""
        return sum(self._recent) / len(self._recent) if self._recent else 0.0

    @property
    def warned_batches(self) -> int:
        """Batches whose failure share passed ``config.warn_failure_rate``."""
        return self._warned_batches

    def score(
        self, items: list[tuple[str, str]], more: Callable[[], list[tuple[str, str]]] | None = None
    ) -> list[RewardResult]:
        """One result per (response, answer) item, in order. Raises ``RewardFunctionBroken`` (after
        counting the batch) when the config asks to stop on an all-error batch, ``RewardsCancelled``
        when ``cancel`` was called meanwhile. ``more``: once the batch runs concurrently (its calls
        hang), called every tick for items to add to it (they run alongside rather than a timeout
        later); their results follow the others', in the order given."""
        with self._lock:
            if self._closed:
                raise RuntimeError("RewardPool.score called after close()")
            if not items:
                return []
            self._cancel_requested = False
            self._scoring = True
            try:
                if not self._workers:
                    self._start_workers()
                started = time.monotonic()
                results = self._run_batch(list(items), more)
            except RewardsCancelled:
                raise
            except BaseException:
                self._stop_workers()  # a worker failed to start: the next call starts afresh
                raise
            finally:
                self._scoring = False
            for result in results:
                self._counters[result.status] += 1
            self._after_batch(results, time.monotonic() - started)
        return results

    def cancel(self) -> None:
        """Make the ``score`` call in progress (if any) raise ``RewardsCancelled`` within a tick; a
        later ``score`` runs normally. Safe from any thread (the pool's owner is stopping)."""
        if self._scoring:
            self._cancel_requested = True

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        self.cancel()
        with self._lock:
            self._closed = True
            self._stop_workers()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _after_batch(self, results: list[RewardResult], seconds: float) -> None:
        """Failure window, warning line and the all-error stop (see the module docstring)."""
        failed = [r for r in results if r.status != "ok"]
        self._recent.extend(r.status != "ok" for r in results)
        for result in results:
            self._errors_in_a_row = self._errors_in_a_row + 1 if result.status == "error" else 0
        if failed and len(failed) > self.config.warn_failure_rate * len(results):
            self._warned_batches += 1
            self._unwarned_batches += 1
            now = time.monotonic()
            if now - self._last_warning >= _WARN_EVERY_S:
                num_errors = sum(r.status == "error" for r in failed)
                logger.warning(
                    "reward %s: %d of %d rewards of a batch failed (%d error, %d timeout) in %.1f s, above "
                    "task.reward_pool.warn_failure_rate=%.2f; they score 0 (%d such batches since the "
                    "last warning). First: %s",
                    self.fn_path, len(failed), len(results), num_errors, len(failed) - num_errors,
                    seconds, self.config.warn_failure_rate, self._unwarned_batches, failed[0].error,
                )  # fmt: skip
                self._last_warning, self._unwarned_batches = now, 0
        all_errors = all(r.status == "error" for r in results)
        if self.config.stop_if_all_error and all_errors and self._errors_in_a_row >= _MIN_ERRORS_TO_STOP:
            raise RewardFunctionBroken(
                f"reward function {self.fn_path}: all {len(results)} rewards of a batch were errors "
                f"({self._errors_in_a_row} in a row), e.g. {results[0].error!r}. A run with such a reward "
                "trains nothing: fix the function (check it on a few responses with "
                "rollout.rewards.resolve_reward_fn), or set task.reward_pool.stop_if_all_error=false "
                "to score errors 0 and go on"
            )

    def _stop_workers(self) -> None:
        for worker in self._workers:
            worker.stop()
        self._workers.clear()

    def _start_workers(self) -> None:
        started = time.perf_counter()
        self._workers.extend(self._new_worker() for _ in range(self.num_workers))
        for worker in self._workers:
            worker.wait_ready()
        logger.info(
            "reward pool: %d workers for %s ready in %.2f s",
            self.num_workers, self.fn_path, time.perf_counter() - started,
        )  # fmt: skip

    def _new_worker(self) -> _Worker:
        return _Worker(self.fn_path, self.timeout_s, self.config.concurrency, self.max_retries)

    def _run_batch(
        self, items: list[tuple[str, str]], more: Callable[[], list[tuple[str, str]]] | None
    ) -> list[RewardResult]:
        results: list[RewardResult | None] = [None] * len(items)
        self._batches += 1
        chunk_size = max(1, math.ceil(len(items) / (self.num_workers * _CHUNKS_PER_WORKER)))
        pending = collections.deque(_chunked(items, 0, chunk_size))
        chunk_ids = itertools.count()
        budget = self.config.batch_budget_s
        budget_deadline = time.monotonic() + budget if budget is not None else math.inf
        while True:
            for worker in list(self._workers):
                if not worker.in_flight and pending:
                    if worker.process.poll() is not None:  # died while idle: no item to blame
                        worker = self._restart_worker(worker, f"exited with code {worker.process.returncode}")
                    worker.send(_Chunk(self._batches, next(chunk_ids), pending.popleft()))
            # A worker that went concurrent runs the rest of the batch at once: deal it out, with
            # what the caller has ready by now.
            concurrent = [w for w in self._workers if w.concurrent_batch == self._batches]
            extra = more() if concurrent and more is not None else []
            if extra:
                pending.extend(_chunked(extra, len(results), chunk_size))
                results.extend([None] * len(extra))
            for i in range(len(pending) if concurrent else 0):
                concurrent[i % len(concurrent)].send(
                    _Chunk(self._batches, next(chunk_ids), pending.popleft())
                )
            busy = [w for w in self._workers if w.in_flight]
            if not busy:
                break
            next_event = min(budget_deadline, time.monotonic() + _CANCEL_TICK_S, *(w.deadline for w in busy))
            wait([w.conn for w in busy], timeout=max(0.0, next_event - time.monotonic()))
            for worker in busy:
                # Collect before checking the deadline, so a result that just arrived is not timed out.
                failure = worker.collect(results, self._counters)
                if failure is None and worker.in_flight and worker.is_stuck():
                    failure = RewardResult(0.0, "timeout", f"no progress in {self.timeout_s}s; worker killed")
                if failure is not None:
                    # Blame the item it was running (or retry it, if its worker crashed); requeue the
                    # rest of its chunks (finished items included: their results died with the worker).
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
            if self._cancel_requested:
                self._abort_busy_workers()
                raise RewardsCancelled(f"reward pool {self.fn_path}: cancelled while scoring a batch")
            if time.monotonic() >= budget_deadline:
                self._abort_busy_workers()
                why = f"the batch's reward budget of {budget}s (task.reward_pool.batch_budget_s) ran out"
                out_of_budget = RewardResult(0.0, "timeout", why)
                num_cut = 0
                for i, result in enumerate(results):
                    if result is None:
                        results[i], num_cut = out_of_budget, num_cut + 1
                logger.warning(
                    "reward %s: batch budget of %.1f s ran out; %d of %d items scored 'timeout'",
                    self.fn_path, budget, num_cut, len(items),
                )  # fmt: skip
                break
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _abort_busy_workers(self) -> None:
        """Kill the workers with a chunk in flight; the next batch replaces them (no item blamed)."""
        for worker in self._workers:
            if worker.in_flight:
                worker.stop(kill=True)
                worker.chunks.clear()

    def _restart_worker(self, worker: _Worker, reason: str) -> _Worker:
        logger.warning("reward worker pid %s: %s; restarting it", worker.process.pid, reason)
        worker.stop(kill=True)
        replacement = self._new_worker()
        self._workers[self._workers.index(worker)] = replacement
        replacement.wait_ready()
        self._counters["worker_restarts"] += 1
        return replacement


def _chunked(items: list[tuple[str, str]], first: int, chunk_size: int) -> list[list[_Job]]:
    """``items`` as jobs numbered from ``first`` in the batch, ``chunk_size`` to a chunk."""
    jobs = [_Job(first + i, *item) for i, item in enumerate(items)]
    return [jobs[start : start + chunk_size] for start in range(0, len(jobs), chunk_size)]


class _Worker:
    """Parent-side handle of one worker process and the chunk it is working on."""

    def __init__(self, fn_path: str, timeout_s: float, concurrency: int, max_retries: int):
        self.timeout_s = timeout_s
        self.chunks: dict[int, list[_Job]] = {}
        """Chunks sent and not yet answered (several only once the worker went concurrent)."""
        self.concurrent_batch = -1
        """The batch in which the worker said it runs calls concurrently (it then takes more chunks)."""
        self.deadline = math.inf
        """When to read the call counter next (while a chunk is in flight)."""
        self._stuck_after_s = timeout_s + _HARD_KILL_GRACE_S
        self._counter_at_send = 0
        self._counter_seen = 0
        self._last_progress = 0.0
        """monotonic time at which the counter was first seen at its current value."""
        self._stopped = False
        with tempfile.TemporaryFile() as page_file:  # the mapping outlives the file object
            page_file.truncate(mmap.PAGESIZE)
            self._page = mmap.mmap(page_file.fileno(), mmap.PAGESIZE)
            self.conn, child_conn = mp.Pipe(duplex=True)  # a socketpair on POSIX
            fds = (child_conn.fileno(), page_file.fileno())
            argv = [json.dumps(sys.path), *map(str, fds), fn_path, repr(timeout_s), str(concurrency)]
            argv.append(str(max_retries))
            self.process = subprocess.Popen(
                [sys.executable, "-c", _WORKER_BOOTSTRAP, *argv], pass_fds=fds, stdin=subprocess.DEVNULL
            )
            child_conn.close()

    @property
    def in_flight(self) -> list[_Job]:
        """Jobs sent and not yet answered, in the order the worker starts them."""
        return [job for jobs in self.chunks.values() for job in jobs]

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

    def send(self, chunk: _Chunk) -> None:
        if not self.chunks:
            # Read the counter before sending: a fast worker may start the first call before send returns.
            self._counter_at_send = self._counter_seen = self._calls_started()
            self._last_progress = time.monotonic()
            self.deadline = self._last_progress + self._stuck_after_s / _SAMPLES_PER_TIMEOUT
        self.chunks[chunk.chunk_id] = chunk.jobs
        # A worker that dies just now fails the send; collect() then sees EOF and the pool replaces it.
        with contextlib.suppress(OSError):
            self.conn.send(chunk)

    def collect(self, results: list[RewardResult | None], counters: dict[str, int]) -> RewardResult | None:
        """Store the results of every chunk answered so far; a failure result if the worker died."""
        try:
            while self.chunks and self.conn.poll():
                message: _ChunkReply | _WentConcurrent = self.conn.recv()
                if isinstance(message, _WentConcurrent):
                    self.concurrent_batch = message.batch
                    continue
                for job, result in zip(self.chunks.pop(message.chunk_id), message.results, strict=True):
                    results[job.index] = result
                counters["retries"] += message.num_retries
        except (EOFError, OSError):
            try:
                exit_code = self.process.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                exit_code = None
            return RewardResult(0.0, "error", f"reward worker died (exit code {exit_code})")
        if not self.chunks:
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
        in_flight = self.in_flight
        num_started = self._calls_started() - self._counter_at_send
        return in_flight[max(0, min(num_started, len(in_flight)) - 1)]

    def stop(self, kill: bool = False) -> None:
        """Ask the worker to exit (kill=False) and kill it if still alive after a second."""
        if self._stopped:
            return
        self._stopped = True
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


_WORKER_BOOTSTRAP = """\
import json, sys
sys.path[:] = json.loads(sys.argv[1])
from rollout.reward_worker import _worker_main
a = sys.argv
_worker_main(int(a[2]), int(a[3]), a[4], float(a[5]), int(a[6]), int(a[7]))
"""
"""Worker entry: the caller's sys.path (the reward module imports as in the caller), then the loop."""
