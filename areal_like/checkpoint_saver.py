"""Saving a checkpoint of the whole run from the controller, and what a failed save says.

One save, in order (``areal_like.checkpoint`` describes the layout):
1. at the step boundary, on the loop's thread: the dispatcher's state, then the datastore's
   unconsumed samples into memory (dispatcher first: a group that finishes in between is either in
   the snapshot or still listed in flight, never lost), the RunState (RNG included), and every
   trainer rank's ``save_checkpoint`` (a collective);
2. the datastore file, the ranks' files (each checksummed by its writer), ``state.pkl``, then
   ``manifest.json``, then the rename into place.

Foreground (default): the ranks write their files inside step 1 and step 2 follows at once; the
loop waits for all of it. Background (``run.async_checkpoint``): each rank only copies its state to
host memory in step 1 and writes it from a thread of its own while it trains on
(``trainer.checkpoint_engine``); step 2 runs on a thread here, which polls the ranks until their
files are written. The loop blocks for step 1 only, and when the next save comes while this one
is still being written, until it commits; a background failure is raised at the next step
boundary (``check``). The last save of a run waits for its commit. Until the rename, ``latest``
and the newest intact checkpoint are the previous ones, so a crash mid-write loses nothing else.

A save that fails removes its staging directory, so the previous checkpoint stays the newest
intact one and nothing is left that the next start would trip over. A failure caused by a full
disk is reported as ``CheckpointDiskFull``, "No space left on device", with the path, the bytes
the checkpoint needs and those free (whatever layer reported it: Python's ``OSError``, torch's
"unexpected pos" from a C++ stream, either inside a Ray task error).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable

import ray

from areal_like import checkpoint as ckpt
from areal_like.checkpoint_manifest import FileEntry, human_bytes, write_manifest
from datastore.snapshot import write_snapshot

logger = logging.getLogger(__name__)

# How errors of a full disk read when they do not carry errno (C++ streams inside torch.save).
_POLL_S = 0.2  # how often a background save asks the ranks whether their files are written
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "iostream error", "unexpected pos")


class CheckpointDiskFull(OSError):
    """A checkpoint could not be written because its filesystem is full (a runtime failure: the
    same command resumes from the previous checkpoint once there is space)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror or ""


