"""The rollout worker: a Ray actor that keeps one generation engine busy.

Loops and threads (the actor is threaded, ``max_concurrency`` > 1):
- the engine thread (inside ``HFEngine``): continuous batching over every request submitted to it;
  a request's done callback puts its group id on ``_finished`` (a queue put, nothing more).
- the rollout loop thread (``_loop``), each iteration:
  1. watch the engine: requests in flight but no decode step for ``engine_stall_timeout_s`` means
     the engine stopped answering; the worker then retires (below) and the loop ends;
  2. top up: ``acquire`` groups from the dispatcher (the staleness gate may grant none) until
     ``groups_per_generate`` are in flight, and submit ``num_samples`` requests per group, all to
     this worker's engine (a group never spans engines: its prompt prefix is shared);
  3. collect groups whose requests have all finished, score them in the reward pool (worker
     processes, off the engine thread: decoding goes on meanwhile. While the reward function
     hangs a score call costs about one timeout whatever its size, so groups that finish during a
     call that went concurrent join it), drop the groups whose rewards are all equal when
     ``dynamic_sampling`` is on, ``put`` the rest into the datastore and ``finish`` all of them at
     the dispatcher (dropped ones as rejected, so the gate refills them).
  It never waits for training.
- calls from the controller on other threads: ``update_weights`` hands new weights to the engine,
  which swaps them at the next token boundary (interruptible generation) and returns when loaded;
  ``evaluate`` runs greedy decoding on held-out prompts (its requests join the running batch);
  ``health`` reports counters and the groups in flight, and re-raises the loop's failure so the
  controller stops the run naming this worker; ``retire`` takes the worker out of rotation.
Retiring (engine stalled, or the supervisor said so): the worker marks itself retired, waits for a
write in progress to end, forgets its remaining groups, aborts their requests and ``abandon``s them at
the dispatcher, which requeues their prompts for the other workers. Two locks make that exact:
``_lock`` (groups and the retired mark) is held from an ``acquire`` call until its groups are recorded,
so ``health`` never misses a group the dispatcher gave this worker; ``_write_lock`` is held from the
retired check before a ``put`` until the matching ``finish``, so a group is either written and
finished or handed back, never both. ``health`` takes only ``_lock``, briefly: a ``put`` blocked on
a full datastore does not make the worker look dead.
Multi-turn (``rollout.episode.env`` set): each sample is an episode run by an ``EpisodeRunner``
(``rollout/episode.py``) on its own asyncio thread, which takes turns between this worker's engine
and an environment; its handle stands where a request's would, so groups, retirement and hand-back
work as above. The environment gives the reward (the reward pool is not used) and the episode's
trajectory carries a loss mask (0 on environment tokens).
Shutdown: ``stop`` sets an event; the loop aborts its requests, hands its groups back and exits.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import cast

import ray
import torch

from areal_like.core.types import GenerationOutput, PromptGroup, PromptRecord
from rollout.config import RolloutConfig
from rollout.engine import ColocatedEngine, RequestHandle, SamplingParams, make_engine
from rollout.episode import EpisodeOutput, EpisodeRunner, EpisodeStats
from rollout.rewards import RewardPool, RewardPoolConfig, RewardResult, RewardsCancelled
from rollout.samples import (
    EpisodeShape,
    ForcedLengths,
    build_group_writes,
    forced_length,
    rewards_all_equal,
)

logger = logging.getLogger(__name__)

_RPC_TIMEOUT_S = 120.0
"""Deadline of a call to the dispatcher."""
_EVAL_TIMEOUT_S = 1800.0
"""Longest an evaluation waits for its responses (they share the engine with rollouts)."""
_POLL_S = 0.02
"""How long the loop waits for a finished request (or, with nothing in flight, for the gate)."""


@dataclass
class WorkerHealth:
    """Counters of one rollout worker since it started (from ``RolloutWorker.health``)."""

    worker_id: int
    version: int
    groups_done: int
    """Groups that left this worker finished (written, or filtered by dynamic sampling)."""
    samples_done: int
    """Samples written to the datastore."""
    tokens_generated: int
    generate_s: float
    """Summed time from submit to the last request of each group finishing."""
    reward_s: float
    reward_errors: int
    reward_timeouts: int
    idle_s: float
    groups_filtered: int = 0
    """Groups dropped by dynamic sampling (all rewards equal)."""
    groups_abandoned: int = 0
    """Groups handed back to the dispatcher unfinished (retirement, stop, aborted samples)."""
    finish_reasons: dict[str, int] = field(default_factory=dict)
    """Samples written per finish reason ('stop', 'length', 'abort')."""
    interrupted_samples: int = 0
    """Samples whose tokens span more than one policy version (a weight swap hit them mid-request)."""
    reward_retries: int = 0
    reward_failure_rate: float = 0.0
    """Share of this worker's last (up to 1024) rewards that failed ('error' or 'timeout')."""
    reward_warned_batches: int = 0
    """Scored batches whose failure share passed ``task.reward_pool.warn_failure_rate``."""
    in_flight_group_ids: list[int] = field(default_factory=list)
    """Groups this worker holds right now (acquired, not yet finished or abandoned)."""
    running_requests: int = 0
    waiting_requests: int = 0
    retired: str | None = None
    """Why the worker took itself out of rotation; None while it is in rotation."""
    episodes_done: int = 0
    """Multi-turn episodes finished (in groups that left this worker finished)."""
    episode_totals: EpisodeStats = field(default_factory=EpisodeStats)
    """Counters of those episodes summed: turns, tool calls and errors, tokens, seconds."""


