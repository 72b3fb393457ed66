"""Saving a checkpoint of the whole run from the controller, and what a failed save says.

One save, in order (``areal_like.checkpoint`` describes the layout):
1. the dispatcher's state, then the datastore's unconsumed samples (dispatcher first: a group that
   finishes in between is either in the snapshot or still listed in flight, never lost);
2. every trainer rank writes its DeepSpeed shards (a collective);
3. ``state.pkl`` (RunState), then ``manifest.json``, then the rename into place.

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
import time
from collections.abc import Callable

import ray

from areal_like import checkpoint as ckpt
from areal_like.checkpoint_manifest import human_bytes, write_manifest

logger = logging.getLogger(__name__)

# How errors of a full disk read when they do not carry errno (C++ streams inside torch.save).
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "iostream error", "unexpected pos")


class CheckpointDiskFull(OSError):
    """A checkpoint could not be written because its filesystem is full (a runtime failure: the
    same command resumes from the previous checkpoint once there is space)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def _chain(err: BaseException):
    """``err`` and every exception behind it (``raise from``, context, a Ray task error's cause)."""
    seen: set[int] = set()
    stack = [err]
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
    """Writes checkpoints of the run (see the module docstring for the order)."""

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
        """``run_config``: the ``run`` section (keep_checkpoints); ``wait(refs, role, what)``: the
        controller's ``ray.get`` with a deadline."""
        self.run_dir = run_dir
        self.keep = run_config.keep_checkpoints
        self.trainers = trainers
        self.store = store
        self.dispatcher = dispatcher
        self.task = task
        self._wait = wait

    def save(self, step: int, make_state: Callable[[object, int], ckpt.RunState]) -> float:
        """Write checkpoint ``step``; returns the seconds the caller was blocked.
        ``make_state(dispatcher_state, num_buffered_samples)`` builds the RunState to store."""
        start = time.perf_counter()
        staged = ckpt.step_dir(self.run_dir, step) + ".tmp"
        try:
            ckpt.staging_dir(self.run_dir, step)
            dispatcher_state = ray.get(self.dispatcher.state.remote())
            num_buffered = self.store.snapshot(os.path.join(staged, "datastore.pkl"), self.task)
            self._wait(
                [t.save_checkpoint.remote(os.path.join(staged, "trainer")) for t in self.trainers],
                "trainer",
                "save",
            )
            ckpt.write_state(staged, make_state(dispatcher_state, num_buffered))
            write_manifest(staged)
            final = ckpt.commit(self.run_dir, staged, step, self.keep)
        except Exception as err:
            self._fail(err, staged, step)
        logger.info("checkpoint %s (%d buffered samples)", final, num_buffered)
        return time.perf_counter() - start

    def _fail(self, err: Exception, staged: str, step: int):
        written = ckpt.directory_bytes(staged) if os.path.isdir(staged) else 0
        free = ckpt.free_bytes(self.run_dir)
        previous = ckpt.newest_checkpoint_bytes(self.run_dir)
        full = is_disk_full(err, self.run_dir, previous[1] if previous else written + 1)
        shutil.rmtree(staged, ignore_errors=True)  # frees the space and leaves no .tmp behind
        if full:
            raise disk_full_error(self.run_dir, staged, step, written, free) from err
        raise err
