"""Run untrusted Python (model output) in a separate, limited process: the code reward's sandbox.

``run_python(code, stdin, limits)`` writes the code to a fresh temporary directory and runs it as
``python -I`` (isolated mode: no PYTHON* variables, no user site directory) in a child process,
with an environment holding only PATH, and returns its exit status and (capped) output. Nothing of
the untrusted code ever runs in the caller's process. Limits, set in the child by a small harness
before the untrusted code is compiled:
- CPU time: ``RLIMIT_CPU`` (the kernel kills the child), plus a wall-clock deadline after which the
  parent kills the child's whole process group (a sleeping or blocked program uses no CPU).
- memory: ``RLIMIT_AS`` (address space): an allocation past it raises MemoryError in the child.
- files: ``RLIMIT_FSIZE`` caps any file it writes; no core dumps; output read back is capped too.
- network, two layers:
  1. a new, empty network namespace (``unshare --net --map-root-user``: only a loopback device,
     down), so no packet can leave whatever the code does. Used when the kernel allows creating
     one (probed once per process); ``SandboxResult.network_isolation`` is then 'netns'.
  2. always: a ``sys.addaudithook`` hook in the child that refuses socket creation and use, process
     creation (``subprocess``, ``os.system``, ``os.exec*``, ``os.fork``, ``os.posix_spawn``) and
     ``ctypes``. Without a namespace ('audit-hook') this is the only network barrier; audit hooks
     stop Python code, not native code, hence the namespace where available.
Not covered: the file system. The child runs as the caller's user in a temporary working directory
and can read what that user can; run rollout workers as an unprivileged user in a container.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run."""

    cpu_time_s: int = 2
    """CPU seconds before the kernel kills the child (RLIMIT_CPU)."""
    wall_time_s: float = 5.0
    """Wall-clock seconds before the parent kills the child's process group."""
    memory_mb: int = 512
    """Address-space limit of the child (RLIMIT_AS), interpreter included (it needs about 30 MB)."""
    max_output_bytes: int = 1 << 20
    """Most bytes kept of stdout and of stderr each (and the largest file the child may write)."""

    def __post_init__(self) -> None:
        if self.cpu_time_s < 1 or self.wall_time_s <= 0 or self.memory_mb < 64 or self.max_output_bytes < 1:
            raise ValueError(
                f"SandboxLimits({self}): need cpu_time_s >= 1, wall_time_s > 0, memory_mb >= 64 "
                "(the interpreter alone needs ~30 MB), max_output_bytes >= 1"
            )


@dataclass(frozen=True)
class SandboxResult:
    """How one sandboxed run ended."""

    status: str
    """'ok' (exit code 0), 'error' (non-zero exit, e.g. an exception or MemoryError) or 'timeout'
    (wall-clock deadline or CPU limit)."""
    returncode: int | None
    """Exit code; negative for a signal (-9 killed, -24 SIGXCPU); None if it never exited on its own."""
    stdout: str
    stderr: str
    network_isolation: str
    """'netns' (empty network namespace plus the audit hook) or 'audit-hook' (the hook alone)."""


_BLOCKED_EVENTS = (
    "socket.",
    "subprocess.Popen",
    "os.system",
    "os.exec",
    "os.fork",
    "os.posix_spawn",
    "os.spawn",
)
_BLOCKED_EVENTS += ("ctypes.",)

_HARNESS = """\
import json, resource, sys
limits = json.loads(sys.argv[1])
mb = 1024 * 1024
resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_time_s"], limits["cpu_time_s"] + 1))
resource.setrlimit(resource.RLIMIT_AS, (limits["memory_mb"] * mb, limits["memory_mb"] * mb))
resource.setrlimit(resource.RLIMIT_FSIZE, (limits["max_output_bytes"], limits["max_output_bytes"]))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
blocked = tuple(json.loads(sys.argv[2]))
def refuse(event, args, blocked=blocked):
    if event.startswith(blocked):
        raise PermissionError(f"sandbox: {event} is not allowed")
source = open("main.py").read()
program = compile(source, "main.py", "exec")
sys.addaudithook(refuse)
exec(program, {"__name__": "__main__", "__builtins__": __builtins__})
"""


@functools.lru_cache(maxsize=1)
def network_namespace_prefix() -> tuple[str, ...]:
    """The command prefix that runs a child in a new empty network namespace, or () if unavailable."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    prefix = (unshare, "--net", "--map-root-user")
    try:
        probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return prefix if probe.returncode == 0 else ()


def run_python(code: str, stdin: str = "", limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``code`` as a Python program in a limited child process, feeding it ``stdin``."""
    limits = limits or SandboxLimits()
    prefix = network_namespace_prefix()
    with tempfile.TemporaryDirectory(prefix="areal-sandbox-") as workdir:
        with open(os.path.join(workdir, "main.py"), "w") as f:
            f.write(code)
        argv = [
            *prefix,
            sys.executable,
            "-I",
            "-c",
            _HARNESS,
            json.dumps(asdict(limits)),
            json.dumps(_BLOCKED_EVENTS),
        ]
        process = subprocess.Popen(
            argv,
            cwd=workdir,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, so a kill takes any children with it
        )
        timed_out = False
        try:
            stdout, stderr = process.communicate(stdin.encode(), timeout=limits.wall_time_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(process)
            stdout, stderr = process.communicate()
        finally:
            # Also reached when the caller is interrupted (the reward pool's per-call timer).
            if process.poll() is None:
                _kill_group(process)
    returncode = process.returncode
    if timed_out or returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        status = "timeout"
    else:
        status = "ok" if returncode == 0 else "error"
    cap = limits.max_output_bytes
    return SandboxResult(
        status=status,
        returncode=None if timed_out else returncode,
        stdout=stdout[:cap].decode(errors="replace"),
        stderr=stderr[:cap].decode(errors="replace"),
        network_isolation="netns" if prefix else "audit-hook",
    )


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
