"""The controller: builds the actors, then runs the asynchronous RL loop as a page of named steps.

Actors and dataflow (all Ray, every actor asks for 0 CPUs so a 2-core machine never deadlocks):

    PromptDispatcher --groups--> RolloutWorker x M --trajectories--> datastore (controller + units)
          ^  staleness gate           ^  weights v+1                      |  oldest-first groups
          |  set_version, on_evicted  |                                   v
       controller (this module) ----- export_weights <---- TrainerRank x N (DeepSpeed)

- Rollout workers generate continuously; the dispatcher admits a group only while AReaL's rule
  allows (``areal_like.staleness``), so generation runs at most eta versions ahead of training.
- The controller waits for ``train.batch_groups`` complete groups whose oldest token is at most
  eta versions old (older ones are evicted by the datastore and their slots refilled), hands each
  trainer rank whole groups, runs the step, then pushes the new weights to every engine
  (interrupting generation at a token boundary) and only then advances the dispatcher's version.
- Who blocks whom: only the controller waits (for a batch, for the train step, for the weight
  load), each wait with a timeout that names what is missing. A rollout worker whose loop dies is
  found by ``health`` polling and stops the run with its traceback.
- Shutdown: stop the rollout loops, save the final checkpoint, close sinks, kill actors.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import ray
from ray.actor import ActorHandle

from areal_like import checkpoint as ckpt
from areal_like import faults, launch, local_ray, placement, preflight
from areal_like.checkpoint_saver import CheckpointSaver
from areal_like.checkpoint_universal import TrainerLayout, trainer_checkpoint_for
from areal_like.config import Config, to_yaml
from areal_like.core.types import TRAJECTORY_COLUMNS
from areal_like.dispatch import PromptDispatcher
from areal_like.metrics import (
    JsonlSink,
    MetricsLogger,
    MetricsSink,
    TensorBoardSink,
    WandbSink,
    progress_line,
    totals_at_step,
    truncate_after_step,
)
from areal_like.prompts import PromptRecords, PromptSets, tokenize_prompts
from areal_like.run_lock import RunLock
from areal_like.staleness import min_allowed_version
from areal_like.step_metrics import episode_step_metrics, step_metrics
from areal_like.stop import StopRequest
from areal_like.weight_sync import WeightSync
from datastore import make_datastore
from datastore.client import DataStoreClient
from datastore.types import DataStoreSamplesLost, DataStoreTimeout, SampleMeta
from rollout.samples import ForcedLengths
from rollout.supervisor import RolloutSupervisor
from trainer.packing import imbalance, split_for_ranks
from trainer.worker import TrainStats

logger = logging.getLogger(__name__)

TRAIN_TASK = "train"
_DISPATCHER_TIMEOUT_S = 120.0
"""Deadline of one dispatcher call (each is O(groups); a silent dispatcher is stuck)."""


@dataclass
class RunSummary:
    run_dir: str
    first_step: int
    last_step: int
    version: int
    eval_before: float | None
    eval_after: float | None
    staleness_max: int
    evicted_groups: int
    train_seconds: float
    final_weights_digest: str
    """sha256 of the trainer's weights at the end of the run."""
    engines_in_sync: bool
    """Every engine held exactly the trainer's weights at the end (sha256 of the weights)."""
    stopped_by: str | None
    """The signal that stopped the run early (SIGINT/SIGTERM), or None when it ran to max_steps."""
    start_weights_digest: str
    """sha256 of the policy weights the run started training from (restored ones on resume)."""