@dataclass
class EvalResult:
    """Greedy evaluation of held-out prompts."""

    prompt_ids: list[str]
    rewards: list[float]
    responses: list[str]


@dataclass
class _GroupInFlight:
    group: PromptGroup
    handles: list[RequestHandle] = field(default_factory=list)
    num_finished: int = 0


class RolloutWorker:
    def __init__(
        self,
        worker_id: int,
        config: RolloutConfig,
        model_path: str,
        reward_fn_path: str,
        reward_timeout_s: float,
        reward_workers: int,
        dispatcher,
        store,
        seed: int,
        version: int,
        forced_lengths: ForcedLengths | None = None,
        reward_pool: RewardPoolConfig | None = None,
    ) -> None:
        """``forced_lengths``: benchmarks only (eos ignored, lognormal lengths); None in training."""
        from areal_like.core.models import load_tokenizer
        from areal_like.core.tokenizer import stop_token_ids

        torch.set_num_threads(config.torch_threads)
        self.worker_id = worker_id
        self.config = config
        self.forced_lengths = forced_lengths
        self.dispatcher = dispatcher
        self.store = store
        self.tokenizer = load_tokenizer(model_path)
        self.engine = make_engine(
            config.engine_config(model_path, seed), engine_id=worker_id, version=version
        )
        self.rewards = RewardPool(
            reward_fn_path, num_workers=reward_workers, timeout_s=reward_timeout_s, config=reward_pool
        )
        self.episodes = (
            EpisodeRunner(self.engine, self.tokenizer, config.episode) if config.episode.enabled else None
        )
        self.params = SamplingParams(
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            stop_token_ids=stop_token_ids(self.tokenizer),  # Qwen: <|im_end|> and <|endoftext|>
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: str | None = None
        self._lock = threading.Lock()  # guards _groups and _retired; see the module docstring
        self._write_lock = threading.Lock()  # held from the retired check to finish; see the docstring
        self._groups: dict[int, _GroupInFlight] = {}
        self._retired: str | None = None
        self._finished: queue.SimpleQueue[int] = queue.SimpleQueue()  # group id per finished request
        self._last_steps, self._last_progress = -1, time.monotonic()
        self._counters: collections.Counter[str] = collections.Counter()
        self._seconds: collections.defaultdict[str, float] = collections.defaultdict(float)
        self._finish_reasons: collections.Counter[str] = collections.Counter()
        self._episode_totals = EpisodeStats()

    # ---- rollout loop --------------------------------------------------------------------------------
    def start(self) -> None:
        assert self._thread is None, "rollout loop already started"
        self._thread = threading.Thread(target=self._loop, name=f"rollout-{self.worker_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 60.0) -> bool:
        """Stop the loop (its unfinished groups go back to the dispatcher); True when it has exited."""
        self._stop.set()
        self.rewards.cancel()  # a batch being scored is handed back, not waited for
        if self._thread is not None:
            self._thread.join(timeout_s)
            return not self._thread.is_alive()
        return True

    def _loop(self) -> None:
        try:
            while not self._stop.is_set() and self._retired is None:
                if self._engine_stalled():
                    break
                self._top_up()
                ready = self._collect_finished_groups()
                if ready:
                    self._score_and_put(ready)
            if self._retired is None:  # stopped: hand unfinished groups back (requeued on resume)
                self._hand_back("stopped")
        except RewardsCancelled:  # stop() during scoring
            self._hand_back("stopped")
        except Exception:
            self._error = traceback.format_exc()
            logger.error("rollout worker %d failed:\n%s", self.worker_id, self._error)
            self._hand_back("failed")

    def _engine_stalled(self) -> bool:
        load = self.engine.load()
        now = time.monotonic()
        busy = load.running_requests + load.waiting_requests > 0
        if not busy or load.decode_steps_total != self._last_steps:
            self._last_steps, self._last_progress = load.decode_steps_total, now
            return False
        if now - self._last_progress < self.config.engine_stall_timeout_s:
            return False
        self.retire(
            f"engine {self.engine.engine_id} made no decode step in {now - self._last_progress:.0f}s with "
            f"{load.running_requests} running and {load.waiting_requests} waiting requests"
        )
        return True

    def _top_up(self) -> None:
        """Acquire groups until ``groups_per_generate`` are in flight and submit their samples."""
        room = self.config.groups_per_generate - len(self._groups)
        if room <= 0:
            return
        with self._lock:
            if self._retired is not None:
                return
            groups: list[PromptGroup] = ray.get(self.dispatcher.acquire.remote(room), timeout=_RPC_TIMEOUT_S)
            for group in groups:
                entry = self._groups[group.group_id] = _GroupInFlight(group)
                for index in range(group.num_samples):
                    params = self._params_for(group.group_id, index)
                    if self.episodes is not None:
                        handle = self.episodes.submit(group.prompt, params)
                    else:
                        handle = self.engine.submit(list(group.prompt_ids), params)
                    handle.add_done_callback(functools.partial(self._on_request_done, group.group_id))
                    entry.handles.append(handle)
        if not groups and not self._groups:
            start = time.perf_counter()
            self._stop.wait(_POLL_S)
            self._seconds["idle_s"] += time.perf_counter() - start

    def _on_request_done(self, group_id: int, _handle: RequestHandle) -> None:
        self._finished.put(group_id)  # on the engine's thread: only a queue put

    def _params_for(self, group_id: int, index: int) -> SamplingParams:
        """The run's sampling params, or (benchmarks) a forced lognormal length with eos ignored."""
        forced = self.forced_lengths
        if forced is None:
            return self.params
        length = forced_length(forced.median, forced.sigma, self.config.max_new_tokens, group_id, index)
        return dataclasses.replace(self.params, max_new_tokens=length, stop_token_ids=())

    def _collect_finished_groups(self, wait: bool = True) -> list[_GroupInFlight]:
        """Groups whose every request has finished (waits up to ``_POLL_S`` for the first request,
        unless ``wait`` is False)."""
        ready: list[_GroupInFlight] = []
        timeout_s: float | None = _POLL_S if self._groups and wait else 0.0
        while True:
            try:
                gid = self._finished.get(timeout=timeout_s) if timeout_s else self._finished.get_nowait()
            except queue.Empty:
                return ready
            timeout_s = 0.0
            entry = self._groups.get(gid)
            if entry is None:  # handed back already
                continue
            entry.num_finished += 1
            if entry.num_finished == entry.group.num_samples:
                ready.append(entry)

    def _unaborted(self, ready: list[_GroupInFlight], outputs: dict) -> list[_GroupInFlight]:
        """Record the outputs of ``ready`` in ``outputs``; abandon the groups with an aborted sample."""
        for e in ready:
            outputs[e.group.group_id] = [h.result(timeout_s=0) for h in e.handles]
        aborted = [e for e in ready if any(o.finish_reason == "abort" for o in outputs[e.group.group_id])]
        if aborted:
            self._abandon([e.group.group_id for e in aborted], "samples were aborted")
        return [e for e in ready if e not in aborted]

    def _score_and_put(self, ready: list[_GroupInFlight]) -> None:
        outputs: dict[int, list] = {}
        ready = self._unaborted(ready, outputs)
        if not ready:
            return
        start = time.perf_counter()
        if self.episodes is not None:  # the environment scored every episode
            episodes = [cast(EpisodeOutput, o) for e in ready for o in outputs[e.group.group_id]]
            scores = [RewardResult(o.reward, o.reward_status) for o in episodes]
        else:

            def items_of(groups: list[_GroupInFlight]) -> list[tuple[str, str]]:
                return [
                    (self._decode(o.response_ids), e.group.prompt.answer)
                    for e in groups
                    for o in outputs[e.group.group_id]
                ]

            def more() -> list[tuple[str, str]]:
                # The rewards hang: groups finishing meanwhile join this batch, not the next.
                extra = self._unaborted(self._collect_finished_groups(wait=False), outputs)
                ready.extend(extra)
                return items_of(extra)

            scores = self.rewards.score(items_of(ready), more)
        self._seconds["reward_s"] += time.perf_counter() - start

        writes, accepted, rejected, offset = [], [], [], 0
        for entry in ready:
            group, group_outputs = entry.group, outputs[entry.group.group_id]
            group_scores = scores[offset : offset + group.num_samples]
            offset += group.num_samples
            if self.config.dynamic_sampling and rewards_all_equal(group_scores):
                rejected.append(group.group_id)
                continue
            latencies = [h.finished_s() - h.submitted_at for h in entry.handles]
            shapes = None
            if self.episodes is not None:
                episodes = [cast(EpisodeOutput, o) for o in group_outputs]
                shapes = [EpisodeShape(o.prompt_ids, o.stats.num_turns) for o in episodes]
            writes.extend(
                build_group_writes(group, group_outputs, group_scores, latencies, self.worker_id, shapes)
            )
            accepted.append(group.group_id)
        with self._write_lock:
            if self._retired is not None:  # these groups were handed back: never write them
                return
            if writes:
                self.store.put(writes)
            ray.get(self.dispatcher.finish.remote(accepted, rejected), timeout=_RPC_TIMEOUT_S)
            with self._lock:
                for entry in ready:
                    del self._groups[entry.group.group_id]
        self._count(ready, outputs, rejected)

    def _count(self, ready: list[_GroupInFlight], outputs: dict, rejected: list[int]) -> None:
        c = self._counters
        c["groups"] += len(ready)
        c["groups_filtered"] += len(rejected)
        for entry in ready:
            self._seconds["generate_s"] += max(h.finished_s() for h in entry.handles) - min(
                h.submitted_at for h in entry.handles
            )
            group_outputs = outputs[entry.group.group_id]
            c["tokens"] += sum(len(o.response_ids) for o in group_outputs)
            if self.episodes is not None:
                self._count_episodes([cast(EpisodeOutput, o) for o in group_outputs])
            if entry.group.group_id in rejected:
                continue
            c["samples"] += len(group_outputs)
            c["interrupted"] += sum(len(set(_sampled_versions(o))) > 1 for o in group_outputs)
            self._finish_reasons.update(o.finish_reason for o in group_outputs)
        if rejected:
            logger.info(
                "worker %d: dynamic sampling dropped %d of %d groups",
                self.worker_id,
                len(rejected),
                len(ready),
            )

    def _count_episodes(self, episodes: list[EpisodeOutput]) -> None:
        totals = self._episode_totals
        self._counters["episodes"] += len(episodes)
        for episode in episodes:
            for name, value in dataclasses.asdict(episode.stats).items():
                setattr(totals, name, getattr(totals, name) + value)

    def _decode(self, response_ids: list[int]) -> str:
        ids = [t for t in response_ids if t not in self.params.stop_token_ids]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _abandon(self, group_ids: list[int], why: str) -> None:
        """Hand groups back to the dispatcher (their prompts are requeued) and forget them."""
        with self._lock:
            entries = [self._groups.pop(gid) for gid in group_ids if gid in self._groups]
        self._hand_back_entries(entries, why)

    def _hand_back(self, why: str) -> None:
        with self._write_lock, self._lock:
            entries = list(self._groups.values())
            self._groups.clear()
        self._hand_back_entries(entries, why)

    def _hand_back_entries(self, entries: list[_GroupInFlight], why: str) -> None:
        if not entries:
            return
        request_ids = [h.request_id for e in entries for h in e.handles]
        if self.episodes is not None:
            self.episodes.abort(request_ids)
        else:
            self.engine.abort(request_ids)
        group_ids = [e.group.group_id for e in entries]
        ray.get(self.dispatcher.abandon.remote(group_ids), timeout=_RPC_TIMEOUT_S)
        self._counters["groups_abandoned"] += len(group_ids)
        logger.warning(
            "worker %d: handed %d groups back to the dispatcher (%s)", self.worker_id, len(group_ids), why
        )

    # ---- called by the controller ----------------------------------------------------------------
    def update_weights(self, weights: dict[str, torch.Tensor], version: int) -> int:
        """Load ``weights`` as policy ``version`` (at the next token boundary if generating)."""
        self.engine.update_weights(weights, version, timeout_s=self.config.weight_update_timeout_s)
        return self.engine.version

    def setup_realloc(
        self, plan, config, master_addr: str, master_port: int, member: int, engine_rank: int
    ) -> None:
        """Join the weight-reallocation group; the engine hosts the receiver (HF: in this process;
        vLLM: in its engine-core process, where its weights live)."""
        self.engine.setup_realloc(plan, config, master_addr, master_port, member, engine_rank)

    def weights_digest(self) -> str:
        """Digest of the engine's weights (compare with the trainer's ``weights_digest``)."""
        return self.engine.weights_digest()

    def receive_weights(self, version: int) -> int:
        """Receive every bucket of ``version``, then swap it in at a token boundary. A failed transfer
        raises before the engine is touched (it stays on the old version)."""
        self.engine.receive_weights(version, timeout_s=self.config.weight_update_timeout_s)
        return self.engine.version

    # ---- colocated placement (vLLM on the trainer's GPU) ---------------------------------------------
    @property
    def _colocated(self) -> ColocatedEngine:
        # The config admits colocated placement only with an engine that can sleep (vLLM).
        return cast(ColocatedEngine, self.engine)

    def make_arena(self, plan, engine_rank: int):
        """Allocate this engine's staging arena; returns the ``IpcHandle`` for the trainer rank."""
        return self._colocated.make_arena(plan, engine_rank)

    def load_staged(self, version: int) -> int:
        """The colocated trainer rank wrote ``version`` into the arena: load it at a token boundary."""
        self._colocated.load_staged(version, timeout_s=self.config.weight_update_timeout_s)
        return self.engine.version

    def sleep(self) -> None:
        """Give the GPU to the trainer: pause generation and free the engine's memory."""
        self._colocated.sleep()

    def wake(self) -> None:
        """Take the GPU back; generation stays paused until ``resume`` (after the weight sync)."""
        self._colocated.wake(resume=False)

    def resume(self) -> None:
        self.engine.resume()

    def evaluate(self, records: list[PromptRecord], prompt_ids: list[list[int]]) -> EvalResult:
        """Greedy decoding on held-out prompts, scored with the training reward."""
        params = SamplingParams(
            max_new_tokens=self.params.max_new_tokens,
            temperature=0.0,
            stop_token_ids=self.params.stop_token_ids,
        )
        if self.episodes is not None:  # greedy episodes, scored by their environment
            episodes = self.episodes.generate(records, params, timeout_s=_EVAL_TIMEOUT_S)
            texts = [self._decode(o.response_ids) for o in episodes]
            return EvalResult([r.prompt_id for r in records], [o.reward for o in episodes], texts)
        outputs = self.engine.generate(prompt_ids, params, timeout_s=_EVAL_TIMEOUT_S)
        texts = [self._decode(o.response_ids) for o in outputs]
        scores = self.rewards.score([(text, r.answer) for text, r in zip(texts, records, strict=True)])
        return EvalResult([r.prompt_id for r in records], [s.value for s in scores], texts)

    def retire(self, reason: str) -> None:
        """Take this worker out of rotation: stop acquiring, never write again, hand its groups back."""
        with self._lock:
            if self._retired is not None:
                return
            self._retired = reason
        logger.error("rollout worker %d retired: %s", self.worker_id, reason)
        self._stop.set()
        self._hand_back(f"retired: {reason}")

    def health(self) -> WorkerHealth:
        if self._error is not None:
            raise RuntimeError(f"rollout worker {self.worker_id} stopped with an error:\n{self._error}")
        with self._lock:
            in_flight = sorted(self._groups)
        load = self.engine.load()
        rewards = self.rewards.counters
        c = self._counters
        return WorkerHealth(
            worker_id=self.worker_id,
            version=self.engine.version,
            groups_done=c["groups"],
            samples_done=c["samples"],
            tokens_generated=c["tokens"],
            generate_s=self._seconds["generate_s"],
            reward_s=self._seconds["reward_s"],
            reward_errors=rewards.get("error", 0),
            reward_timeouts=rewards.get("timeout", 0),
            idle_s=self._seconds["idle_s"],
            groups_filtered=c["groups_filtered"],
            groups_abandoned=c["groups_abandoned"],
            finish_reasons=dict(self._finish_reasons),
            interrupted_samples=c["interrupted"],
            reward_retries=rewards.get("retries", 0),
            reward_failure_rate=self.rewards.recent_failure_rate,
            reward_warned_batches=self.rewards.warned_batches,
            in_flight_group_ids=in_flight,
            running_requests=load.running_requests,
            waiting_requests=load.waiting_requests,
            retired=self._retired,
            episodes_done=c["episodes"],
            episode_totals=dataclasses.replace(self._episode_totals),
        )

    def close(self) -> None:
        self.stop()
        if self.episodes is not None:
            self.episodes.close()
        self.rewards.close()
        self.engine.close()


def _sampled_versions(output: GenerationOutput) -> list[int]:
    """Versions of the tokens the engine sampled (a multi-turn output's env tokens carry -1)."""
    if output.loss_mask is None:
        return output.versions
    return [v for v, m in zip(output.versions, output.loss_mask, strict=True) if m]
