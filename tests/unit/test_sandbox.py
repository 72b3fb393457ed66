"""The code sandbox holds: programs that fork-exec 200 children, kill another process, read
/etc/passwd, write outside their directory or leave ``sleep infinity`` behind are each stopped within
the wall limit + 1 s. Each attack is tried against the audit hooks and, with the hooks switched
off, against the isolation alone (bubblewrap's namespaces, the read-only view, the process limit)."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from areal_like.tasks import sandbox
from areal_like.tasks.sandbox import SandboxLimits, SandboxUnavailable, run_python

needs_bwrap = pytest.mark.skipif(
    sandbox.bubblewrap_path() is None,
    reason="bubblewrap (bwrap) is not installed or cannot make user namespaces here; "
    "install it with `apt-get install -y bubblewrap` (.ci/run does)",
)
WALL = SandboxLimits(wall_time_s=3.0)


@pytest.fixture
def no_hooks(monkeypatch):
    """Switch the audit hooks off, so that only the isolation stands in the way."""
    monkeypatch.setattr(sandbox, "_BLOCKED_EVENTS", ())
    monkeypatch.setattr(sandbox, "_BLOCKED_IMPORTS", ())


def timed(code: str, limits: SandboxLimits = WALL) -> tuple[sandbox.SandboxResult, float]:
    started = time.monotonic()
    result = run_python(code, limits=limits)
    elapsed_s = time.monotonic() - started
    assert elapsed_s < limits.wall_time_s + 1.0, (elapsed_s, result)
    return result, elapsed_s


def processes_running(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if marker in line and "ps -eo" not in line]


FORK_EXEC_200 = """
import subprocess
started = []
try:
    for _ in range(200):
        started.append(subprocess.Popen(["sleep", "61.2345"]))
except OSError as e:
    print("refused:", type(e).__name__)
print(len(started))
"""


@needs_bwrap
def test_fork_exec_is_refused_by_the_hooks():
    result, _ = timed("import _posixsubprocess\n_posixsubprocess.fork_exec")
    assert result.status == "error" and "_posixsubprocess is not allowed" in result.stderr


@needs_bwrap
def test_without_hooks_200_fork_execs_stop_at_the_process_limit_and_nothing_is_left(no_hooks):
    result, _ = timed(FORK_EXEC_200)
    assert "refused: BlockingIOError" in result.stdout, result
    assert int(result.stdout.split()[-1]) < sandbox.SandboxLimits().max_processes
    assert not processes_running("sleep 61.2345")  # they died with the PID namespace


@needs_bwrap
@pytest.mark.parametrize("hooks", ["on", "off"])
def test_another_process_cannot_be_killed(request, hooks):
    if hooks == "off":
        request.getfixturevalue("no_hooks")
    victim = subprocess.Popen(["sleep", "60"])
    try:
        result, _ = timed(f"import os\nos.kill({victim.pid}, 9)")
        expected = "PermissionError: sandbox: os.kill" if hooks == "on" else "ProcessLookupError"
        assert result.status == "error" and expected in result.stderr, result.stderr
        time.sleep(0.2)
        assert victim.poll() is None  # alive
    finally:
        victim.kill()
        victim.wait()


FILE_SYSTEM = """
import os
def attempt(what, fn):
    try:
        fn()
        print(what, "ok")
    except OSError as e:
        print(what, type(e).__name__)
attempt("read-passwd", lambda: open("/etc/passwd").read())
attempt("write-outside", lambda: open({outside!r}, "w").write("x"))
attempt("write-usr", lambda: open("/usr/escape.txt", "w").write("x"))
attempt("write-here", lambda: open("here.txt", "w").write("x"))
attempt("write-tmp", lambda: open("/tmp/t.txt", "w").write("x"))
print("uid", os.getuid())
"""


@needs_bwrap
@pytest.mark.parametrize("hooks", ["on", "off"])
def test_the_file_system_is_read_only_except_a_private_directory(request, tmp_path, hooks):
    if hooks == "off":
        request.getfixturevalue("no_hooks")
    outside = tmp_path / "escape.txt"
    result, _ = timed(FILE_SYSTEM.format(outside=str(outside)))
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert lines["read-passwd"] == "FileNotFoundError"  # /etc is not in the sandbox's view
    assert lines["write-outside"] == "FileNotFoundError" and not outside.exists()
    assert lines["write-usr"] == "OSError"  # EROFS: a read-only bind
    assert lines["write-here"] == "ok" and lines["write-tmp"] == "ok"
    if os.geteuid() == 0:
        assert lines["uid"] == str(sandbox.SANDBOX_UID)


@needs_bwrap
def test_sleep_infinity_left_behind_dies_with_the_program(no_hooks):
    before = len(processes_running("sleep infinity"))
    code = 'import subprocess\nsubprocess.Popen(["sleep", "infinity"], start_new_session=True)\nprint("bye")'
    result, elapsed_s = timed(code)
    assert result.status == "ok" and result.stdout.strip() == "bye" and elapsed_s < 2.0
    assert len(processes_running("sleep infinity")) <= before


@needs_bwrap
def test_a_child_holding_the_output_pipe_does_not_outlive_the_wall_limit(no_hooks):
    code = 'import subprocess, time\nsubprocess.Popen(["sleep", "876543"], start_new_session=True)\n'
    code += "time.sleep(60)"
    result, _ = timed(code, SandboxLimits(wall_time_s=1.0))
    assert result.status == "timeout"
    assert not processes_running("sleep 876543")


@needs_bwrap
def test_output_is_read_up_to_the_cap_and_the_rest_discarded():
    result, _ = timed("import sys\nfor _ in range(40): sys.stdout.write('x' * (1 << 19))")
    assert result.status == "ok" and result.output_truncated
    assert len(result.stdout) == sandbox.SandboxLimits().max_output_bytes


def test_without_bubblewrap_the_sandbox_refuses_unless_the_weak_mode_is_chosen(monkeypatch):
    monkeypatch.setattr(sandbox, "bubblewrap_path", lambda: None)
    monkeypatch.delenv(sandbox.ENV_VAR, raising=False)
    with pytest.raises(SandboxUnavailable, match="task.sandbox=weak"):
        run_python("print(1)")
    monkeypatch.setenv(sandbox.ENV_VAR, "weak")
    result = run_python("import os\nprint(os.getuid())")
    assert result.status == "ok" and result.isolation == "weak"
    if os.geteuid() == 0:  # even the weak mode does not run model output as root
        assert result.stdout.strip() == str(sandbox.SANDBOX_UID)
    result, _ = timed("import os\nos.kill(1, 9)")
    assert "sandbox: os.kill" in result.stderr
