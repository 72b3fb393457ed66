"""Tools for multi-turn episodes: the call format, running a tool under a timeout, a tool-using env.

- Call format (pluggable, ``ToolCallParser``): the default ``TaggedJsonParser`` reads every
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` in a model turn. A turn without a call
  is the model's final answer.
- ``run_tool`` runs one call and always returns text: the tool's result, or an ``error: ...`` line
  when the call was malformed, named an unknown tool, raised, ran past its timeout or returned
  something other than a string (garbage). A fault ends only that call; the episode goes on with
  the error as the tool's answer and the fault is counted.
- Where tools run: an ``async`` tool on the episode loop (cancelled at its timeout); a plain
  function on a fresh daemon thread, so neither the engine's thread nor the episode loop ever waits
  for it. Threads cannot be killed: a sync tool that hangs keeps its thread until it returns (the
  episode has moved on; the thread never blocks shutdown because it is a daemon).
- ``ToolEnv`` is an ``Environment`` over a set of tools: each turn's calls run in order and their
  results come back as ``<tool_response>`` turns (role 'tool'); a turn without a call ends the
  episode and is scored by ``score``. Subclass it and give it tools (see ``areal_like.tasks.calculator``
  and docs/multiturn.md).

No torch here: task modules that define environments are imported by reward worker processes.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from rollout.env import StepResult

if TYPE_CHECKING:
    from areal_like.core.types import PromptRecord

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToolCall:
    """One call parsed from a model turn."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class MalformedCall:
    """A span that looked like a call but could not be parsed (answered with an error, counted)."""

    reason: str


class ToolCallParser(Protocol):
    """Finds the tool calls in the text of one model turn."""

    def parse(self, text: str) -> list[ToolCall | MalformedCall]:
        """Every call in ``text``, in order; an empty list means the turn made no call."""
        ...


@dataclass(frozen=True)
class TaggedJsonParser:
    """The default call format: ``<tool_call>{"name": NAME, "arguments": {...}}</tool_call>``
    (Qwen's and Hermes'). An opening tag without its closing tag is a malformed call."""

    open_tag: str = "<tool_call>"
    close_tag: str = "</tool_call>"

    def parse(self, text: str) -> list[ToolCall | MalformedCall]:
        calls: list[ToolCall | MalformedCall] = []
        pattern = re.escape(self.open_tag) + r"(.*?)(" + re.escape(self.close_tag) + r"|$)"
        for match in re.finditer(pattern, text, flags=re.DOTALL):
            body, closed = match.group(1).strip(), bool(match.group(2))
            if not closed:
                calls.append(MalformedCall(f"{self.open_tag} without {self.close_tag}"))
                continue
            try:
                payload = json.loads(body)
            except json.JSONDecodeError as err:
                calls.append(MalformedCall(f"call is not JSON ({err.msg})"))
                continue
            if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
                calls.append(MalformedCall('call needs {"name": str, "arguments": object}'))
                continue
            arguments = payload.get("arguments", {})
            if not isinstance(arguments, dict):
                calls.append(MalformedCall("call arguments must be a JSON object"))
                continue
            calls.append(ToolCall(payload["name"], arguments))
        return calls


class Tool(Protocol):
    """A tool: a name, a one-line description for the prompt, and a call taking the JSON arguments
    as keyword arguments and returning text. The call may be ``async``."""

    name: str
    description: str

    def __call__(self, **arguments: Any) -> Any: ...


@dataclass(frozen=True)
class ToolOutcome:
    """The text a call answers with, and whether it was a fault (error text, counted)."""

    text: str
    error: bool


async def run_tool(call: ToolCall | MalformedCall, tools: dict[str, Tool], timeout_s: float) -> ToolOutcome:
    """Run one call (see the module docstring); never raises, except when cancelled."""
    if isinstance(call, MalformedCall):
        return ToolOutcome(f"error: {call.reason}", True)
    tool = tools.get(call.name)
    if tool is None:
        return ToolOutcome(f"error: unknown tool {call.name}; tools: {', '.join(sorted(tools))}", True)
    try:
        if inspect.iscoroutinefunction(tool) or inspect.iscoroutinefunction(type(tool).__call__):
            result = await asyncio.wait_for(tool(**call.arguments), timeout_s)
        else:
            result = await asyncio.wait_for(_on_daemon_thread(lambda: tool(**call.arguments)), timeout_s)
    except TimeoutError:
        logger.warning("tool %s: no answer within %.1fs (%s)", call.name, timeout_s, call.arguments)
        return ToolOutcome(f"error: {call.name} timed out after {timeout_s:g}s", True)
    except Exception as err:  # the tool's own fault: answered as text, counted, never raised
        return ToolOutcome(f"error: {call.name} failed: {type(err).__name__}: {err}", True)
    if not isinstance(result, str):
        return ToolOutcome(f"error: {call.name} returned {type(result).__name__}, not text", True)
    return ToolOutcome(result, False)


