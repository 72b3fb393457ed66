"""Atomic, verified, resumable checkpoints of the whole async state.

Layout under ``run.dir/checkpoints``::

    step_000010/
        trainer/        DeepSpeed: model, optimizer and LR scheduler of every rank
        datastore.pkl   samples generated but not yet trained on (restored into the new store)
        state.pkl       RunState: step, version, dispatcher (prompt cursor, gate counters, prompts
                        in flight, which are requeued on resume), driver RNG, trainer layout
        manifest.json   every file above with its size and CRC-32, written last
    latest              the name of the newest committed checkpoint (for people and tools)

A checkpoint is written into ``step_N.tmp``, its manifest last, then renamed into place; ``latest``
is replaced atomically after that, so a crash mid-save leaves the previous checkpoint intact. A
resume does not trust ``latest``: it takes the newest ``step_N`` whose manifest verifies and names
every newer one it skipped and why. Leftover ``.tmp`` directories are removed when a run starts.

Pruning keeps the newest ``run.keep_checkpoints``. The checkpoint just committed is the newest
verified one and is never among those deleted; directories of a later step than it come from a
history the run has left (it resumed from an older checkpoint, or started over) and are removed.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import shutil
from dataclasses import dataclass, field

import numpy as np
import torch

from areal_like.checkpoint_manifest import MANIFEST, human_bytes, verify
from areal_like.checkpoint_universal import TrainerLayout
from areal_like.config import ConfigError
from areal_like.dispatch import DispatcherState

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
POINTER = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class RunState:
    step: int
    version: int
    dispatcher: DispatcherState
    rng: dict
    num_buffered_samples: int
    model_path: str
    """The model directory the run started from (architecture and tokenizer for export)."""
    counters: dict[str, float] | None = None
    """Every ``*_total`` metric as last logged before the save (None in older checkpoints)."""
    trainer_layout: TrainerLayout | None = None
    """Ranks and ZeRO stage of the trainer that wrote ``trainer/`` (None in older checkpoints)."""


RESTORED_TOTALS = frozenset(
    {"staleness/evicted_groups_total", "datastore/lost_groups_total", "train/skipped_steps_total"}
)
"""Counters whose sources come back from a checkpoint (the dispatcher's gate, the trainer's client
state). Every other ``*_total`` restarts with its actor and continues through the metrics logger."""


@dataclass
class ResumePoint:
    """The checkpoint a run resumes from, and the newer ones it had to skip."""

    path: str
    step: int
    skipped: list[str] = field(default_factory=list)
    """One line per skipped checkpoint: 'step 20: trainer/... truncated, 1.1 MB of 1.2 MB'."""

    def describe(self) -> str:
        if not self.skipped:
            return f"resuming from {self.path} at step {self.step}"
        return "; ".join(self.skipped) + f"; resuming from step {self.step} ({self.path})"


class CheckpointsUnusable(ConfigError):
    """Every checkpoint of a run directory is damaged; starting over needs the user's consent."""


def capture_rng() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def checkpoints_root(run_dir: str) -> str:
    return os.path.join(run_dir, CHECKPOINTS)


def step_dir(run_dir: str, step: int) -> str:
    return os.path.join(checkpoints_root(run_dir), f"step_{step:06d}")


def committed_steps(run_dir: str) -> list[int]:
    """Steps of the committed (renamed into place) checkpoint directories, oldest first."""
    root = checkpoints_root(run_dir)
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for name in os.listdir(root) if (m := _STEP_DIR.match(name)))


def staging_dir(run_dir: str, step: int) -> str:
    """A fresh temporary directory to write checkpoint ``step`` into."""
    path = step_dir(run_dir, step) + ".tmp"
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def write_state(directory: str, state: RunState) -> None:
    with open(os.path.join(directory, "state.pkl"), "wb") as f:
        pickle.dump(state, f)
        f.flush()
        os.fsync(f.fileno())


def read_state(directory: str) -> RunState:
    with open(os.path.join(directory, "state.pkl"), "rb") as f:
        return pickle.load(f)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(run_dir: str, staged: str, step: int, keep: int) -> str:
    """Move a fully written staging dir (manifest last) into place, point ``latest`` at it, prune."""
    assert os.path.exists(os.path.join(staged, MANIFEST)), f"{staged}: commit before the manifest"
    root = checkpoints_root(run_dir)
    final = step_dir(run_dir, step)
    shutil.rmtree(final, ignore_errors=True)  # a damaged one of an abandoned history
    os.replace(staged, final)
    _fsync_dir(root)
    tmp = os.path.join(root, POINTER + ".tmp")
    with open(tmp, "w") as f:
        f.write(os.path.basename(final))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, POINTER))
    _prune(run_dir, step, keep)
    return final


