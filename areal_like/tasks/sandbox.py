"""Run untrusted Python (model output) in an isolated, limited process: the code reward's sandbox.

``run_python(code, stdin, limits)`` writes the code to a fresh private directory, runs it as
``python -I`` (isolated mode: no PYTHON* variables, no user site directory) with an environment
holding only PATH, and returns its exit status and (bounded) output. Nothing of the untrusted code
runs in the caller's process. Two layers:

1. Isolation, by ``AREAL_LIKE_SANDBOX`` (the run sets it from ``task.sandbox``):
   - 'bwrap' (default): bubblewrap. New user, PID, IPC, UTS and cgroup namespaces and, when the
     kernel allows one (probed once), an empty network namespace; a file system of read-only binds
     of the system directories (/usr and the /bin, /lib links) and nothing else (no /etc, /home,
     /root or /work: /etc/passwd does not exist in there), a private tmpfs /tmp and the private
     working directory as the only writable places; all capabilities dropped; run as an unprivileged
     uid (nobody when the caller is root). The program is PID 2 of its namespace: when it exits or is
     killed, the kernel kills every process it left behind (a ``setsid`` child, ``sleep infinity``),
     and bubblewrap dies with its parent (``--die-with-parent``). Without a usable ``bwrap`` on PATH
     ``run_python`` raises ``SandboxUnavailable`` (the run's preflight refuses a code task first).
   - 'weak' (opt-in): the same harness in a plain child (an empty network namespace through
     ``unshare`` when possible, the unprivileged uid when the caller is root), no file-system or
     PID isolation: it can read what that uid can read.
2. Limits and audit hooks, set in the child by a small harness before the untrusted code is compiled:
   ``RLIMIT_CPU`` (the kernel kills the child), ``RLIMIT_AS`` (an allocation past it raises
   MemoryError), ``RLIMIT_FSIZE`` (files it writes), ``RLIMIT_NPROC`` (processes and threads of its
   uid in its namespace: a fork loop stops at ``max_processes``), no core dumps, death with the parent;
   and a ``sys.addaudithook`` hook that refuses sockets, process creation (``subprocess``,
   ``_posixsubprocess``, ``os.system``, ``os.exec*``, ``os.fork``, ``os.posix_spawn``), signals to
   other processes (``os.kill``, ``os.killpg``, ``signal.pthread_kill``) and ``ctypes``. Hooks stop
   Python code, not native code: hence layer 1.
The parent enforces the wall clock: at ``wall_time_s`` it kills the process tree (bubblewrap and,
through the namespace, everything under it; in weak mode the child's process group), then stops
reading the output pipes within a short grace even if an escaped process still holds them. Output
is read as it comes, keeping at most ``max_output_bytes`` of each stream (the rest is discarded).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import IO, cast

logger = logging.getLogger(__name__)

ISOLATIONS = ("bwrap", "weak")
"""Values of ``AREAL_LIKE_SANDBOX`` (``task.sandbox``)."""
ENV_VAR = "AREAL_LIKE_SANDBOX"
"""Environment variable that chooses the isolation in every process that runs rewards."""
SANDBOX_UID = 65534
"""The uid (and gid) sandboxed code runs as when the caller is root: 'nobody' on Linux."""
_DRAIN_GRACE_S = 0.5
"""After the kill, how long the output pipes are still read (an escaped process may hold them)."""


class SandboxUnavailable(RuntimeError):
    """The chosen isolation cannot run here (bubblewrap missing or unusable)."""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run."""

    cpu_time_s: int = 2
    """CPU seconds before the kernel kills the child (RLIMIT_CPU)."""
    wall_time_s: float = 5.0
    """Wall-clock seconds before the parent kills the child's whole process tree."""
    memory_mb: int = 512
    """Address-space limit of the child (RLIMIT_AS), interpreter included (it needs about 30 MB)."""
    max_output_bytes: int = 1 << 20
    """Most bytes kept of stdout and of stderr each (and the largest file the child may write)."""
    max_processes: int = 16
    """Most processes and threads the sandboxed uid may have in its namespace (RLIMIT_NPROC)."""

    def __post_init__(self) -> None:
        if (
            self.cpu_time_s < 1
            or self.wall_time_s <= 0
            or self.memory_mb < 64
            or self.max_output_bytes < 1
            or self.max_processes < 1
        ):
            raise ValueError(
                f"SandboxLimits({self}): need cpu_time_s >= 1, wall_time_s > 0, memory_mb >= 64 "
                "(the interpreter alone needs ~30 MB), max_output_bytes >= 1, max_processes >= 1"
            )


