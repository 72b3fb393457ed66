"""The environment interface of multi-turn rollouts, and the episode's limits (``rollout.episode``).

An environment is one episode's world: ``reset(task)`` gives the first observation (the text of the
first user turn), and ``step(action)`` takes the text of one model turn and answers with a
``StepResult`` (observation, reward, done, info). The episode runner (``rollout/episode.py``)
creates one environment per episode with the factory named by ``EpisodeConfig.env`` and drives it
from its asyncio loop, never from the engine's thread. Rewards may come per turn or at the end; the
episode's reward is their sum. ``rollout/tools.py`` has a ready environment for tool use
(``ToolEnv``); docs/multiturn.md shows how to write one.

This module is part of the config (``rollout.config`` imports ``EpisodeConfig``): no torch or Ray.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from areal_like.core.imports import import_callable
from rollout.chat import check_template_kwargs

if TYPE_CHECKING:
    from areal_like.core.types import PromptRecord


@dataclass
class EpisodeConfig:
    """Multi-turn episodes: the environment, and the limits of one episode."""

    env: str | None = None
    """Environment factory as 'package.module:callable', called with ``env_args`` once per episode
    (e.g. 'areal_like.tasks.calculator:CalculatorEnv'); null = single-turn rollouts."""
    env_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the environment factory (e.g. {tool_timeout_s: 2.0})."""
    max_turns: int = 4
    """Most model turns in one episode; after the last one the episode ends ('turns')."""
    max_total_tokens: int = 512
    """Most response tokens in one episode, sampled and environment ones together; a turn samples
    at most min(rollout.max_new_tokens, what is left). Keep prompt + this within the model's
    positions."""
    max_episode_s: float = 300.0
    """Wall-clock limit of one episode: past it the running turn is aborted at a token boundary and
    the episode ends ('timeout') with the tokens and rewards so far."""
    step_timeout_s: float = 30.0
    """Longest one ``reset`` or ``step`` call of the environment (its tools included) may take; past
    it, or when the call raises, the episode ends ('error') and is counted in env errors."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Variables the tokenizer's chat template reads besides the messages, for every turn of an
    episode (e.g. {enable_thinking: false} for Qwen3); ignored without a chat template."""

    @property
    def enabled(self) -> bool:
        return self.env is not None

    def __post_init__(self) -> None:
        if self.env is not None and ":" not in self.env:
            raise ValueError(
                f"rollout.episode.env={self.env!r}: expected 'package.module:callable', e.g. "
                "'areal_like.tasks.calculator:CalculatorEnv'"
            )
        for name in ("max_turns", "max_total_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"rollout.episode.{name}={getattr(self, name)}: must be >= 1")
        for name in ("max_episode_s", "step_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"rollout.episode.{name}={getattr(self, name)}: must be > 0 seconds")
        check_template_kwargs("rollout.episode.chat_template_kwargs", self.chat_template_kwargs)


@dataclass
class StepResult:
    """What an environment answers to one model turn: (observation, reward, done, info)."""

    observation: str | list[str]
    """Text appended as the next turn (tokenized once, loss mask 0); a list is several messages of
    ``role`` (one per tool result). Ignored when ``done``."""
    reward: float = 0.0
    """Reward of this turn; the episode's reward is the sum over its turns."""
    done: bool = False
    """The episode is over (e.g. the model gave its final answer)."""
    role: str = "tool"
    """Chat role of the observation: 'tool' (tool results, wrapped in <tool_response>) or 'user'."""
    tool_calls: int = 0
    """Tool calls made in this turn (metrics)."""
    tool_errors: int = 0
    """Tool calls of this turn that failed: raised, timed out, returned garbage or were malformed."""
    info: dict[str, Any] = field(default_factory=dict)
    """Anything else the environment reports (logged with the episode, not trained on)."""


class Environment(Protocol):
    """One episode of an environment (see the module docstring). Both methods may also be plain
    functions; then they run on the episode loop's thread and must be quick."""

    def reset(self, task: PromptRecord) -> Awaitable[str] | str:
        """Start the episode for ``task`` (its prompt text and answer); return the first observation."""
        ...

    def step(self, action: str) -> Awaitable[StepResult] | StepResult:
        """Take the text of one model turn (eos removed); return what happens next."""
        ...


EnvFactory = Callable[..., Environment]


def resolve_env_factory(path: str) -> EnvFactory:
    """The environment factory ``rollout.episode.env`` names ('package.module:callable')."""
    return import_callable(path, f"rollout.episode.env={path!r}")
