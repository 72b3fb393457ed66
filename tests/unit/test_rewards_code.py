"""The code reward's sandbox: limits, no network, nothing run in the caller; and the reward itself."""

from __future__ import annotations

import json
import os

import pytest

from areal_like.tasks import sandbox
from areal_like.tasks.code_reward import code_reward, extract_program
from areal_like.tasks.sandbox import SandboxLimits, run_python
from rollout.rewards import RewardPool

NETWORK_PROBE = """
import socket
try:
    socket.create_connection(("93.184.216.34", 80), timeout=1)
    print("connected")
except OSError as e:
    print("refused:", e)
"""


def test_a_program_reads_stdin_and_prints_in_a_child_process():
    result = run_python("import os; print(input()[::-1], os.getpid())", stdin="abc\n")
    assert result.status == "ok" and result.returncode == 0
    reversed_text, child_pid = result.stdout.split()
    assert reversed_text == "cba" and int(child_pid) != os.getpid()


def test_a_crash_and_an_exit_stay_in_the_child():
    assert run_python("raise SystemExit(3)").returncode == 3
    result = run_python("import os; os._exit(0) if False else 1/0")
    assert result.status == "error" and "ZeroDivisionError" in result.stderr


def test_a_busy_loop_is_stopped_by_the_cpu_limit():
    result = run_python("while True: pass", limits=SandboxLimits(cpu_time_s=1, wall_time_s=20))
    assert result.status == "timeout" and result.returncode is not None and result.returncode < 0


def test_a_sleeping_program_is_killed_at_the_wall_clock_deadline():
    result = run_python("import time; time.sleep(30)", limits=SandboxLimits(wall_time_s=0.5))
    assert result.status == "timeout" and result.returncode is None


def test_allocating_past_the_memory_limit_fails_in_the_child():
    result = run_python("x = bytearray(400 * 1024 * 1024)", limits=SandboxLimits(memory_mb=128))
    assert result.status == "error" and "MemoryError" in result.stderr


def test_processes_and_ctypes_are_refused():
    for code in (
        "import subprocess; subprocess.run(['true'])",
        "import os; os.system('true')",
        "import ctypes",
    ):
        result = run_python(code)
        assert result.status == "error" and "is not allowed" in result.stderr, code


def test_no_network_in_the_namespace_even_without_python_sockets():
    if not sandbox.network_namespace_prefix():
        pytest.skip("this kernel does not allow an unprivileged network namespace")
    # The audit hook stops Python sockets; the namespace is what stops everything else: it has no
    # interface but loopback (read from /proc, no socket involved).
    result = run_python(
        "print(sorted(l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]))"
    )
    assert result.network_isolation == "netns" and result.stdout.strip() == "['lo']"
    assert run_python(NETWORK_PROBE).stdout.startswith("refused: sandbox: socket.")


def test_without_a_namespace_the_audit_hook_still_refuses_sockets(monkeypatch):
    monkeypatch.setattr(sandbox, "network_namespace_prefix", lambda: ())
    result = run_python(NETWORK_PROBE)
    assert result.network_isolation == "audit-hook"
    assert result.stdout.startswith("refused: sandbox: socket.")


def test_extract_program_takes_the_last_fenced_block_or_the_whole_text():
    response = "first\n```python\nprint(1)\n```\nthen\n```\nprint(2)\n```\n"
    assert extract_program(response) == "print(2)\n"
    assert extract_program("print(3)") == "print(3)"


def test_code_reward_is_the_fraction_of_tests_passed():
    tests = {
        "tests": [
            {"input": "1 2\n", "output": "3"},
            {"input": "2 2\n", "output": "4"},
            {"input": "5 5\n", "output": "11"},
        ]
    }
    program = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    assert code_reward(program, json.dumps(tests)) == pytest.approx(2 / 3)
    asserts = {"asserts": "assert add(2, 3) == 5"}
    assert code_reward("def add(a, b):\n    return a + b", json.dumps(asserts)) == 1.0
    assert code_reward("def add(a, b):\n    return a - b", json.dumps(asserts)) == 0.0
    with pytest.raises(ValueError, match="neither 'tests' nor 'asserts'"):
        code_reward("", "{}")


def test_code_reward_in_the_pool_scores_a_hanging_program_zero_and_the_pool_goes_on():
    spec = json.dumps({"tests": [{"input": "", "output": "ok"}], "wall_time_s": 1.0})
    with RewardPool("areal_like.tasks.code_reward:code_reward", timeout_s=10.0) as pool:
        results = pool.score([("print('ok')", spec), ("while True: pass", spec), ("print('ok')", spec)])
    assert [(r.value, r.status) for r in results] == [(1.0, "ok"), (0.0, "ok"), (1.0, "ok")]
