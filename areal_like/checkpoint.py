"""Atomic, resumable checkpoints of the whole async state.

Layout under ``run.dir/checkpoints``::

    step_000010/
        trainer/        DeepSpeed: model, optimizer and LR scheduler of every rank
        datastore.pkl   samples generated but not yet trained on (restored into the new store)
        state.pkl       RunState: step, version, dispatcher (prompt cursor, gate counters, prompts
                        in flight, which are requeued on resume), driver RNG
    latest              the name of the newest complete checkpoint

A checkpoint is written into ``step_N.tmp`` and renamed into place; ``latest`` is replaced
atomically after that, so a crash mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import shutil
from dataclasses import dataclass

import numpy as np
import torch

from areal_like.dispatch import DispatcherState

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"


@dataclass
class RunState:
    step: int
    version: int
    dispatcher: DispatcherState
    rng: dict
    num_buffered_samples: int
    model_path: str
    """The model directory the run started from (architecture and tokenizer for export)."""


def capture_rng() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def checkpoints_root(run_dir: str) -> str:
    return os.path.join(run_dir, CHECKPOINTS)


def staging_dir(run_dir: str, step: int) -> str:
    """A fresh temporary directory to write checkpoint ``step`` into."""
    path = os.path.join(checkpoints_root(run_dir), f"step_{step:06d}.tmp")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def write_state(directory: str, state: RunState) -> None:
    with open(os.path.join(directory, "state.pkl"), "wb") as f:
        pickle.dump(state, f)
        f.flush()
        os.fsync(f.fileno())


def commit(run_dir: str, staged: str, step: int, keep: int) -> str:
    """Move a fully written staging dir into place, point ``latest`` at it, prune old ones."""
    root = checkpoints_root(run_dir)
    final = os.path.join(root, f"step_{step:06d}")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staged, final)
    tmp = os.path.join(root, "latest.tmp")
    with open(tmp, "w") as f:
        f.write(os.path.basename(final))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, "latest"))
    complete = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp"))
    for old in complete[:-keep]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete checkpoint directory, or None."""
    pointer = os.path.join(checkpoints_root(run_dir), "latest")
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    path = os.path.join(checkpoints_root(run_dir), name)
    if not os.path.exists(os.path.join(path, "state.pkl")):
        raise FileNotFoundError(
            f"checkpoint pointer {pointer!r} names {name!r}, which is incomplete or missing; "
            "remove the pointer to start over or restore the directory"
        )
    return path


def read_state(directory: str) -> RunState:
    with open(os.path.join(directory, "state.pkl"), "rb") as f:
        return pickle.load(f)
