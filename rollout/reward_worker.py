"""The reward worker process (started and driven by ``rollout.rewards.RewardPool``; the dataflow, the
timeouts and the concurrent mode are described there), and the records both sides exchange."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import mmap
import numbers
import os
import pickle
import select
import signal
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

from areal_like.core.imports import import_callable

RewardFn = Callable[[str, str], float]

_COUNTER = struct.Struct("<q")
"""Layout of the shared page: the number of calls the worker has started."""
_TICK_S = 0.05
"""Concurrent mode: how often the worker measures its children's CPU use."""
_MEASURE_PER_TICK = 64
"""Concurrent mode: most children measured per tick (reading /proc costs ~0.1 ms per child)."""
_BUSY_SHARE = 0.25
"""Concurrent mode: a child whose process tree used this share of a core since the last tick is busy."""
_SUSPECT_SHARE = 0.25
"""Sequential mode: a call still running after this share of its timeout, having used less than
``_BUSY_SHARE`` of a core, is waiting; it runs again concurrently with the rest of its batch."""
_HANG_SAMPLES = 8
"""Concurrent mode: timed-out calls measured (per tick) before they are killed, so that a batch whose
calls all started at once still learns whether they compute."""


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
    """The reward function "package.module:function" names (the attribute may be dotted)."""
    return import_callable(path, f"reward function path {path!r}")


@dataclass(frozen=True)
class _Job:
    """Parent -> worker: one item to score; ``index`` is its position in the batch."""

    index: int
    response: str
    answer: str
    attempt: int = 0
    """How many times this item was already retried after its worker (or call process) died."""


@dataclass(frozen=True)
class _Chunk:
    """Parent -> worker: items to score, in order. ``batch`` numbers the pool's batches: the worker
    starts each new batch in sequential mode."""

    batch: int
    chunk_id: int
    jobs: list[_Job]


@dataclass(frozen=True)
class _ChunkReply:
    """Worker -> parent: one result per job of the chunk, in order."""

    chunk_id: int
    results: list[RewardResult]
    num_retries: int = 0
    """Calls run again because the child process running them died (concurrent mode)."""


@dataclass(frozen=True)
class _WentConcurrent:
    """Worker -> parent: a call of ``batch`` timed out; send the rest of the batch, it runs at once."""

    batch: int


class _CallWaits(BaseException):
    """Raised by the SIGALRM handler inside a reward call that has run ``_SUSPECT_SHARE`` of its
    timeout without computing (see ``_worker_main``)."""


class _CallTimeout(BaseException):
    """Raised by the SIGALRM handler inside a reward call (a BaseException, so that a reward
    function's `except Exception` does not swallow it)."""