def _chain(err: BaseException):
    """``err`` and every exception behind it (``raise from``, context, a Ray task error's cause)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None)]


def is_disk_full(err: BaseException, directory: str, needed: int) -> bool:
    """Whether ``err`` comes from a full filesystem under ``directory``: an ENOSPC/EDQUOT errno
    anywhere in its chain, or a stream error whose text says so while the disk has less than
    ``needed`` bytes free (a plain I/O bug on a roomy disk is not called a full disk)."""
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
    text = " ".join(str(e) for e in _chain(err))
    return any(t in text for t in _DISK_FULL_TEXT) and ckpt.free_bytes(directory) < max(needed, 1)


def disk_full_error(run_dir: str, staged: str, step: int, written: int, free: int) -> CheckpointDiskFull:
    """The message of a save that filled the disk (``written``/``free``: bytes when it failed)."""
    previous = ckpt.newest_checkpoint_bytes(run_dir)
    if previous is not None:
        needed = f"needs about {human_bytes(previous[1])} (the size of step {previous[0]})"
        after = (
            f"the previous checkpoint, step {previous[0]}, is intact; free space and re-run the same "
            "command to resume from it"
        )
    else:
        needed = f"needs more than the {human_bytes(written)} written before the disk filled"
        after = "there is no earlier checkpoint; free space and re-run the same command to start again"
    return CheckpointDiskFull(
        f"No space left on device: checkpoint of step {step} into {staged} {needed}, "
        f"{human_bytes(free)} free there; {after}"
    )


class CheckpointSaver:
    """Writes checkpoints of the run, in the foreground or (``run.async_checkpoint``) mostly in
    the background; see the module docstring for the order."""

    def __init__(
        self,
        run_dir: str,
        run_config,
        trainers: list,
        store,
        dispatcher,
        task: str,
        wait: Callable[[list, str, str], list],
    ) -> None:
        """``run_config``: the ``run`` section; ``wait(refs, role, what)``: the controller's
        ``ray.get`` with a deadline."""
        self.run_dir = run_dir
        self.keep = run_config.keep_checkpoints
        self.background = run_config.async_checkpoint
        self.timeout_s = run_config.actor_timeout_s
        self.trainers = trainers
        self.store = store
        self.dispatcher = dispatcher
        self.task = task
        self._wait = wait
        self._writer: threading.Thread | None = None
        self._writer_error: BaseException | None = None

    def save(self, step: int, make_state: Callable[[object, int], ckpt.RunState], wait=False) -> float:
        """Checkpoint ``step``; returns the seconds the caller was blocked. ``make_state(dispatcher
        state, number of buffered samples)`` builds the RunState. In the background mode the files
        are written after this returns, unless ``wait`` (the last save of a run)."""
        start = time.perf_counter()
        self.finish()  # one save at a time: the previous one commits first
        staged = ckpt.step_dir(self.run_dir, step) + ".tmp"
        try:
            ckpt.staging_dir(self.run_dir, step)
            dispatcher_state = ray.get(self.dispatcher.state.remote())
            samples = self.store.snapshot_samples(self.task)
            trainer_dir = os.path.join(staged, "trainer")
            saves = [t.save_checkpoint.remote(trainer_dir, self.background) for t in self.trainers]
            progress = self._wait(saves, "trainer", "save")
            state = make_state(dispatcher_state, len(samples.samples))
        except Exception as err:
            self._fail(err, staged, step)
        if not self.background:
            self._complete(staged, step, state, samples, progress)
            return time.perf_counter() - start
        self._writer = threading.Thread(
            target=self._complete_in_background,
            args=(staged, step, state, samples, progress),
            name=f"checkpoint-{step}",
            daemon=True,
        )
        self._writer.start()
        if wait:
            self.finish()
        return time.perf_counter() - start

    def check(self) -> None:
        """Raise the error of a background save that has failed (call it at every step boundary)."""
        if self._writer is not None and not self._writer.is_alive():
            self.finish()

    def finish(self) -> None:
        """Wait for the background save in flight, if any; raise its error."""
        if self._writer is None:
            return
        self._writer.join()
        self._writer, error, self._writer_error = None, self._writer_error, None
        if error is not None:
            raise error

    # ---- internals ---------------------------------------------------------------------------
    def _complete_in_background(self, *args) -> None:
        try:
            self._complete(*args)
        except BaseException as err:  # handed to the loop by check()/finish()
            self._writer_error = err

    def _complete(self, staged: str, step: int, state: ckpt.RunState, samples, progress: list) -> None:
        """Everything after the step boundary: datastore file, ranks' files, state, manifest, commit."""
        try:
            write_snapshot(os.path.join(staged, "datastore.pkl"), samples)
            progress = self._ranks_written(step, progress)
            ckpt.write_state(staged, state)
            known = {}
            for written in (f for p in progress for f in p.files):
                rel = os.path.relpath(written.path, staged).replace(os.sep, "/")
                known[rel] = FileEntry(rel, written.size, written.crc32)
            write_manifest(staged, known)
            final = ckpt.commit(self.run_dir, staged, step, self.keep)
        except Exception as err:
            self._fail(err, staged, step)
        logger.info("checkpoint %s (%d buffered samples)", final, len(samples.samples))

    def _ranks_written(self, step: int, progress: list) -> list:
        """Every rank's WriteProgress once all are done; a rank's write error is raised."""
        deadline = time.monotonic() + self.timeout_s
        while not all(p.done for p in progress):
            if time.monotonic() > deadline:
                late = [rank for rank, p in enumerate(progress) if not p.done]
                raise TimeoutError(
                    f"trainer ranks {late} did not finish writing checkpoint step {step} within "
                    f"{self.timeout_s:.0f}s (run.actor_timeout_s)"
                )
            time.sleep(_POLL_S)
            progress = self._wait([t.checkpoint_progress.remote() for t in self.trainers], "trainer", "write")
        for rank, p in enumerate(progress):
            if p.error is not None:
                message = f"trainer rank {rank}: {p.error}"
                raise OSError(p.errno, message) if p.errno else RuntimeError(message)
        return progress

    def _fail(self, err: Exception, staged: str, step: int):
        written = ckpt.directory_bytes(staged) if os.path.isdir(staged) else 0
        free = ckpt.free_bytes(self.run_dir)
        previous = ckpt.newest_checkpoint_bytes(self.run_dir)
        full = is_disk_full(err, self.run_dir, previous[1] if previous else written + 1)
        shutil.rmtree(staged, ignore_errors=True)  # frees the space and leaves no .tmp behind
        if full:
            raise disk_full_error(self.run_dir, staged, step, written, free) from err
        raise err
