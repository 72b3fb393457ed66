"""Multi-turn episodes: the model and an environment take turns, token in, token out.

Dataflow (one ``EpisodeRunner`` per rollout worker, beside its engine):
- callers (the rollout loop, evaluation): ``submit`` returns a ``RequestHandle`` at once and
  schedules the episode on the runner's asyncio loop; ``abort`` ends episodes (their running turn is
  aborted at a token boundary); the handle resolves with an ``EpisodeOutput``.
- the episode loop thread (``episodes-N``, asyncio) runs every episode in flight as a coroutine:
  1. ``env.reset(task)`` -> first observation -> prompt ids (``ChatFormat``, tokenized once);
  2. per turn: submit prompt + response-so-far to the engine and await its handle (the engine's done
     callback wakes the loop: the engine thread only does a thread-safe call, it never waits); the
     sampled ids, log-probs and versions are appended as they are (loss mask 1);
  3. ``env.step(text of the turn)`` under ``step_timeout_s`` -> reward (summed), done, observation;
     the observation is tokenized once and appended (loss mask 0, log-prob 0.0, version -1);
  4. stop on done, ``max_turns``, ``max_total_tokens``, ``max_episode_s`` (the running turn is
     aborted at a token boundary, its tokens kept) or an environment fault (raised or timed out).
  Environment steps and tools therefore run off the engine's thread, and while one episode waits
  for its environment the engine decodes the others' turns.
- the engine thread decodes every turn of every episode together with other requests (continuous
  batching). A weight update swaps the weights at a token boundary inside a turn; each token keeps
  the version that produced it, so an episode may span versions, and its staleness is that of its
  oldest sampled token (``Trajectory.min_version``).
Shutdown: ``close`` aborts every episode, stops the loop and joins its thread (bounded).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import inspect
import itertools
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from areal_like.core.types import ENV_TOKEN_VERSION, GenerationOutput, PromptRecord
from rollout.chat import ChatFormat
from rollout.engine import GenerationEngine, RequestHandle, SamplingParams
from rollout.env import Environment, EpisodeConfig, StepResult, resolve_env_factory

logger = logging.getLogger(__name__)

_CLOSE_TIMEOUT_S = 10.0
"""Longest ``close`` waits for the episode loop to wind down."""

T = TypeVar("T")


@dataclass
class EpisodeStats:
    """Counters of one episode (summed over episodes into the worker's metrics)."""

    num_turns: int = 0
    """Model turns sampled."""
    tool_calls: int = 0
    tool_errors: int = 0
    """Tool calls that failed (raised, timed out, returned garbage, malformed, unknown tool)."""
    env_errors: int = 0
    """Environment calls (reset/step) that raised or ran past ``step_timeout_s``."""
    sampled_tokens: int = 0
    env_tokens: int = 0
    generate_s: float = 0.0
    """Seconds waiting for the engine's turns."""
    env_s: float = 0.0
    """Seconds in the environment's reset and steps (tools included)."""


@dataclass
class EpisodeOutput(GenerationOutput):
    """A finished episode: the whole response (sampled and environment tokens, ``loss_mask``) with
    the prompt the environment's reset gave, the summed reward and the episode's counters."""

    prompt_ids: list[int] = field(default_factory=list)
    """Prompt token ids [P]: the first observation, chat-formatted."""
    reward: float = 0.0
    """Sum of the rewards of every turn."""
    reward_status: str = "ok"
    """'ok', or 'error' when the environment faulted (the reward is then what was summed before)."""
    stats: EpisodeStats = field(default_factory=EpisodeStats)


class EpisodeTokens:
    """The trajectory under construction: exactly the ids sampled plus the environment's ids."""

    def __init__(self, prompt_ids: list[int]) -> None:
        self.prompt_ids = list(prompt_ids)
        self.response_ids: list[int] = []
        self.logprobs: list[float] = []
        self.versions: list[int] = []
        self.loss_mask: list[int] = []

    @property
    def context(self) -> list[int]:
        """What the model conditions its next turn on: prompt + everything appended so far."""
        return self.prompt_ids + self.response_ids

    def add_sampled(self, turn: GenerationOutput) -> None:
        self.response_ids += turn.response_ids
        self.logprobs += turn.logprobs
        self.versions += turn.versions
        self.loss_mask += [1] * len(turn.response_ids)

    def add_env(self, token_ids: list[int]) -> None:
        self.response_ids += token_ids
        self.logprobs += [0.0] * len(token_ids)
        self.versions += [ENV_TOKEN_VERSION] * len(token_ids)
        self.loss_mask += [0] * len(token_ids)

    def output(self, finish_reason: str, reward: float, status: str, stats: EpisodeStats) -> EpisodeOutput:
        return EpisodeOutput(
            response_ids=self.response_ids,
            logprobs=self.logprobs,
            versions=self.versions,
            finish_reason=finish_reason,
            loss_mask=self.loss_mask,
            prompt_ids=self.prompt_ids,
            reward=reward,
            reward_status=status,
            stats=stats,
        )


class _EnvFault(Exception):
    """The environment raised or timed out in ``what``; the episode ends 'error'."""


@dataclass
class _Episode:
    episode_id: str
    task: PromptRecord
    params: SamplingParams
    handle: RequestHandle
    turn_request_id: str | None = None
    """The engine request of the running turn (None between turns)."""
    env_wait: asyncio.Future | None = None
    """The environment call being awaited (cancelled by ``abort``)."""
    aborted: bool = False


class EpisodeRunner:
    """Runs episodes against ``engine`` with environments from ``config.env`` (module docstring)."""

    def __init__(self, engine: GenerationEngine, tokenizer: Any, config: EpisodeConfig) -> None:
        assert config.env is not None, "EpisodeRunner needs rollout.episode.env"
        self.engine = engine
        self.config = config
        self.tokenizer = tokenizer
        factory = resolve_env_factory(config.env)
        self._make_env = lambda: factory(**config.env_args)
        self._make_env()  # fail now, naming the factory, if its arguments are wrong
        self.chat = ChatFormat(tokenizer, template_kwargs=config.chat_template_kwargs)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._live: dict[str, _Episode] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"episodes-{engine.engine_id}", daemon=True
        )
        self._thread.start()

    # ---- callers ---------------------------------------------------------------------------------
    def submit(
        self, task: PromptRecord, params: SamplingParams, episode_id: str | None = None
    ) -> RequestHandle:
        """Start one episode of ``task``; the handle resolves with its ``EpisodeOutput``."""
        episode_id = episode_id or f"ep{self.engine.engine_id}-{next(self._ids)}"
        handle = RequestHandle(episode_id, self.engine.engine_id)
        episode = _Episode(episode_id, task, params, handle)
        with self._lock:
            if self._loop.is_closed() or not self._thread.is_alive():
                raise RuntimeError(f"episode runner of engine {self.engine.engine_id}: submit after close()")
            self._live[episode_id] = episode
        asyncio.run_coroutine_threadsafe(self._run(episode), self._loop)
        return handle

    def abort(self, episode_ids: list[str]) -> None:
        """End these episodes: the running turn stops at the next token boundary and the handle
        resolves with finish_reason 'abort' and the tokens so far (unknown ids ignored)."""
        with self._lock:
            episodes = [self._live[eid] for eid in episode_ids if eid in self._live]
            for episode in episodes:
                episode.aborted = True
        turns = [e.turn_request_id for e in episodes if e.turn_request_id is not None]
        if turns:
            self.engine.abort(turns)
        for episode in episodes:  # an episode waiting for its environment stops waiting
            self._loop.call_soon_threadsafe(self._cancel_env_wait, episode)

    def generate(
        self, tasks: list[PromptRecord], params: SamplingParams, timeout_s: float
    ) -> list[EpisodeOutput]:
        """Run one episode per task and wait for all of them (evaluation)."""
        handles = [self.submit(task, params) for task in tasks]
        deadline = time.monotonic() + timeout_s
        return [h.result(max(deadline - time.monotonic(), 0.0)) for h in handles]  # type: ignore[misc]

    def close(self) -> None:
        """Abort every episode, give them ``_CLOSE_TIMEOUT_S`` to resolve, then stop the loop."""
        with self._lock:
            live = list(self._live.values())
        self.abort([e.episode_id for e in live])
        for episode in live:
            with contextlib.suppress(TimeoutError, RuntimeError):
                episode.handle.result(_CLOSE_TIMEOUT_S)
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(_CLOSE_TIMEOUT_S)

    # ---- the episode loop ----------------------------------------------------------------------------
    @staticmethod
    def _cancel_env_wait(episode: _Episode) -> None:
        if episode.env_wait is not None and not episode.env_wait.done():
            episode.env_wait.cancel()

    async def _run(self, episode: _Episode) -> None:
        try:
            output = await self._play(episode)
        except BaseException as error:  # a bug or an engine failure: the caller's result raises it
            logger.exception("episode %s failed", episode.episode_id)
            episode.handle._finish(None, error)
        else:
            episode.handle._finish(output)
        finally:
            with self._lock:
                self._live.pop(episode.episode_id, None)

    async def _play(self, episode: _Episode) -> EpisodeOutput:
        cfg, stats = self.config, EpisodeStats()
        deadline = time.monotonic() + cfg.max_episode_s
        fresh: Environment = self._make_env()
        env: Environment | None = fresh  # None once its reset failed
        reward, status, finish = 0.0, "ok", "turns"
        try:
            first = await self._env_call(episode, stats, "reset", lambda: fresh.reset(episode.task), _text_of)
        except _EnvFault:
            # As a reward function that raises: the sample still exists (one turn on the task's own
            # text), scored 0 with status 'error', so its group is trained on, not regenerated forever.
            first, status, env = episode.task.text, "error", None
        tokens = EpisodeTokens(self.chat.prompt_ids(first))
        if not tokens.prompt_ids:
            raise ValueError(f"episode {episode.episode_id}: the environment's first observation is empty")
        for turn in range(cfg.max_turns if env is not None else 1):
            budget = min(episode.params.max_new_tokens, cfg.max_total_tokens - len(tokens.response_ids))
            if budget < 1:
                finish = "length"
                break
            params = dataclasses.replace(episode.params, max_new_tokens=budget)
            sampled = await self._sample(episode, tokens.context, params, turn, deadline, stats)
            tokens.add_sampled(sampled)
            stats.num_turns += 1
            stats.sampled_tokens += len(sampled.response_ids)
            if episode.aborted or sampled.finish_reason == "abort":
                finish = "abort" if episode.aborted else "timeout"
                break
            if env is None:
                finish = "error"
                break
            try:
                step = functools.partial(env.step, self._text(sampled))
                result = await self._env_call(episode, stats, "step", step, step_result_of)
            except _EnvFault:
                finish, status = ("abort" if episode.aborted else "error"), "error"
                break
            reward += float(result.reward)
            stats.tool_calls += result.tool_calls
            stats.tool_errors += result.tool_errors
            if result.done:
                finish = "stop"
                break
            if turn == cfg.max_turns - 1:
                break  # 'turns': the last turn's observation would never be answered
            if time.monotonic() >= deadline:
                finish = "timeout"
                break
            contents = (
                [result.observation] if isinstance(result.observation, str) else list(result.observation)
            )
            after_stop = sampled.finish_reason == "stop"
            observed = self.chat.observation_ids(contents, result.role, after_stop)
            if len(tokens.response_ids) + len(observed) >= cfg.max_total_tokens:
                finish = "length"  # no room left for the model to answer it
                break
            tokens.add_env(observed)
            stats.env_tokens += len(observed)
        return tokens.output(finish, reward, status, stats)

    async def _sample(
        self,
        episode: _Episode,
        context: list[int],
        params: SamplingParams,
        turn: int,
        deadline: float,
        stats: EpisodeStats,
    ) -> GenerationOutput:
        """One model turn; past the episode's deadline it is aborted at a token boundary."""
        loop = asyncio.get_running_loop()
        finished: asyncio.Future = loop.create_future()

        def wake(handle: RequestHandle) -> None:  # on the engine thread: a thread-safe call, no wait
            if not loop.is_closed():
                loop.call_soon_threadsafe(_resolve, finished, handle)

        start = time.perf_counter()
        with self._lock:
            if episode.aborted:
                return GenerationOutput([], [], [], "abort")
            handle = self.engine.submit(context, params, request_id=f"{episode.episode_id}/{turn}")
            episode.turn_request_id = handle.request_id
        handle.add_done_callback(wake)
        try:
            await asyncio.wait_for(asyncio.shield(finished), max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            self.engine.abort([handle.request_id])  # keeps the tokens sampled so far
            await finished
        finally:
            stats.generate_s += time.perf_counter() - start
            episode.turn_request_id = None
        return handle.result(timeout_s=0)

    async def _env_call(
        self,
        episode: _Episode,
        stats: EpisodeStats,
        what: str,
        call: Callable[[], Awaitable[Any] | Any],
        convert: Callable[[Any], T],
    ) -> T:
        """Run an environment call under ``step_timeout_s`` and ``convert`` its answer; a raise, a
        timeout or an answer of the wrong type is an environment fault (counted, ``_EnvFault``)."""
        start = time.perf_counter()
        try:
            answer = call()
            if inspect.isawaitable(answer):
                episode.env_wait = asyncio.ensure_future(answer)
                if episode.aborted:
                    episode.env_wait.cancel()
                answer = await asyncio.wait_for(episode.env_wait, self.config.step_timeout_s)
            return convert(answer)
        except (Exception, asyncio.CancelledError) as err:
            if episode.aborted:
                raise _EnvFault(what) from None
            stats.env_errors += 1
            reason = "timed out" if isinstance(err, TimeoutError) else f"raised {type(err).__name__}: {err}"
            logger.warning("episode %s: environment %s %s", episode.episode_id, what, reason)
            raise _EnvFault(what) from err
        finally:
            stats.env_s += time.perf_counter() - start
            episode.env_wait = None

    def _text(self, turn: GenerationOutput) -> str:
        """The text of a model turn, its eos removed (what the environment's ``step`` reads)."""
        eos = self.tokenizer.eos_token_id
        return self.tokenizer.decode([t for t in turn.response_ids if t != eos], skip_special_tokens=True)


def _text_of(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(
            f"environment reset returned {type(value).__name__}; return the first observation text"
        )
    return value


def step_result_of(value: Any) -> StepResult:
    """An environment's step answer as a ``StepResult`` (a 4-tuple (observation, reward, done, info)
    is accepted too)."""
    if isinstance(value, StepResult):
        return value
    if isinstance(value, tuple) and len(value) == 4:
        observation, reward, done, info = value
        return StepResult(
            observation=observation, reward=float(reward), done=bool(done), info=dict(info or {})
        )
    raise TypeError(f"environment step returned {type(value).__name__}; return a StepResult")


def _resolve(future: asyncio.Future, value: object) -> None:
    """Set ``future``'s result unless it is already done (on the future's own loop)."""
    if not future.done():
        future.set_result(value)
