"""Faults named: when the run fails, say which of its one-of-a-kind actors died, what went with it
and how to resume.

The run survives the death of actors it has several of (a rollout worker is replaced, a storage
unit's samples are regenerated). The prompt dispatcher and the datastore controller are one of a
kind and hold state that lives nowhere else between checkpoints (the dispatcher: prompt cursor,
staleness-gate counters, the groups in flight and buffered; the datastore controller: the metadata
of every held sample, without which the data on the units cannot be found). When either dies, the
first symptom reaches the controller as whatever error the next call meets (``ActorDiedError``, a
``WireError``, a rollout worker failing on its ``acquire``). ``diagnose`` is called with that error:
it pings both actors through Ray and, when one is dead, returns a ``RunFault`` whose message names
the actor, what was lost, the last checkpoint and the command that resumes from it. The run then
stops (the CLI prints the message, exit code 1, which ``scripts/train.sh`` answers by resuming).
A reward function that fails on everything (``rollout.rewards.RewardFunctionBroken``) is the user's
to fix, not a fault to resume from: it becomes a ``ConfigError`` (exit 2, not retried).
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from areal_like.controller import RLController

logger = logging.getLogger(__name__)

_PING_TIMEOUT_S = 10.0
"""A live actor answers a ping within this; one that does not is not called dead (it may be busy)."""


class RunFault(RuntimeError):
    """A one-of-a-kind actor of the run died; the message names it, the loss and the resume command."""


def diagnose(controller: RLController, error: BaseException) -> Exception | None:
    """What to raise instead of ``error``: a ``RunFault`` when the prompt dispatcher or the datastore
    controller is dead; a ``ConfigError`` (exit 2: resuming would fail again) when a rollout worker
    stopped because the reward function failed on every item; else None."""
    from areal_like import checkpoint as ckpt
    from areal_like.config import ConfigError

    # A rollout worker's failure arrives as its traceback's text (the exception type stays in the
    # actor), so the reward pool's verdict is recognised by its name.
    text, marker = str(error), "RewardFunctionBroken: "
    if marker in text:
        verdict = text[text.index(marker) + len(marker) :].splitlines()[0]
        return ConfigError(f"{verdict} (the run stopped at step {controller.step})")

    dead = [name for name, handle, method in _singletons(controller) if _is_dead(handle, method)]
    if not dead:
        return None
    latest = ckpt.latest_checkpoint(controller.run_dir) if controller.config.run.save_checkpoints else None
    if latest is not None:
        step = ckpt.read_state(latest).step
        resume = (
            f"The last checkpoint is step {step} ({latest}); resume from it with: {resume_command()} "
            f"(the same run.dir; scripts/train.sh resumes by itself). Steps after {step} are trained again."
        )
    else:
        resume = (
            "No checkpoint was written yet, so re-running starts over: "
            f"{resume_command()} (run.checkpoint_every sets how often checkpoints are saved)."
        )
    lost = " ".join(_LOSSES[name] for name in dead)
    cause = (
        f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}"
    )
    message = (
        f"the run stopped at step {controller.step}: the {' and the '.join(dead)} actor died "
        f"(first symptom: {cause}). {lost} {resume}"
    )
    logger.error("%s", message)
    return RunFault(message)


_LOSSES = {
    "PromptDispatcher": (
        "Lost with it: the prompt cursor, the staleness-gate counters and the record of the groups in "
        "flight and buffered since the last checkpoint; rollout workers can get no more prompts."
    ),
    "DataStoreController": (
        "Lost with it: the metadata of every sample in the store (their data on the storage units can "
        "no longer be found or consumed); samples generated since the last checkpoint are gone."
    ),
}


def _singletons(controller: RLController) -> list[tuple[str, object, str]]:
    """(actor class name, Ray handle, a cheap method) of the run's one-of-a-kind actors built so far."""
    found = []
    dispatcher = getattr(controller, "dispatcher", None)
    if dispatcher is not None:
        found.append(("PromptDispatcher", dispatcher, "gate_state"))
    store = getattr(controller, "store", None)
    handles = getattr(store, "_handles", None)
    if handles is not None:
        found.append(("DataStoreController", handles.controller, "stats"))
    return found


def _is_dead(handle, method: str) -> bool:
    import ray

    try:
        ray.get(getattr(handle, method).remote(), timeout=_PING_TIMEOUT_S)
    except ray.exceptions.RayActorError:
        return True
    except Exception:  # fault boundary: busy, or Ray itself going down; not proof of death
        return False
    return False


def resume_command() -> str:
    """The command line that started this process, when it is the CLI's train command."""
    argv = sys.argv
    if (
        len(argv) >= 2
        and argv[1] == "train"
        and os.path.basename(argv[0]) in ("cli.py", "areal-like", "__main__.py")
    ):
        return "areal-like " + shlex.join(argv[1:])
    return "the same command as before"