def _prune(run_dir: str, committed: int, keep: int) -> None:
    steps = committed_steps(run_dir)
    later = [s for s in steps if s > committed]
    for s in later:
        logger.info("removing checkpoint step %d: later than %d, of a history this run left", s, committed)
        shutil.rmtree(step_dir(run_dir, s), ignore_errors=True)
    kept = [s for s in steps if s <= committed][-keep:]
    assert committed in kept
    for s in steps:
        if s <= committed and s not in kept:
            shutil.rmtree(step_dir(run_dir, s), ignore_errors=True)


def remove_leftovers(run_dir: str) -> list[str]:
    """Delete what interrupted saves left in the checkpoints directory (``*.tmp``); returns them."""
    root = checkpoints_root(run_dir)
    if not os.path.isdir(root):
        return []
    removed = []
    for name in sorted(os.listdir(root)):
        if not name.endswith(".tmp"):
            continue
        path = os.path.join(root, name)
        if os.path.isdir(path):
            size = directory_bytes(path)
            shutil.rmtree(path)
        else:
            size = os.path.getsize(path)
            os.remove(path)
        logger.warning("removed %s (%s) left by an interrupted save", path, human_bytes(size))
        removed.append(path)
    return removed


def _pointer_target(run_dir: str) -> str | None:
    pointer = os.path.join(checkpoints_root(run_dir), POINTER)
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        return f.read().strip() or None


def find_resume_point(run_dir: str) -> ResumePoint | None:
    """The newest committed checkpoint that verifies, or None when the run has none at all.

    Raises ``CheckpointsUnusable`` when checkpoints exist but none verifies: starting over would
    silently throw their steps away, so the user decides (``run.resume=false``).
    """
    skipped = []
    target = _pointer_target(run_dir)
    steps = committed_steps(run_dir)
    if target is not None and not os.path.isdir(os.path.join(checkpoints_root(run_dir), target)):
        skipped.append(f"{target}: directory missing (named by {CHECKPOINTS}/{POINTER})")
    for step in reversed(steps):
        path = step_dir(run_dir, step)
        problem = verify(path)
        legacy = not os.path.exists(os.path.join(path, MANIFEST)) and os.path.basename(path) == target
        if problem is not None and legacy and os.path.exists(os.path.join(path, "state.pkl")):
            # The pointer's checkpoint, written before manifests existed: usable, not verifiable.
            logger.warning("checkpoint %s has no %s (an older format): not verified", path, MANIFEST)
            problem = None
        if problem is None:
            point = ResumePoint(path, step, skipped)
            if skipped:
                logger.warning("%s", point.describe())
            return point
        skipped.append(f"step {step}: {problem}")
    if not skipped:
        return None
    raise CheckpointsUnusable(
        f"no intact checkpoint in {checkpoints_root(run_dir)}: " + "; ".join(skipped) + ". Restore one, "
        "or set run.resume=false to start over in this directory (its checkpoints are replaced)"
    )


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest intact checkpoint directory, or None (see ``find_resume_point``)."""
    point = find_resume_point(run_dir)
    return None if point is None else point.path


def free_bytes(directory: str) -> int:
    while not os.path.exists(directory):
        directory = os.path.dirname(directory)
    return shutil.disk_usage(directory).free


def directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(p, f)) for p, _, files in os.walk(path) for f in files)


def newest_checkpoint_bytes(run_dir: str) -> tuple[int, int] | None:
    """(step, bytes) of the newest committed checkpoint: what the next save will need again."""
    steps = committed_steps(run_dir)
    if not steps:
        return None
    return steps[-1], directory_bytes(step_dir(run_dir, steps[-1]))


def check_space_at_start(run_dir: str) -> None:
    """Warn when the disk cannot hold another checkpoint like the newest one (the save fails then)."""
    previous = newest_checkpoint_bytes(run_dir)
    if previous is not None and free_bytes(run_dir) < previous[1]:
        logger.warning(
            "only %s free under %s; the next checkpoint needs about %s (the size of step %d): "
            "the first save will fail unless space is freed",
            human_bytes(free_bytes(run_dir)),
            run_dir,
            human_bytes(previous[1]),
            previous[0],
        )


def prepare(run_dir: str, resume: bool) -> ResumePoint | None:
    """At run start, under the run lock: clear interrupted saves, warn when the disk is too full
    for the next save, pick the checkpoint to resume from."""
    remove_leftovers(run_dir)
    check_space_at_start(run_dir)
    return find_resume_point(run_dir) if resume else None