@dataclass(frozen=True)
class SandboxResult:
    """How one sandboxed run ended."""

    status: str
    """'ok' (exit code 0), 'error' (non-zero exit, e.g. an exception or MemoryError) or 'timeout'
    (wall-clock deadline or CPU limit)."""
    returncode: int | None
    """Exit code; negative for a signal (-9 killed, -24 SIGXCPU); None if it never exited on its own.
    Under bubblewrap an exit code above 128 is read as a signal (bubblewrap's convention)."""
    stdout: str
    stderr: str
    network_isolation: str
    """'netns' (empty network namespace plus the audit hook) or 'audit-hook' (the hook alone)."""
    isolation: str = "bwrap"
    """'bwrap' (namespaces, read-only file system, unprivileged uid) or 'weak' (limits and hooks)."""
    output_truncated: bool = False
    """True when stdout or stderr had more than ``max_output_bytes`` (the rest was discarded)."""


_BLOCKED_EVENTS: tuple[str, ...] = (
    "socket.",
    "subprocess.Popen",
    "os.system",
    "os.exec",
    "os.fork",
    "os.posix_spawn",
    "os.spawn",
    "os.kill",
    "os.killpg",
    "signal.pthread_kill",
)
_BLOCKED_EVENTS += ("ctypes.",)
_BLOCKED_IMPORTS = ("_posixsubprocess", "_ctypes")
"""Modules whose import is refused: ``_posixsubprocess.fork_exec`` starts processes without an
audit event of its own."""

_HARNESS = """\
import json, resource, sys
limits = json.loads(sys.argv[1])
mb = 1024 * 1024
resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_time_s"], limits["cpu_time_s"] + 1))
resource.setrlimit(resource.RLIMIT_AS, (limits["memory_mb"] * mb, limits["memory_mb"] * mb))
resource.setrlimit(resource.RLIMIT_FSIZE, (limits["max_output_bytes"], limits["max_output_bytes"]))
resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_processes"], limits["max_processes"]))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
if sys.platform.startswith("linux"):  # die with the parent (the weak mode has no namespace for it)
    import ctypes
    ctypes.CDLL(None).prctl(1, 9)
    for name in [m for m in sys.modules if m.split(".")[0] in ("ctypes", "_ctypes")]:
        del sys.modules[name]  # so that the program's own import of ctypes meets the hook
blocked = tuple(json.loads(sys.argv[2]))
blocked_imports = frozenset(json.loads(sys.argv[3]))
def refuse(event, args, blocked=blocked, blocked_imports=blocked_imports):
    if event.startswith(blocked) or (event == "import" and args[0] in blocked_imports):
        raise PermissionError(f"sandbox: {event} {args[0] if event == 'import' else ''} is not allowed")
source = open("main.py").read()
program = compile(source, "main.py", "exec")
sys.addaudithook(refuse)
exec(program, {"__name__": "__main__", "__builtins__": __builtins__})
"""


def isolation_mode() -> str:
    """The isolation ``AREAL_LIKE_SANDBOX`` asks for ('bwrap' when unset)."""
    mode = os.environ.get(ENV_VAR, "bwrap")
    if mode not in ISOLATIONS:
        raise SandboxUnavailable(f"{ENV_VAR}={mode!r}: allowed values are {list(ISOLATIONS)}")
    return mode