class RLController:
    def __init__(self, config: Config, forced_lengths: ForcedLengths | None = None) -> None:
        """``forced_lengths``: throughput benchmarks only (eos ignored, lognormal response lengths)."""
        if forced_lengths is not None:
            forced_lengths.check_cap(config.rollout.max_new_tokens)
        self.config = config
        self.forced_lengths = forced_lengths
        self.run_dir: str = os.path.abspath(config.run.dir)
        self.step: int = 0
        """Train steps done (restored on resume)."""
        self.version: int = 0
        """Policy version the engines hold; advanced after every weight sync."""
        self.staleness_max_seen: int = 0
        self.stop = StopRequest()
        self.start_digest: str = ""
        """sha256 of the weights the run started training from."""
        self.final_digest: str = ""
        self.engines_in_sync: bool = False
        self.split_imbalance: float = 1.0
        """max / mean tokens over the trainer ranks' shards of the last batch."""
        self.model_path: str = ""
        self.trainer_opts: list[dict] = []
        self.trainers: list[ActorHandle] = []
        self.workers: list[ActorHandle] = []
        """The rollout workers built at start (replacements are the supervisor's)."""
        self._owns_ray: bool = False
        self._metrics: MetricsLogger | None = None
        self._previous_metrics: dict[str, float] | None = None
        """The last step's metrics (per-step rates come from differences of run totals)."""
        # Set by ``run`` and ``build`` before the loop uses them; ``shutdown`` copes with a build
        # that failed halfway (it reads these with getattr).
        self.prompt_records: PromptRecords
        self.prompts: PromptSets
        self.store: DataStoreClient
        self.dispatcher: ActorHandle
        self.rollout: RolloutSupervisor
        self.weights: WeightSync

    # ---- the loop ----------------------------------------------------------------------------------
    def run(self) -> RunSummary:
        self.prompt_records = preflight.check_run(self.config).records  # before anything starts
        self.prepare_run_dir()
        self.start_ray()
        restore_signals = self.stop.install()
        try:
            self.build()
            resumed_from = self.maybe_resume()
            first_step = self.step
            self.start_digest = self.weights.trainer_digest()
            self.sync_weights(self.version)
            eval_before = self.evaluate("before") if resumed_from is None else None
            self.start_rollouts()
            started = time.perf_counter()
            while self.step < self.config.train.max_steps and self.stop.received is None:
                batch, wait_s = self.wait_for_batch()
                if batch is None:  # a stop signal came while waiting
                    break
                stats, train_s = self.train(batch)
                if stats is None:
                    continue
                sync_s = self.sync_weights(self.version + 1)
                self.step += 1
                # Everything the step's metrics ask of other actors is read before its checkpoint: a
                # checkpoint never exists without its metrics row (a resume would leave a gap).
                observed = self.observe()
                save_s = self.maybe_checkpoint()
                seconds = dict(wait_batch=wait_s, train=train_s, weight_sync=sync_s, checkpoint=save_s)
                self.log_step(batch, stats, observed, seconds)
                self.maybe_periodic_eval()
            train_seconds = time.perf_counter() - started
            self.stop_rollouts()
            self.engines_in_sync, self.final_digest = self.weights.engines_match_trainer()
            if self.stop.received is not None:
                self.maybe_checkpoint(force=True)
                saved = "checkpoint saved" if self.config.run.save_checkpoints else "no checkpoint (disabled)"
                print(f"stopped by {self.stop.received} after step {self.step}; {saved}", flush=True)
                return self.finish(first_step, eval_before, None, train_seconds)
            eval_after = self.evaluate("after")
            return self.finish(first_step, eval_before, eval_after, train_seconds)
        except Exception as err:
            fault = faults.diagnose(self, err)  # a dead dispatcher or datastore controller, named
            if fault is not None:
                raise fault from err
            raise
        finally:
            restore_signals()
            self.shutdown()

    # ---- steps -------------------------------------------------------------------------------------
    def prepare_run_dir(self) -> None:
        self.run_lock = RunLock.acquire(self.run_dir)  # before anything is written into it
        try:
            self.resume_point = ckpt.prepare(self.run_dir, self.config.run.resume)
        except BaseException:
            self.run_lock.release()
            raise
        with open(os.path.join(self.run_dir, "config.yaml"), "w") as f:
            f.write(to_yaml(self.config))
        logger.info("run directory: %s", self.run_dir)

    def start_ray(self) -> None:
        if ray.is_initialized():
            return
        rc = self.config.ray
        kwargs: dict[str, Any] = dict(include_dashboard=False, configure_logging=False, log_to_driver=True)
        kwargs["runtime_env"] = {"env_vars": preflight.job_env(self.config)}
        if rc.address is None:  # its processes die with this driver, even a SIGKILLed one
            local_ray.init(num_cpus=rc.num_cpus or os.cpu_count(), **kwargs)
        else:
            ray.init(address=rc.address, **kwargs)
            preflight.check_cluster(self.config)
        self._owns_ray = True

    def build(self) -> None:
        cfg = self.config
        self.model_path = launch.resolve_model_path(cfg.model, self.run_dir, cfg.task, cfg.run.seed)
        self.prompts = tokenize_prompts(self.prompt_records, self.model_path)
        self.store = make_datastore(cfg.datastore)
        self.dispatcher = (
            ray.remote(PromptDispatcher)
            .options(num_cpus=0)
            .remote(
                self.prompts.train,
                self.prompts.train_ids,
                cfg.rollout.group_size,
                cfg.train.batch_groups,
                cfg.rollout.max_staleness,
                cfg.max_concurrent_groups,
                cfg.run.seed,
            )
        )
        self.trainer_opts = placement.trainer_options(cfg.placement, cfg.train.num_ranks)
        self.trainers = launch.make_trainers(cfg, self.model_path, self.trainer_opts)
        # A resumed run samples from a fresh stream: the seed moves with the checkpoint's step.
        resume_step = self.resume_point.step if self.resume_point else 0

        incarnations = itertools.count()

        def make_worker(worker_id: int):
            # a replacement (restart) samples from a fresh stream
            seed = cfg.run.seed * 7919 + resume_step * 104729 + next(incarnations) * 1_000_003
            return launch.make_rollout_worker(
                cfg,
                self.model_path,
                self.prompts.reward_fn_path,
                self.dispatcher,
                self.store,
                seed,
                worker_id,
                self.trainer_opts,
                self.forced_lengths,
            )

        if cfg.placement.devices == "colocated":
            # vLLM sizes its KV cache from the GPU memory free at start: let the trainer settle first.
            self._wait([t.ping.remote() for t in self.trainers], "trainer", "start")
        self.workers = [make_worker(i) for i in range(cfg.rollout.num_workers)]
        self.rollout = RolloutSupervisor(
            self.workers,
            self.dispatcher,
            cfg.rollout.health_timeout_s,
            cfg.rollout.min_active_workers,
            make_worker=make_worker,
            max_restarts=cfg.rollout.max_restarts,
            # on the plan path a replacement must join the rebuilt group before it generates
            defer_start=cfg.realloc.enabled,
        )
        self._wait([t.ping.remote() for t in self.trainers], "trainer", "start")
        self.weights = WeightSync(cfg, self.model_path, self.trainers, self.rollout, self._wait)
        self.saver = CheckpointSaver(
            self.run_dir, cfg.run, self.trainers, self.store, self.dispatcher, TRAIN_TASK, self._wait
        )
        print(
            placement.placement_report({"trainer": self.trainers, "rollout worker": self.workers}), flush=True
        )
        logger.info(
            "built %d trainer rank(s), %d rollout worker(s), %d storage unit(s)",
            len(self.trainers),
            len(self.workers),
            cfg.datastore.num_storage_units,
        )

    def maybe_resume(self) -> str | None:
        if self.resume_point is None:
            return None
        path = self.resume_point.path
        state = ckpt.read_state(path)
        layout = TrainerLayout.of(self.config.train)  # another one loads through a universal checkpoint
        with trainer_checkpoint_for(path, state.step, state.trainer_layout, layout) as (load_dir, universal):
            loads = [t.load_checkpoint.remote(load_dir, universal) for t in self.trainers]
            self._wait(loads, "trainer", "load")
        buffered = self.store.restore(os.path.join(path, "datastore.pkl"))
        self._ask_dispatcher(self.dispatcher.restore.remote(state.dispatcher, buffered), "restore")
        ckpt.restore_rng(state.rng)
        self.step, self.version = state.step, state.version
        dropped = truncate_after_step(os.path.join(self.run_dir, "metrics.jsonl"), self.step)
        baseline = totals_at_step(os.path.join(self.run_dir, "metrics.jsonl"), self.step)
        self.metrics.continue_totals(baseline or state.counters or {}, ckpt.RESTORED_TOTALS)
        logger.info(
            "resumed from %s: step %d, version %d, %d buffered groups restored%s",
            path,
            self.step,
            self.version,
            len(buffered),
            f", {dropped} metric lines after it dropped" if dropped else "",
        )
        print(self.resume_point.describe(), flush=True)
        return path

    def start_rollouts(self) -> None:
        self._ask_dispatcher(self.dispatcher.set_version.remote(self.version), "set_version")
        self._wait([w.start.remote() for w in self.rollout.active], "rollout worker", "start")

    def wait_for_batch(self) -> tuple[list[SampleMeta] | None, float]:
        """Block until ``batch_groups`` fresh complete groups are ready (None once a stop signal
        came, checked every half second); evictions free gate slots."""
        cfg = self.config
        start = time.perf_counter()
        deadline = start + cfg.datastore.get_timeout_s
        min_version = min_allowed_version(self.version, cfg.rollout.max_staleness)
        last_health = start
        while True:
            try:
                batch = self.store.get_batch_meta(
                    TRAIN_TASK,
                    list(TRAJECTORY_COLUMNS),
                    cfg.train.batch_groups,
                    min_version=min_version,
                    timeout_s=0.5,
                )
            except DataStoreTimeout:
                batch = None
            evicted = self.store.drain_evictions()
            if evicted:
                self._ask_dispatcher(self.dispatcher.on_evicted.remote(evicted), "on_evicted")
            lost = self.store.drain_lost()
            if lost:
                self._ask_dispatcher(self.dispatcher.on_lost.remote(lost), "on_lost")
            if batch is not None:
                return batch.samples, time.perf_counter() - start
            if self.stop.received is not None:
                return None, time.perf_counter() - start
            now = time.perf_counter()
            if now - last_health > 5.0:
                self._check_workers()
                last_health = now
            if now > deadline:
                gate = self._ask_dispatcher(self.dispatcher.gate_state.remote(), "gate_state")
                raise TimeoutError(
                    f"controller: no batch of {cfg.train.batch_groups} groups (min version {min_version}) "
                    "after "
                    f"{cfg.datastore.get_timeout_s:.0f}s at step {self.step}; gate {gate}; datastore "
                    f"{self.store.stats()}; workers {[asdict(h) for h in self._check_workers()]}"
                )

    def train(self, batch: list[SampleMeta]) -> tuple[list[TrainStats] | None, float]:
        """One train step on ``batch``; None when a storage unit died under it (the batch is
        dropped, its groups regenerated, and the loop waits for another)."""
        start = time.perf_counter()
        shards = split_for_ranks(batch, len(self.trainers))
        self.split_imbalance = imbalance([sum(m.length for m in shard) for shard in shards])
        colocated = self.config.placement.devices == "colocated"
        if colocated:  # the engines give the GPUs to the trainer ranks for the step
            self._on_workers("sleep")
        try:
            stats = self._wait(
                [
                    t.train_step.remote(self.store, shard, policy_version=self.version)
                    for t, shard in zip(self.trainers, shards, strict=True)
                ],
                "trainer",
                "train step",
            )
        except DataStoreSamplesLost as err:
            logger.warning("step %d: batch dropped, samples lost with a storage unit: %s", self.step + 1, err)
            self.store.release([m.sample_id for m in batch])
            self._ask_dispatcher(self.dispatcher.on_lost.remote(self.store.drain_lost()), "on_lost")
            return None, time.perf_counter() - start
        finally:
            if colocated:  # back on the GPUs, paused until the new weights are loaded
                self._on_workers("wake")
        self.store.release([m.sample_id for m in batch])
        trained = list(dict.fromkeys(m.group_id for m in batch))
        self._ask_dispatcher(self.dispatcher.on_trained.remote(trained), "on_trained")
        return stats, time.perf_counter() - start

    def sync_weights(self, version: int) -> float:
        """Trainer weights -> every engine as ``version``; the dispatcher advances only after all
        engines have loaded them, so no group is admitted against weights the engines lack."""
        start = time.perf_counter()
        self.weights.push(version)
        if self.config.placement.devices == "colocated":
            self._on_workers("resume")
        self.version = version
        self._ask_dispatcher(self.dispatcher.set_version.remote(version), "set_version")
        return time.perf_counter() - start

    def maybe_checkpoint(self, force: bool = False) -> float:
        if not self.config.run.save_checkpoints:
            return 0.0
        self.saver.check()  # a background save that failed stops the run here
        every = self.config.run.checkpoint_every
        last = self.step == self.config.train.max_steps
        if not (force or last or (every and self.step % every == 0)):
            return 0.0
        return self.saver.save(self.step, self._run_state, wait=force or last)

    def _run_state(self, dispatcher_state, num_buffered: int) -> ckpt.RunState:
        return ckpt.RunState(
            self.step,
            self.version,
            dispatcher_state,
            ckpt.capture_rng(),
            num_buffered,
            self.model_path,
            counters=dict(self.metrics.last_totals),
            trainer_layout=TrainerLayout.of(self.config.train),
        )

    def observe(self) -> tuple:
        """What a step's metrics need from the dispatcher, the rollout workers and the datastore."""
        gate = self._ask_dispatcher(self.dispatcher.gate_state.remote(), "gate_state")
        self._check_workers()
        health = self.rollout.all_health()  # retired workers' last counters too, so totals never drop
        return gate, health, self.rollout.metrics(), self.store.stats().as_metrics()

    def log_step(self, batch, stats: list[TrainStats], observed: tuple, seconds: dict[str, float]) -> None:
        gate, health, rollout_metrics, store_metrics = observed
        trained_version = self.version - 1
        staleness = [trained_version - m.min_version for m in batch]
        self.staleness_max_seen = max(self.staleness_max_seen, max(staleness))
        metrics = step_metrics(self.version, staleness, gate, stats, health, len(batch), seconds)
        metrics.update(episode_step_metrics(metrics, self._previous_metrics))
        self._previous_metrics = dict(metrics)
        metrics.update(rollout_metrics)
        metrics.update(store_metrics)
        metrics["train/group_split_imbalance"] = self.split_imbalance
        metrics["datastore/lost_groups_total"] = gate.lost_total
        metrics["realloc/group_rebuilds_total"] = self.weights.rebuilds_total
        self.metrics.log(self.step, metrics)
        if self.step % self.config.run.log_every == 0 or self.step == self.config.train.max_steps:
            print(progress_line(self.step, self.config.train.max_steps, metrics), flush=True)

    def maybe_periodic_eval(self) -> None:
        every = self.config.eval.every_steps
        if every and self.step % every == 0 and self.step < self.config.train.max_steps:
            self.evaluate("periodic")

    def evaluate(self, when: str) -> float | None:
        if not self.config.eval.enabled:
            return None
        records, ids = self.prompts.eval, self.prompts.eval_ids
        workers = self.rollout.active
        n = len(workers)
        shards = [(w, records[i::n], ids[i::n]) for i, w in enumerate(workers) if records[i::n]]
        results = self._wait(
            [w.evaluate.remote(recs, toks) for w, recs, toks in shards], "rollout worker", "eval"
        )
        rewards = [x for res in results for x in res.rewards]
        accuracy = float(np.mean(rewards))
        examples = [
            {"prompt": r.text, "answer": r.answer, "response": text, "reward": reward}
            for res, (_, recs, _) in zip(results, shards, strict=True)
            for r, text, reward in zip(recs, res.responses, res.rewards, strict=True)
        ][:8]
        record = {
            "step": self.step,
            "when": when,
            "eval/accuracy": accuracy,
            "eval/num_prompts": len(rewards),
            "examples": examples,
        }
        with open(os.path.join(self.run_dir, "eval.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        print(
            f"eval ({when}, step {self.step}): held-out accuracy {accuracy:.3f} on {len(rewards)} prompts",
            flush=True,
        )
        return accuracy

    def stop_rollouts(self) -> None:
        self._wait([w.stop.remote() for w in self.rollout.active], "rollout worker", "stop")

    def finish(self, first_step, eval_before, eval_after, train_seconds) -> RunSummary:
        gate = self._ask_dispatcher(self.dispatcher.gate_state.remote(), "gate_state")
        summary = RunSummary(
            run_dir=self.run_dir,
            first_step=first_step,
            last_step=self.step,
            version=self.version,
            eval_before=eval_before,
            eval_after=eval_after,
            staleness_max=self.staleness_max_seen,
            evicted_groups=gate.evicted_total,
            train_seconds=train_seconds,
            final_weights_digest=self.final_digest,
            engines_in_sync=self.engines_in_sync,
            stopped_by=self.stop.received,
            start_weights_digest=self.start_digest,
        )
        with open(os.path.join(self.run_dir, "summary.json"), "w") as f:
            json.dump(asdict(summary), f, indent=2)
        if self.config.run.plot:
            from areal_like.plot import plot_run

            print(f"learning curves: {plot_run(self.run_dir)}", flush=True)
        return summary

    def shutdown(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
        for worker in self.workers:
            with contextlib.suppress(Exception):  # a dead worker has nothing left to close
                ray.get(worker.close.remote(), timeout=30)
        store = getattr(self, "store", None)
        if store is not None:
            store.shutdown()
        for handle in [*self.workers, *self.trainers]:
            ray.kill(handle)
        if getattr(self, "dispatcher", None) is not None:
            ray.kill(self.dispatcher)
        if self._owns_ray:
            local_ray.shutdown()
        if getattr(self, "run_lock", None) is not None:
            self.run_lock.release()

    # ---- builders ------------------------------------------------------------------------------
    @property
    def metrics(self) -> MetricsLogger:
        if self._metrics is None:
            sinks: list[MetricsSink] = [JsonlSink(os.path.join(self.run_dir, "metrics.jsonl"))]
            if self.config.run.tensorboard:
                sinks.append(TensorBoardSink(os.path.join(self.run_dir, "tensorboard")))
            if self.config.run.wandb_project:
                from omegaconf import OmegaConf

                plain = OmegaConf.to_container(OmegaConf.structured(self.config))
                sinks.append(WandbSink(self.config.run.wandb_project, self.run_dir, plain))
            self._metrics = MetricsLogger(sinks)
        return self._metrics

    def _wait(self, refs: list, role: str, what: str, timeout_s: float | None = None) -> list:
        """``ray.get`` with a deadline; on timeout the error names the actors that did not answer."""
        hint = "that actor is stuck or dead"
        if timeout_s is None:
            timeout_s = self.config.run.actor_timeout_s
            hint = "raise run.actor_timeout_s if this is expected; otherwise " + hint
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if pending:
            late = [i for i, ref in enumerate(refs) if ref in pending]
            raise TimeoutError(
                f"controller: {role} {late} did not finish '{what}' within {timeout_s:.0f}s "
                f"at step {self.step} ({hint})"
            )
        return ray.get(refs)

    def _ask_dispatcher(self, ref: ray.ObjectRef, what: str):
        """The result of one dispatcher call, or TimeoutError naming the dispatcher and the call."""
        return self._wait([ref], "dispatcher", what, timeout_s=_DISPATCHER_TIMEOUT_S)[0]

    def _on_workers(self, method: str) -> None:
        """Call ``method`` on every rollout worker in rotation and wait (colocated turn-taking)."""
        self._wait([getattr(w, method).remote() for w in self.rollout.active], "rollout worker", method)

    def _check_workers(self):
        """Health of the workers in rotation; ones that stopped answering are retired on the way."""
        return self.rollout.check()


def run_training(config: Config, forced_lengths: ForcedLengths | None = None) -> RunSummary:
    return RLController(config, forced_lengths).run()