def _worker_main(
    conn_fd: int, page_fd: int, fn_path: str, timeout_s: float, concurrency: int, max_retries: int
) -> None:
    """Worker process loop: import the function, then score each received chunk until None or EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    conn = Connection(conn_fd)
    page = mmap.mmap(page_fd, mmap.PAGESIZE)
    try:
        fn = resolve_reward_fn(fn_path)
    except Exception as e:
        conn.send(f"{type(e).__name__}: {e}")
        return
    use_alarm = hasattr(signal, "setitimer")
    can_fork = concurrency > 1 and hasattr(os, "fork")
    # A call still running after ``suspect_s`` that has not been computing is waiting (a sleep, a
    # network call, a subprocess): it is stopped and run again, with the rest of the batch,
    # concurrently, each in a forked child with the full timeout. One that computes runs on.
    suspect_s = timeout_s * _SUSPECT_SHARE if can_fork else timeout_s
    in_call, suspect, cpu_start = False, False, 0.0

    def on_alarm(signum: int, frame: object) -> None:
        nonlocal suspect
        if not in_call:  # a signal delivered late, after the call returned, is ignored
            return
        if suspect:
            suspect = False
            if time.process_time() - cpu_start < _BUSY_SHARE * suspect_s:
                raise _CallWaits
            signal.setitimer(signal.ITIMER_REAL, timeout_s - suspect_s)
            return
        raise _CallTimeout

    if use_alarm:
        signal.signal(signal.SIGALRM, on_alarm)
    calls = _CallCounter(page)
    batch, concurrent = -1, False
    # A batch with a timeout: None if none; else whether its calls were all seen waiting (not
    # computing), so that the next batch, which starts concurrent, may start them all at once.
    last_hang: bool | None = None
    hang: bool | None = None  # this batch's
    conn.send("ready")
    while True:
        try:
            chunk: _Chunk | None = conn.recv()
        except EOFError:
            return
        if chunk is None:
            return
        if chunk.batch != batch:  # a new batch: cheap (one call at a time here) unless the last one hung
            batch, last_hang, hang = chunk.batch, hang, None
            concurrent = last_hang is not None
            if concurrent:
                conn.send(_WentConcurrent(batch))
        chunk_results: list[RewardResult] = []
        for job in chunk.jobs:
            if concurrent:
                break
            calls.bump()
            try:
                in_call, suspect, cpu_start = True, suspect_s < timeout_s, time.process_time()
                if use_alarm:
                    signal.setitimer(signal.ITIMER_REAL, suspect_s)
                try:
                    value = fn(job.response, job.answer)
                finally:
                    if use_alarm:
                        signal.setitimer(signal.ITIMER_REAL, 0)
                    in_call = False
                result = _checked(value)
            except _CallWaits:  # no result: the job runs again, first of the concurrent rest
                concurrent = True
                conn.send(_WentConcurrent(batch))
                break
            except _CallTimeout:
                result = RewardResult(0.0, "timeout", f"call exceeded {timeout_s}s")
                if can_fork:
                    concurrent = True
                    hang = False  # the other calls may compute: ramp up
                    conn.send(_WentConcurrent(batch))
            except Exception as e:
                result = RewardResult(0.0, "error", f"{type(e).__name__}: {e}"[:500])
            chunk_results.append(result)
        if len(chunk_results) == len(chunk.jobs):
            conn.send(_ChunkReply(chunk.chunk_id, chunk_results))
            continue
        waiting = bool(last_hang) and hang is None  # concurrent from the start, after a waiting batch
        runner = _ConcurrentRunner(conn, fn, timeout_s, concurrency, max_retries, calls, waiting)
        runner.add(chunk, chunk_results)
        if not runner.run(batch):
            return  # the parent said stop (or vanished) meanwhile
        if runner.timeouts:  # the next batch starts concurrent only if this one hung too
            hang = not runner.busy_seen


class _CallCounter:
    """The worker's count of calls started, mirrored into the shared page the parent reads."""

    def __init__(self, page: mmap.mmap) -> None:
        self._page = page
        self._count = 0

    def bump(self) -> None:
        self._count += 1
        _COUNTER.pack_into(self._page, 0, self._count)


@dataclass
class _Call:
    """A reward call running in a forked child (concurrent mode)."""

    chunk_id: int
    position: int
    job: _Job
    pid: int
    read_fd: int
    started: float
    data: bytearray = dataclasses.field(default_factory=bytearray)
    cpu_ticks: int | None = None
    """CPU clock ticks of the child's process tree at the last measurement (0 at the fork: a new
    process's CPU time starts at zero, so the first measurement already tells idle from busy)."""
    measured_at: float = -math.inf
    """monotonic time of the last measurement (the fork's, before the first)."""
    busy: bool | None = None
    """Used at least ``_BUSY_SHARE`` of a core since the previous measurement; None until measured."""


