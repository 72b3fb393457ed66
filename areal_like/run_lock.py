"""One run per run directory: ``run.dir/run.lock`` names the process that owns the directory.

A run takes the lock before it writes anything into ``run.dir`` and holds it until it exits. The
lock is an ``flock`` on ``run.lock`` (released by the kernel when the holder dies, however it dies)
plus the holder's pid, host and start time written into the file, for the refusal message and for
hosts whose shared filesystem does not carry ``flock`` across machines:

- held by a live process (the flock is taken, or the pid is alive on this host): refused at once,
  naming the holder's pid and host;
- left by a process that is gone (same host, flock free): taken over with a warning;
- written by another host and no flock here: refused, since its process cannot be checked from
  here; the message says how to take it over (delete the file once that run is known to be gone).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass

from areal_like.config import ConfigError

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"


class RunDirLocked(ConfigError):
    """Another live run owns the run directory (retrying does not help: exit code 2)."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds a run directory; the JSON content of ``run.lock``."""

    pid: int
    host: str
    started: float
    """Unix time the holder took the lock."""

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on host {self.host} (since {since})"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _read_holder(fd: int) -> LockHolder | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        return LockHolder(**json.loads(raw.decode()))
    except (ValueError, TypeError):  # empty (a holder that died while writing it) or foreign
        return None


class RunLock:
    """The held lock of one run directory; ``release`` (or process exit) frees it."""

    def __init__(self, path: str, fd: int, holder: LockHolder) -> None:
        self.path = path
        self.holder = holder
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, run_dir: str) -> RunLock:
        """Take ``run_dir``'s lock or raise ``RunDirLocked`` naming the holder."""
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            return cls._take(path, fd)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def _take(cls, path: str, fd: int) -> RunLock:
        me = LockHolder(pid=os.getpid(), host=socket.gethostname(), started=time.time())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            who = holder.describe() if holder else "another process (it has not written its pid yet)"
            raise RunDirLocked(
                f"run.dir {os.path.dirname(path)!r} is in use by {who}: two runs in one directory "
                "would write the same metrics and checkpoints. Wait for it to finish, stop it, or set "
                "another run.dir"
            ) from None
        previous = _read_holder(fd)
        if previous is not None and previous.pid != me.pid:
            if previous.host != me.host:
                fcntl.flock(fd, fcntl.LOCK_UN)
                raise RunDirLocked(
                    f"run.dir {os.path.dirname(path)!r} is locked by {previous.describe()}, another "
                    f"host, whose process cannot be checked from {me.host}. If that run is gone, delete "
                    f"{path} and start again; otherwise set another run.dir"
                )
            # Same host and the flock was free: its holder is gone (the kernel drops a dead
            # process's flock), even if its pid now belongs to another process.
            reused = _pid_alive(previous.pid)
            now = "that pid now belongs to another process" if reused else "that process is gone"
            logger.warning(
                "run.dir %s: taking over the stale lock of %s (%s)",
                os.path.dirname(path),
                previous.describe(),
                now,
            )
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(asdict(me)).encode())
        os.fsync(fd)
        return cls(path, fd, me)

    def release(self) -> None:
        """Free the lock (idempotent). The file is emptied, not removed: removing it would let a
        waiting process lock an unlinked inode while a third creates a new file."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