@functools.lru_cache(maxsize=1)
def network_namespace_prefix() -> tuple[str, ...]:
    """The command prefix that runs a child in a new empty network namespace, or () if unavailable."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    # Keep the uid as it is inside (newer util-linux); older ones can only map it to root.
    for mapping in ("--map-current-user", "--map-root-user"):
        prefix = (unshare, "--net", mapping)
        try:
            probe = subprocess.run(
                [*prefix, "true"], capture_output=True, timeout=10, check=False, **_as_sandbox_user()
            )
        except (OSError, subprocess.TimeoutExpired):
            return ()
        if probe.returncode == 0:
            return prefix
    return ()


@functools.lru_cache(maxsize=1)
def bubblewrap_path() -> str | None:
    """``bwrap`` when it is on PATH and can make the sandbox's namespaces here (probed once), else None."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return None
    argv = [bwrap, "--ro-bind", "/", "/", "--unshare-user", "--unshare-pid", "--die-with-parent", "true"]
    try:
        probe = subprocess.run(argv, capture_output=True, timeout=10, check=False, **_as_sandbox_user())
    except (OSError, subprocess.TimeoutExpired):
        return None
    if probe.returncode != 0:
        logger.warning("bubblewrap at %s cannot make namespaces here: %s", bwrap, probe.stderr.decode()[:300])
        return None
    return bwrap