def _on_daemon_thread(fn: Callable[[], Any]) -> asyncio.Future:
    """Run ``fn`` on a new daemon thread; a future of the running loop resolves with its result."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(value: Any, error: BaseException | None) -> None:
        if future.done():  # the caller gave up (timeout, cancel)
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    def target() -> None:
        try:
            value, error = fn(), None
        except BaseException as err:
            value, error = None, err
        if not loop.is_closed():
            loop.call_soon_threadsafe(settle, value, error)

    threading.Thread(target=target, name="tool-call", daemon=True).start()
    return future


class ToolEnv:
    """An ``Environment`` of tool use (see the module docstring). Subclasses set ``tools`` (or pass
    them) and implement ``score``; they may override ``prompt`` to describe the tools."""

    tools: tuple[Tool, ...] = ()

    def __init__(
        self,
        tools: tuple[Tool, ...] | None = None,
        parser: ToolCallParser | None = None,
        tool_timeout_s: float = 5.0,
    ) -> None:
        if tool_timeout_s <= 0:
            raise ValueError(f"tool_timeout_s={tool_timeout_s}: must be > 0 seconds")
        chosen = self.tools if tools is None else tools
        self.tool_map: dict[str, Tool] = {tool.name: tool for tool in chosen}
        self.parser = parser or TaggedJsonParser()
        self.tool_timeout_s = tool_timeout_s
        self.task: PromptRecord | None = None
        self.history: list[ToolOutcome] = []
        """Every call's outcome in this episode, in order."""

    async def reset(self, task: PromptRecord) -> str:
        self.task = task
        return self.prompt(task)

    async def step(self, action: str) -> StepResult:
        calls = self.parser.parse(action)
        if not calls:
            assert self.task is not None, "step before reset"
            return StepResult(observation="", reward=self.score(action, self.task), done=True)
        outcomes = [await run_tool(call, self.tool_map, self.tool_timeout_s) for call in calls]
        self.history.extend(outcomes)
        return StepResult(
            observation=[o.text for o in outcomes],
            tool_calls=len(calls),
            tool_errors=sum(o.error for o in outcomes),
        )

    def prompt(self, task: PromptRecord) -> str:
        """The first observation: the task's prompt text as is."""
        return task.text

    def score(self, answer: str, task: PromptRecord) -> float:
        """Reward of the final answer (a turn without a tool call)."""
        raise NotImplementedError(f"{type(self).__name__}.score: say how a final answer is rewarded")


# ---- the calculator tool ---------------------------------------------------------------------------
_MAX_EXPRESSION_CHARS = 200
_MAX_EXPONENT = 64


class Calculator:
    """Evaluates an arithmetic expression: integers and decimals, + - * / // % ** and parentheses.
    Integer results are exact; others are printed with up to 12 significant digits."""

    name = "calculator"
    description = 'evaluate arithmetic, e.g. {"expression": "12*(3+4)"}'

    def __call__(self, expression: str = "", **unexpected: Any) -> str:
        if unexpected:
            raise ValueError(f"unexpected arguments {sorted(unexpected)}; pass only 'expression'")
        if not isinstance(expression, str) or not expression.strip():
            raise ValueError("'expression' must be a non-empty string")
        if len(expression) > _MAX_EXPRESSION_CHARS:
            raise ValueError(f"expression longer than {_MAX_EXPRESSION_CHARS} characters")
        value = _evaluate(_parse(expression))
        if isinstance(value, float):
            if not math.isfinite(value):
                raise ValueError("result is not finite")
            if value.is_integer() and abs(value) < 1e15:
                return str(int(value))
            return f"{value:.12g}"
        return str(value)


def _parse(expression: str):
    import ast

    try:
        return ast.parse(expression.strip(), mode="eval").body
    except SyntaxError:
        raise ValueError("not an arithmetic expression") from None


def _evaluate(node) -> int | float:
    import ast
    import operator

    binary = {
        ast.Add: operator.add,
        ast.Sub: operator.sub,
        ast.Mult: operator.mul,
        ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv,
        ast.Mod: operator.mod,
        ast.Pow: operator.pow,
    }
    if (
        isinstance(node, ast.Constant)
        and isinstance(node.value, (int, float))
        and not isinstance(node.value, bool)
    ):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _evaluate(node.operand)
        return value if isinstance(node.op, ast.UAdd) else -value
    if isinstance(node, ast.BinOp) and type(node.op) in binary:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
            raise ValueError(f"exponent above {_MAX_EXPONENT}")
        return binary[type(node.op)](left, right)
    raise ValueError("only numbers, + - * / // % ** and parentheses are allowed")
