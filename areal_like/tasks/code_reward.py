"""Code rewards: run the model's program against test cases in the sandbox (``areal_like.tasks.sandbox``).

Use: ``task.name=code`` (prompts from files), or ``task.reward_fn=areal_like.tasks.code_reward:code_reward``.
The ground truth ``answer`` of a prompt is a JSON object, one of:
- ``{"tests": [{"input": "1 2\\n", "output": "3"}, ...]}``: the program reads stdin and prints; a test
  passes when it exits 0 and its stdout equals ``output`` up to surrounding whitespace;
- ``{"asserts": "assert add(1, 2) == 3\\n..."}``: the asserts run after the program's code; pass
  when they exit 0.
Optional keys: ``"cpu_time_s"``, ``"wall_time_s"``, ``"memory_mb"`` per test (``SandboxLimits``).
The program is the last fenced code block of the response (```python ... ```), or the whole
response when it has none. Reward: the fraction of tests passed (asserts count as one test).
Untrusted code never runs in this process: each test is one ``run_python`` child under bubblewrap
(namespaces, a read-only file system, an unprivileged uid, a process limit; ``task.sandbox=weak``
for limits and audit hooks only) with CPU, memory and wall-clock limits and no network. Budget
``task.reward_timeout_s`` for tests x wall_time_s. Without bubblewrap (and no opt-in) every call
raises ``SandboxUnavailable``: the reward pool counts errors, and the run's preflight refuses to
start first.
"""

from __future__ import annotations

import json
import re

from areal_like.tasks.sandbox import SandboxLimits, run_python

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_program(response: str) -> str:
    """The last fenced code block of ``response``, or the whole response when it has none."""
    blocks = _FENCE.findall(response)
    return blocks[-1] if blocks else response


def code_reward(response: str, answer: str) -> float:
    """Fraction of the ground truth's tests the response's program passes (see the module docstring)."""
    try:
        spec = json.loads(answer)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"code ground truth is not JSON ({e}); expected {{'tests': [...]}} or {{'asserts': ...}}"
        ) from None
    if not isinstance(spec, dict) or not ("tests" in spec or "asserts" in spec):
        raise ValueError(f"code ground truth {answer[:80]!r} has neither 'tests' nor 'asserts'")
    limits = SandboxLimits(
        **{key: spec[key] for key in ("cpu_time_s", "wall_time_s", "memory_mb") if key in spec}
    )
    program = extract_program(response)
    if "asserts" in spec:
        result = run_python(program + "\n\n" + spec["asserts"], limits=limits)
        return 1.0 if result.status == "ok" else 0.0
    tests = spec["tests"]
    if not tests:
        raise ValueError("code ground truth has an empty 'tests' list")
    passed = 0
    for test in tests:
        result = run_python(program, stdin=test.get("input", ""), limits=limits)
        passed += result.status == "ok" and result.stdout.strip() == str(test["output"]).strip()
    return passed / len(tests)