def run_python(code: str, stdin: str = "", limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``code`` as a Python program in an isolated, limited child process, feeding it ``stdin``."""
    limits = limits or SandboxLimits()
    mode = isolation_mode()
    bwrap = bubblewrap_path() if mode == "bwrap" else None
    if mode == "bwrap" and bwrap is None:
        raise SandboxUnavailable(
            "the code sandbox needs bubblewrap ('bwrap' on PATH, able to make user namespaces): install "
            "it (apt-get install -y bubblewrap) or opt into the weaker isolation with task.sandbox=weak "
            f"({ENV_VAR}=weak)"
        )
    python, python_dirs = _interpreter()
    netns = network_namespace_prefix()
    harness = [
        python,
        "-I",
        "-c",
        _HARNESS,
        json.dumps(asdict(limits)),
        json.dumps(_BLOCKED_EVENTS),
        json.dumps(_BLOCKED_IMPORTS),
    ]
    with tempfile.TemporaryDirectory(prefix="areal-sandbox-") as workdir:
        with open(os.path.join(workdir, "main.py"), "w") as f:
            f.write(code)
        if os.geteuid() == 0:
            os.chown(workdir, SANDBOX_UID, SANDBOX_UID)
        if bwrap is not None:
            argv = [*_bwrap_argv(bwrap, workdir, python_dirs, unshare_net=bool(netns)), *harness]
            cwd = "/"
        else:
            argv, cwd = [*netns, *harness], workdir
        process = subprocess.Popen(
            argv,
            cwd=cwd,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, so a kill takes any children with it
            **_as_sandbox_user(),
        )
        try:
            stdout, stderr, truncated, timed_out = _communicate(process, stdin.encode(), limits)
        finally:
            # Also reached when the caller is interrupted (the reward pool's per-call timer).
            if process.poll() is None:
                _kill_tree(process)
    returncode = process.returncode
    if bwrap is not None and returncode is not None and returncode > 128:
        returncode = 128 - returncode  # bubblewrap exits 128 + N for a payload killed by signal N
    if timed_out or returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        status = "timeout"
    else:
        status = "ok" if returncode == 0 else "error"
    return SandboxResult(
        status=status,
        returncode=None if timed_out else returncode,
        stdout=stdout.decode(errors="replace"),
        stderr=stderr.decode(errors="replace"),
        network_isolation="netns" if netns else "audit-hook",
        isolation=mode,
        output_truncated=truncated,
    )


def _bwrap_argv(bwrap: str, workdir: str, python_dirs: list[str], unshare_net: bool) -> list[str]:
    """bubblewrap's options: namespaces, the read-only system view, the private writable places."""
    argv = [bwrap, "--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts"]
    argv.append("--unshare-cgroup-try")
    if unshare_net:
        argv.append("--unshare-net")
    argv += ["--die-with-parent", "--new-session", "--cap-drop", "ALL", "--ro-bind", "/usr", "/usr"]
    for path in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    argv += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    for path in python_dirs:
        argv += ["--ro-bind", path, path]
    argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--bind", workdir, "/sandbox"]
    return [*argv, "--chdir", "/sandbox", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--"]


def _interpreter() -> tuple[str, list[str]]:
    """A Python the sandbox uid can run, and the directories to bind for it (outside /usr).

    The caller's own interpreter when that uid can reach it (it is the caller, or every directory
    on the way is world-readable); else the system's python3 (the harness needs only the stdlib)."""
    candidates = [(os.path.realpath(sys.executable), sys.base_prefix)]
    for path in ("/usr/bin/python3", "/usr/local/bin/python3"):
        candidates.append((path, os.path.dirname(os.path.dirname(path))))
    for path, prefix in candidates:
        if os.path.isfile(path) and (os.geteuid() != 0 or _world_reachable(path)):
            prefix = os.path.realpath(prefix)
            return path, [] if prefix == "/usr" or prefix.startswith("/usr/") else [prefix]
    raise SandboxUnavailable(
        f"no Python interpreter the sandbox uid {SANDBOX_UID} can run: {sys.executable} is under a "
        "directory only root can enter; install python3 in /usr/bin"
    )


def _world_reachable(path: str) -> bool:
    """Every directory above ``path`` is world-searchable and the file is world-executable."""
    current = os.path.realpath(path)
    if not os.stat(current).st_mode & stat.S_IXOTH:
        return False
    while current != "/":
        current = os.path.dirname(current)
        if not os.stat(current).st_mode & stat.S_IXOTH:
            return False
    return True


def _as_sandbox_user() -> dict:
    """``Popen`` arguments that drop root to the sandbox uid (nothing for a non-root caller)."""
    if os.geteuid() != 0:
        return {}
    return {"user": SANDBOX_UID, "group": SANDBOX_UID, "extra_groups": []}


def _communicate(
    process: subprocess.Popen, data: bytes, limits: SandboxLimits
) -> tuple[bytes, bytes, bool, bool]:
    """Feed stdin and read both outputs until the child exits or ``wall_time_s`` passes (then kill
    its tree); keeps at most ``max_output_bytes`` of each. (stdout, stderr, truncated, timed out)."""
    cap = limits.max_output_bytes
    stdin, stdout, stderr = process.stdin, process.stdout, process.stderr
    assert stdin is not None and stdout is not None and stderr is not None, "started with three pipes"
    kept: dict[IO[bytes], bytearray] = {stdout: bytearray(), stderr: bytearray()}
    truncated = timed_out = False
    deadline = time.monotonic() + limits.wall_time_s
    with selectors.DefaultSelector() as selector:
        for stream in kept:
            os.set_blocking(stream.fileno(), False)
            selector.register(stream, selectors.EVENT_READ)
        if data:
            os.set_blocking(stdin.fileno(), False)
            selector.register(stdin, selectors.EVENT_WRITE)
        else:
            stdin.close()
        pending = memoryview(data)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0 and not timed_out:
                timed_out = True
                _kill_tree(process)
                deadline = time.monotonic() + _DRAIN_GRACE_S
                continue
            if remaining <= 0:
                break  # an escaped process holds a pipe: stop reading, the kill was done
            for key, _ in selector.select(timeout=remaining):
                stream = cast(IO[bytes], key.fileobj)
                if stream is stdin:
                    try:
                        pending = pending[os.write(stream.fileno(), pending[: 1 << 16]) :]
                    except (BrokenPipeError, BlockingIOError) as err:
                        if isinstance(err, BlockingIOError):
                            continue
                        pending = pending[:0]
                    if not pending:
                        selector.unregister(stream)
                        stream.close()
                    continue
                chunk = os.read(stream.fileno(), 1 << 16)
                if not chunk:
                    selector.unregister(stream)
                    continue
                room = cap - len(kept[stream])
                kept[stream] += chunk[:room]
                truncated |= len(chunk) > room
        for stream in (stdin, stdout, stderr):
            with contextlib.suppress(OSError):
                stream.close()
    if not timed_out:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:  # closed its pipes but kept running
            timed_out = True
            _kill_tree(process)
    return bytes(kept[stdout]), bytes(kept[stderr]), truncated, timed_out


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the child's process group (under bubblewrap the namespace then takes the rest)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    process.wait(timeout=10)
