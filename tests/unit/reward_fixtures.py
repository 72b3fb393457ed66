"""Reward functions for tests/unit/test_rewards.py, importable by spawned worker processes."""

from __future__ import annotations

import os
import signal
import time

NOT_CALLABLE = 42


def exact(response: str, answer: str) -> float:
    return 1.0 if response == answer else 0.0


def raise_on_boom(response: str, answer: str) -> float:
    if response == "boom":
        raise RuntimeError("boom requested")
    return 1.0


def sleep_on_slow(response: str, answer: str) -> float:
    """Sleeps 30 s for response 'slow' (interruptible: the worker's timer ends it)."""
    if response == "slow":
        time.sleep(30)
    return 1.0


def hang_on_slow(response: str, answer: str) -> float:
    """For response 'slow', disarms the worker's timer, then sleeps: only killing the worker ends it."""
    if response == "slow":
        signal.setitimer(signal.ITIMER_REAL, 0)
        time.sleep(30)
    return 1.0


def exit_on_die(response: str, answer: str) -> float:
    if response == "die":
        os._exit(3)
    return 1.0


def odd_returns(response: str, answer: str) -> object:
    return {"nan": float("nan"), "inf": float("inf"), "str": "1.0", "none": None, "int": 2}[response]


def torch_imported(response: str, answer: str) -> float:
    import sys

    return float("torch" in sys.modules)


def exit_first_time(response: str, answer: str) -> float:
    """Kills its worker the first time it sees a response (``answer`` is a marker file path)."""
    if not os.path.exists(answer):
        open(answer, "w").close()
        os._exit(3)
    return 1.0


def const_or_varied(response: str, answer: str) -> float:
    """1.0 for answer 'const' (a group's rewards all equal); for 'varied', 1.0 for responses of odd
    character sum, so a group's rewards usually differ."""
    if answer == "const":
        return 1.0
    return float(sum(map(ord, response)) % 2)


def response_length(response: str, answer: str) -> float:
    """A reward that varies on any policy (random models included), so every step has a gradient."""
    return float(len(response))


def sleep_unless_fast(response: str, answer: str) -> float:
    """Sleeps 30 s unless the response is 'fast' (a reward that hangs on most inputs)."""
    if response != "fast":
        time.sleep(30)
    return 1.0


def sleep_spin_or_die(response: str, answer: str) -> float:
    """'slow': sleeps 30 s; 'die': kills its process; 'spin': computes for SECONDS of CPU time (answer
    'SECONDS:DIR') and writes its wall-clock start and end into a file of DIR."""
    if response == "slow":
        time.sleep(30)
    if response == "die":
        os._exit(3)
    if response == "spin":
        seconds, log_dir = answer.split(":", 1)
        started, end = time.time(), time.process_time() + float(seconds)
        while time.process_time() < end:
            pass
        with open(os.path.join(log_dir, f"{os.getpid()}-{started}"), "w") as f:
            f.write(f"{started} {time.time()}")
    return 1.0


def always_raise(response: str, answer: str) -> float:
    """A broken reward function: every call raises."""
    raise KeyError(f"no field {answer!r}")


def pid_unless_slow(response: str, answer: str) -> float:
    """The id of the process that ran the call (the worker itself, or a child forked for it); sleeps
    30 s for response 'slow'."""
    if response == "slow":
        time.sleep(30)
    return float(os.getpid())


def spin_logging_starts(response: str, answer: str) -> float:
    """Appends a line to the file ``answer`` names when it starts, then computes for ``response``
    seconds of CPU time."""
    with open(answer, "a") as f:
        f.write("start\n")
    end = time.process_time() + float(response)
    while time.process_time() < end:
        pass
    return 1.0