class _ConcurrentRunner:
    """Concurrent mode of a worker: the rest of a batch, each call in a forked child (see the module
    docstring). Takes further chunks of the batch from the parent while it runs; answers each chunk
    when its last call ends."""

    def __init__(
        self,
        conn: Connection,
        fn: RewardFn,
        timeout_s: float,
        concurrency: int,
        max_retries: int,
        calls: _CallCounter,
        waiting: bool = False,
    ) -> None:
        self._conn = conn
        self._waiting = waiting
        """The last batch's calls waited, none computed: start this batch's calls all at once."""
        self.timeouts = 0
        """Calls of this batch that timed out."""
        self.busy_seen = False
        """A call of this batch was measured computing."""
        self._fn = fn
        self._timeout_s = timeout_s
        self._concurrency = concurrency
        self._max_retries = max_retries
        self._calls = calls
        self._queue: collections.deque[tuple[int, int, _Job]] = collections.deque()
        """(chunk id, position in the chunk, job) not started yet."""
        self._chunks: dict[int, list[RewardResult | None]] = {}
        self._num_retries: dict[int, int] = {}
        self._running: dict[int, _Call] = {}  # read fd -> call
        self._poller = select.poll()
        self._poller.register(conn.fileno(), select.POLLIN)
        self._prctl = _prctl()
        self._num_cores = os.cpu_count() or 1
        self._clock_ticks = os.sysconf("SC_CLK_TCK")

    def add(self, chunk: _Chunk, done: list[RewardResult]) -> None:
        """Run the jobs of ``chunk`` after its first ``len(done)``, whose results are ``done``."""
        self._chunks[chunk.chunk_id] = [*done, *([None] * (len(chunk.jobs) - len(done)))]
        self._num_retries[chunk.chunk_id] = 0
        self._queue.extend((chunk.chunk_id, i, job) for i, job in enumerate(chunk.jobs) if i >= len(done))

    def run(self, batch: int) -> bool:
        """Until every chunk is answered; False when the parent said stop or vanished meanwhile."""
        last_tick = time.monotonic()
        while self._chunks:
            self._start_calls()
            now = time.monotonic()
            next_event = min(
                [last_tick + _TICK_S, *(c.started + self._timeout_s for c in self._running.values())]
            )
            for fd, _ in self._poller.poll(math.ceil(max(0.0, next_event - now) * 1000)):
                if fd == self._conn.fileno():
                    if not self._take_message(batch):
                        self._end_all()
                        return False
                else:
                    self._read(self._running[fd])
            now = time.monotonic()
            expired = [c for c in self._running.values() if now >= c.started + self._timeout_s]
            for call in expired[:_HANG_SAMPLES]:  # were they computing or waiting? (the next batch's start)
                self._measure_call(call, now)
            for call in expired:  # all kills first: the children then die in parallel, not in turn
                _kill_group(call.pid)
            for call in expired:
                self.timeouts += 1
                self._finish(call, RewardResult(0.0, "timeout", f"call exceeded {self._timeout_s}s"))
            if now - last_tick >= _TICK_S:
                self._measure(now)
                last_tick = now
        return True

    def _start_calls(self) -> None:
        # Slow start: a call starts while the busy ones leave a core free and fewer calls are still
        # unmeasured than are measured idle (or than cores): sleepers double per tick, CPU work does not.
        # When the calls that hung were waiting, not computing, unmeasured calls start at once.
        calls = self._running.values()
        num_busy = sum(c.busy is True for c in calls)
        num_idle = sum(c.busy is False for c in calls)
        num_fresh = sum(c.busy is None for c in calls)
        fresh_limit = self._concurrency if self._waiting else max(self._num_cores, num_idle)
        while (
            self._queue
            and len(self._running) < self._concurrency
            and num_busy < self._num_cores
            and num_fresh < fresh_limit
        ):
            chunk_id, position, job = self._queue.popleft()
            call = _fork_call(chunk_id, position, job, self._fn, self._prctl)
            self._calls.bump()
            self._running[call.read_fd] = call
            self._poller.register(call.read_fd, select.POLLIN)
            num_fresh += 1

    def _take_message(self, batch: int) -> bool:
        try:
            chunk: _Chunk | None = self._conn.recv()
        except EOFError:
            return False
        if chunk is None:
            return False
        assert chunk.batch == batch, (chunk.batch, batch)  # the parent ends a batch before the next
        self.add(chunk, [])
        return True

    def _read(self, call: _Call) -> None:
        data = os.read(call.read_fd, 65536)
        call.data += data
        result = _decode_reply(call.data)
        if data and result is None:
            return  # the rest of the reply is on its way
        if result is not None:
            self._finish(call, result)
            return
        exit_code = self._finish(call, None)  # EOF without a reply: the child died in the call
        if call.job.attempt < self._max_retries:
            retry = dataclasses.replace(call.job, attempt=call.job.attempt + 1)
            self._queue.appendleft((call.chunk_id, call.position, retry))
            self._num_retries[call.chunk_id] += 1
            return
        error = RewardResult(0.0, "error", f"reward call process died (exit code {exit_code})")
        self._store(call, error)

    def _finish(self, call: _Call, result: RewardResult | None) -> int | None:
        """End ``call`` (kill its group, reap it) and store ``result`` unless None; its exit code."""
        del self._running[call.read_fd]
        self._poller.unregister(call.read_fd)
        exit_code = _end_call(call)
        if result is not None:
            self._store(call, result)
        return exit_code

    def _store(self, call: _Call, result: RewardResult) -> None:
        results = self._chunks[call.chunk_id]
        results[call.position] = result
        if all(r is not None for r in results):
            del self._chunks[call.chunk_id]
            reply = _ChunkReply(call.chunk_id, results, self._num_retries.pop(call.chunk_id))  # type: ignore[arg-type]
            self._conn.send(reply)

    def _measure(self, now: float) -> None:
        # Busy: runnable now (a computing call on a loaded machine may get little CPU, but it waits
        # for a core, not for an event) or used a share of a core since it was last measured. Only
        # needed while a call could start; at most _MEASURE_PER_TICK calls, the least recent first.
        if not self._queue or len(self._running) >= self._concurrency:
            return
        calls = sorted(self._running.values(), key=lambda c: c.measured_at)[:_MEASURE_PER_TICK]
        for call in calls:
            self._measure_call(call, now)

    def _measure_call(self, call: _Call, now: float) -> None:
        measured = _tree_cpu(call.pid)
        if measured is None:
            call.busy = self.busy_seen = True  # no /proc here: count it as computing
            return
        ticks, runnable = measured
        if call.cpu_ticks is not None:
            used_s = (ticks - call.cpu_ticks) / self._clock_ticks
            call.busy = runnable or used_s >= _BUSY_SHARE * (now - call.measured_at)
            self.busy_seen |= call.busy
        call.cpu_ticks, call.measured_at = ticks, now

    def _end_all(self) -> None:
        for call in list(self._running.values()):
            self._poller.unregister(call.read_fd)
            _end_call(call)
        self._running.clear()


