"""The rollout worker: a Ray actor that keeps one generation engine busy.

Loops and threads (the actor is threaded, ``max_concurrency`` > 1):
- the generation thread: ``acquire`` prompt groups from the dispatcher (admission follows the
  staleness gate, so it may get none and wait), generate ``group_size`` responses per group in one
  batched engine call, score them in the reward pool, ``put`` the trajectories into the datastore,
  then ``finish`` the groups at the dispatcher. It never waits for training.
- calls from the controller on other threads: ``update_weights`` hands new weights to the engine,
  which swaps them at the next token boundary (interruptible generation) and returns when loaded;
  ``evaluate`` runs greedy decoding on held-out prompts; ``health`` reports counters and re-raises
  the generation thread's failure so the controller stops the run naming this worker.
Shutdown: ``stop`` sets an event; the thread exits after its current batch.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from dataclasses import dataclass

import numpy as np
import ray
import torch

from areal_like.rewards import RewardPool
from areal_like.types import PromptGroup, PromptRecord, Trajectory
from datastore.types import SampleWrite
from rollout.config import RolloutConfig
from rollout.engine import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class WorkerHealth:
    """Counters of one rollout worker since it started."""

    worker_id: int
    version: int
    groups_done: int
    samples_done: int
    tokens_generated: int
    generate_s: float
    reward_s: float
    reward_errors: int
    reward_timeouts: int
    idle_s: float


@dataclass
class EvalResult:
    """Greedy evaluation of held-out prompts."""

    prompt_ids: list[str]
    rewards: list[float]
    responses: list[str]

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.rewards)) if self.rewards else 0.0


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
    ) -> None:
        from areal_like.models import load_model, load_tokenizer
        from rollout.hf_engine import HFEngine

        torch.set_num_threads(config.torch_threads)
        self.worker_id = worker_id
        self.config = config
        self.dispatcher = dispatcher
        self.store = store
        self.tokenizer = load_tokenizer(model_path)
        self.engine = HFEngine(load_model(model_path), engine_id=worker_id, version=version, seed=seed)
        self.rewards = RewardPool(reward_fn_path, num_workers=reward_workers, timeout_s=reward_timeout_s)
        eos = self.tokenizer.eos_token_id
        self.params = SamplingParams(
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            stop_token_ids=(eos,) if eos is not None else (),
        )
        self._generate_lock = threading.Lock()  # one generate call at a time (loop or eval)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: str | None = None
        self._in_flight: list[int] = []
        self._counters = dict(groups=0, samples=0, tokens=0, generate_s=0.0, reward_s=0.0, idle_s=0.0)

    # ---- generation loop ---------------------------------------------------------------------------
    def start(self) -> None:
        assert self._thread is None, "rollout loop already started"
        self._thread = threading.Thread(target=self._loop, name=f"rollout-{self.worker_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 60.0) -> bool:
        """Stop the loop after its current batch; True when it has exited."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            return not self._thread.is_alive()
        return True

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                groups: list[PromptGroup] = ray.get(
                    self.dispatcher.acquire.remote(self.config.groups_per_generate), timeout=120
                )
                if not groups:
                    start = time.perf_counter()
                    self._stop.wait(0.02)
                    self._counters["idle_s"] += time.perf_counter() - start
                    continue
                self._in_flight = [g.group_id for g in groups]
                self._run_groups(groups)
                self._in_flight = []
        except Exception:
            self._error = traceback.format_exc()
            logger.error("rollout worker %d failed:\n%s", self.worker_id, self._error)
            if self._in_flight:
                self.dispatcher.abandon.remote(self._in_flight)

    def _run_groups(self, groups: list[PromptGroup]) -> None:
        prompts = [list(g.prompt_ids) for g in groups for _ in range(g.num_samples)]
        start = time.perf_counter()
        with self._generate_lock:
            outputs = self.engine.generate(prompts, self.params)
        generated = time.perf_counter()
        owners = [g for g in groups for _ in range(g.num_samples)]
        texts = [self._decode(o.response_ids) for o in outputs]
        scores = self.rewards.score([(text, g.prompt.answer) for text, g in zip(texts, owners, strict=True)])
        scored = time.perf_counter()

        writes = []
        for i, (output, group, score) in enumerate(zip(outputs, owners, scores, strict=True)):
            trajectory = Trajectory(
                group_id=group.group_id,
                index=i % group.num_samples,
                group_size=group.num_samples,
                prompt_ids=np.asarray(group.prompt_ids, dtype=np.int64),
                response_ids=np.asarray(output.response_ids, dtype=np.int64),
                behav_logprobs=np.asarray(output.logprobs, dtype=np.float32),
                versions=np.asarray(output.versions, dtype=np.int64),
                reward=score.value,
                finish_reason=output.finish_reason,
                engine_id=self.worker_id,
                reward_status=score.status,
            )
            writes.append(SampleWrite.from_trajectory(trajectory))
        self.store.put(writes)
        ray.get(self.dispatcher.finish.remote([g.group_id for g in groups], []), timeout=120)

        self._counters["groups"] += len(groups)
        self._counters["samples"] += len(outputs)
        self._counters["tokens"] += sum(len(o.response_ids) for o in outputs)
        self._counters["generate_s"] += generated - start
        self._counters["reward_s"] += scored - generated

    def _decode(self, response_ids: list[int]) -> str:
        ids = [t for t in response_ids if t not in self.params.stop_token_ids]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ---- called by the controller --------------------------------------------------------------
    def update_weights(self, weights: dict[str, torch.Tensor], version: int) -> int:
        """Load ``weights`` as policy ``version`` (at the next token boundary if generating)."""
        self.engine.update_weights(weights, version, timeout_s=self.config.weight_update_timeout_s)
        return self.engine.version

    def evaluate(self, records: list[PromptRecord], prompt_ids: list[list[int]]) -> EvalResult:
        """Greedy decoding on held-out prompts, scored with the training reward."""
        params = SamplingParams(
            max_new_tokens=self.params.max_new_tokens,
            temperature=0.0,
            stop_token_ids=self.params.stop_token_ids,
        )
        with self._generate_lock:
            outputs = self.engine.generate(prompt_ids, params)
        texts = [self._decode(o.response_ids) for o in outputs]
        scores = self.rewards.score([(text, r.answer) for text, r in zip(texts, records, strict=True)])
        return EvalResult([r.prompt_id for r in records], [s.value for s in scores], texts)

    def health(self) -> WorkerHealth:
        if self._error is not None:
            raise RuntimeError(f"rollout worker {self.worker_id} stopped with an error:\n{self._error}")
        counters = self.rewards.counters
        c = self._counters
        return WorkerHealth(
            worker_id=self.worker_id,
            version=self.engine.version,
            groups_done=c["groups"],
            samples_done=c["samples"],
            tokens_generated=c["tokens"],
            generate_s=c["generate_s"],
            reward_s=c["reward_s"],
            reward_errors=counters.get("error", 0),
            reward_timeouts=counters.get("timeout", 0),
            idle_s=c["idle_s"],
        )

    def close(self) -> None:
        self.stop()
        self.rewards.close()