_REPLY_HEADER = struct.Struct("<I")


def _fork_call(
    chunk_id: int, position: int, job: _Job, fn: RewardFn, prctl: Callable[..., int] | None
) -> _Call:
    """Fork a child that runs ``fn`` on ``job`` and writes its pickled ``RewardResult`` to a pipe."""
    read_fd, write_fd = os.pipe()
    worker_pid = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        try:
            os.close(read_fd)
            os.setpgid(0, 0)  # its own group: the kill at the deadline takes its children too
            if prctl is not None:  # die with the worker (a worker killed as stuck takes its calls along)
                prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
                if os.getppid() != worker_pid:  # the worker died before the line above
                    os._exit(1)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            try:
                result = _checked(fn(job.response, job.answer))
            except BaseException as e:
                result = RewardResult(0.0, "error", f"{type(e).__name__}: {e}"[:500])
            payload = pickle.dumps(result)
            os.write(write_fd, _REPLY_HEADER.pack(len(payload)) + payload)
        finally:
            os._exit(0)
    with contextlib.suppress(OSError):  # also here, so that a kill never precedes the child's own call
        os.setpgid(pid, pid)
    os.close(write_fd)
    os.set_blocking(read_fd, False)
    started = time.monotonic()
    return _Call(chunk_id, position, job, pid, read_fd, started, cpu_ticks=0, measured_at=started)


def _decode_reply(data: bytearray) -> RewardResult | None:
    if len(data) < _REPLY_HEADER.size:
        return None
    (size,) = _REPLY_HEADER.unpack_from(data)
    if len(data) < _REPLY_HEADER.size + size:
        return None
    return pickle.loads(data[_REPLY_HEADER.size : _REPLY_HEADER.size + size])


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _end_call(call: _Call) -> int | None:
    """Kill the call's process group (a no-op when it finished), reap the child; its exit code."""
    _kill_group(call.pid)
    os.close(call.read_fd)
    try:
        _, status = os.waitpid(call.pid, 0)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status)


_PR_SET_PDEATHSIG = 1


def _prctl() -> Callable[..., int] | None:
    """libc ``prctl`` on Linux (loaded once per worker, not per child), else None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _tree_cpu(pid: int) -> tuple[int, bool] | None:
    """CPU clock ticks (user + system) of ``pid`` and its descendants, and whether any of them is
    runnable now (Linux /proc); None where that cannot be read."""
    total, runnable, stack, seen = 0, False, [pid], 0
    while stack and seen < 256:
        current = stack.pop()
        seen += 1
        try:
            with open(f"/proc/{current}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            runnable |= fields[0] == b"R"
            total += int(fields[11]) + int(fields[12])  # utime, stime
            for task in os.listdir(f"/proc/{current}/task"):  # children of every thread
                with open(f"/proc/{current}/task/{task}/children", "rb") as f:
                    stack.extend(int(child) for child in f.read().split())
        except (OSError, IndexError, ValueError):
            if current == pid:
                return None
    return total, runnable


def _checked(value: object) -> RewardResult:
    """'ok' for a finite real number, else 'error' naming the offending value."""
    if isinstance(value, numbers.Real) and math.isfinite(float(value)):
        return RewardResult(float(value), "ok")
    return RewardResult(0.0, "error", f"reward function returned {value!r:.100}, expected a finite number")
