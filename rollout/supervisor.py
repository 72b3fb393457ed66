"""The rollout supervisor: which rollout workers are in rotation, and what happens when one stops answering.

It does no routing itself: routing is pull-based. Each rollout worker owns one engine and asks the
dispatcher for groups only when it has room (``groups_per_generate`` minus the groups it holds), so:
- least-loaded: an engine that is behind holds its groups longer and asks for fewer; idle ones ask
  at once. A push router would need load reports a round trip old; pulling uses the live number.
- prefix reuse: a group is acquired by one worker and all ``num_samples`` requests go to that
  worker's engine together, so they share the prompt prefix (and one prefill batch on HF).
- the staleness gate stays the single admission point (the dispatcher), whatever the worker count.

What pulling alone does not give is failure handling; ``RolloutSupervisor`` adds it. The controller
(driver) owns one and calls ``check`` every few seconds and ``update_weights`` at every weight sync:
- ``check``: read the dispatcher's in-flight groups, then ask every worker in rotation for
  ``health`` (one ``health_timeout_s`` for all). A worker that does not answer, or whose actor died,
  is killed (so it can never write again) and taken out of rotation; a worker that reports it
  retired itself (its engine stalled) is taken out too. The groups they held go back to the
  dispatcher (``abandon``: prompts requeued, gate slots freed) and other workers pull them. A
  worker whose loop raised is a bug, not an outage: ``check`` raises with its traceback.
- Which groups a dead worker held: the dispatcher's in-flight set read *before* the health calls,
  minus every group an answering worker reports in flight (a worker that retired itself included:
  it finishes or hands back its own). A worker records acquired groups under the same lock as its
  ``acquire`` call and drops them only after ``finish``, so no answering worker's group is in that
  difference; a group finished in between is in it, but ``abandon`` ignores finished ids (and
  the resubmitted count, and its warning, count only the groups it requeued). A killed
  worker is waited for until its actor is gone before its groups are handed back.
- Restart: given ``make_worker``, a retired worker is replaced by a fresh actor (up to
  ``max_restarts``), which loads the last weights sent and starts its loop before it rejoins; the
  dead one was killed first, so it never writes again.
- Counted: ``engines_retired_total``, ``engines_restarted_total`` and ``groups_resubmitted_total``.
- Fewer than ``min_active`` workers left: ``check`` raises, naming every retirement and its reason.
Blocking: ``check`` waits at most ``health_timeout_s`` plus one dispatcher call; nothing runs in the
background. Shutdown is the controller's (it still kills every actor it made).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayTaskError

from rollout.worker import WorkerHealth

logger = logging.getLogger(__name__)

_RPC_TIMEOUT_S = 60.0
"""Deadline of a call to the dispatcher."""
_RESTART_TIMEOUT_S = 600.0
"""Deadline for a replacement worker to load its model and the current weights."""


@dataclass(frozen=True)
class RetiredWorker:
    """A rollout worker taken out of rotation."""

    worker_id: int
    reason: str


class RolloutSupervisor:
    """The controller's view of the rollout workers: who is in rotation, and failure handling."""

    def __init__(
        self,
        workers: list[Any],
        dispatcher: Any,
        health_timeout_s: float = 60.0,
        min_active: int = 1,
        make_worker: Callable[[int], Any] | None = None,
        max_restarts: int = 0,
        defer_start: bool = False,
    ) -> None:
        """``make_worker(worker_id)`` builds a replacement actor; with it, up to ``max_restarts``
        retired workers are replaced, synced to the last weights and started before rejoining.
        ``defer_start`` (weights through the reallocation plan, whose group must be rebuilt first): a
        replacement joins the rotation unstarted; the weight sync starts it (``start_replacements``)
        once it holds the current weights."""
        if not workers:
            raise ValueError("RolloutSupervisor: no rollout workers")
        if not 1 <= min_active <= len(workers):
            raise ValueError(f"RolloutSupervisor: min_active={min_active} must be in [1, {len(workers)}]")
        self._active: dict[int, Any] = dict(enumerate(workers))
        self._dispatcher = dispatcher
        self._health_timeout_s = health_timeout_s
        self._min_active = min_active
        self.retired: list[RetiredWorker] = []
        self.groups_resubmitted_total = 0
        """Groups the supervisor found orphaned by retired workers and handed back to the dispatcher
        (a worker that retires itself hands its own back first; those count in its health)."""
        self._last_health: dict[int, WorkerHealth] = {}
        self._retired_health: list[WorkerHealth] = []
        self._make_worker = make_worker
        self._max_restarts = max_restarts
        self.restarts_total = 0
        self._weights: tuple[Any, int] | None = None  # the last (weights ref, version) sent
        self._defer_start = defer_start
        self._unstarted: set[int] = set()

    @property
    def active(self) -> list[Any]:
        """Handles of the workers in rotation (send weights and eval prompts to these only)."""
        return list(self._active.values())

    @property
    def active_ids(self) -> list[int]:
        return list(self._active)

    def all_health(self) -> list[WorkerHealth]:
        """Last health of every worker ever in rotation (retired ones included), for run totals."""
        return [*self._retired_health, *(self._last_health[wid] for wid in sorted(self._last_health))]

    def check(self) -> list[WorkerHealth]:
        """Poll the workers in rotation, retire the ones that stopped answering; health of the rest."""
        in_flight_before = self._dispatcher_in_flight()
        refs = {wid: worker.health.remote() for wid, worker in self._active.items()}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self._health_timeout_s)
        answered = set(ready)
        healthy: list[WorkerHealth] = []
        claimed: set[int] = set()  # groups some answering worker holds
        failures: dict[int, str] = {}
        for wid, ref in refs.items():
            if ref not in answered:
                failures[wid] = f"no health answer within {self._health_timeout_s:.0f}s"
                continue
            try:
                health: WorkerHealth = ray.get(ref, timeout=0)
            except (ActorDiedError, ActorUnavailableError) as error:
                failures[wid] = f"actor died: {type(error).__name__}: {str(error).splitlines()[0]}"
                continue
            except RayTaskError as error:  # the worker's loop raised: a bug, stop loudly
                raise RuntimeError(f"rollout worker {wid} failed:\n{error}") from error
            self._last_health[wid] = health
            claimed.update(health.in_flight_group_ids)
            if health.retired is not None:
                failures[wid] = f"retired itself: {health.retired}"
            else:
                healthy.append(health)
        orphans = sorted(set(in_flight_before) - claimed)
        if failures:
            self._retire_all(failures, orphans)
        elif orphans:
            # Held by no worker in rotation: a retired worker's acquire that Ray ran after it died
            # (calls from different callers are not ordered). Live workers claim every group they
            # were given (``health`` waits for an acquire in progress), so these are orphans.
            self._resubmit(orphans, "held by no worker in rotation (a retired worker's late acquire)")
        return healthy

    def update_weights(self, weights_ref: Any, version: int, timeout_s: float) -> None:
        """Send weights to every worker in rotation; a worker that dies or times out is retired.

        Raises when a worker answers with another version (a bug) or rejects the weights.
        """
        self._weights = (weights_ref, version)  # a replacement made from here on gets these
        refs = {
            wid: worker.update_weights.remote(weights_ref, version) for wid, worker in self._active.items()
        }
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        failures: dict[int, str] = {}
        for wid, ref in refs.items():
            if ref not in ready:
                failures[wid] = f"weight update to version {version} not done within {timeout_s:.0f}s"
                continue
            try:
                loaded = ray.get(ref, timeout=0)
            except (ActorDiedError, ActorUnavailableError) as error:
                failures[wid] = f"actor died during weight update: {type(error).__name__}"
                continue
            if loaded != version:
                raise RuntimeError(f"rollout worker {wid} loaded version {loaded}, expected {version}")
        if failures:
            # A worker that missed an update must not generate under old weights: out it goes.
            self._retire_all(failures, orphans=None)

    def metrics(self) -> dict[str, float]:
        return {
            "rollout/engines_active": float(len(self._active)),
            "rollout/engines_retired_total": float(len(self.retired)),
            "rollout/groups_resubmitted_total": float(self.groups_resubmitted_total),
            "rollout/engines_restarted_total": float(self.restarts_total),
        }

    # ---- internals ---------------------------------------------------------------------------------
    def _dispatcher_in_flight(self) -> list[int]:
        state = ray.get(self._dispatcher.state.remote(), timeout=_RPC_TIMEOUT_S)
        return list(state.in_flight)

    def _retire_all(self, failures: dict[int, str], orphans: list[int] | None) -> None:
        for wid, reason in failures.items():
            handle = self._active.pop(wid)
            if not reason.startswith("retired itself"):
                _kill_and_wait(handle)  # a worker that stopped answering may wake up; it must not write
            logger.error("rollout worker %d taken out of rotation: %s", wid, reason)
            if wid in self._last_health:
                self._retired_health.append(self._last_health.pop(wid))
        if orphans is None:  # the caller does not know the live set: compute it now
            orphans = self._orphans_now()
        if orphans:
            self._resubmit(orphans, "held by retired workers")
        self.retired.extend(RetiredWorker(wid, reason) for wid, reason in failures.items())
        for wid in failures:
            if self._make_worker is not None and self.restarts_total < self._max_restarts:
                self._replace(wid)
        if len(self._active) < self._min_active:
            history = "; ".join(f"worker {r.worker_id}: {r.reason}" for r in self.retired)
            raise RuntimeError(
                f"only {len(self._active)} rollout worker(s) left in rotation, fewer than "
                f"rollout.min_active_workers={self._min_active}; retired: {history}"
            )

    def _resubmit(self, group_ids: list[int], why: str) -> None:
        requeued: int = ray.get(self._dispatcher.abandon.remote(group_ids), timeout=_RPC_TIMEOUT_S)
        if requeued:  # the others finished between the in-flight read and the health answers
            logger.warning("resubmitted %d prompt groups %s", requeued, why)
        self.groups_resubmitted_total += requeued

    def start_replacements(self) -> None:
        """Start the replacements made with ``defer_start`` (call once they hold the current weights)."""
        for wid in sorted(self._unstarted):
            if wid in self._active:
                ray.get(self._active[wid].start.remote(), timeout=_RESTART_TIMEOUT_S)
                logger.warning("rollout worker %d synced and started", wid)
        self._unstarted.clear()

    def _replace(self, wid: int) -> None:
        """A fresh actor for worker ``wid``: synced to the last weights, started, back in rotation
        (with ``defer_start``: in rotation but unstarted until the next weight sync)."""
        assert self._make_worker is not None, "replacements are made only with a worker factory"
        handle = self._make_worker(wid)
        if self._defer_start:
            self._active[wid] = handle
            self._unstarted.add(wid)
            self.restarts_total += 1
            logger.warning("rollout worker %d replaced; it starts after the next weight sync", wid)
            return
        if self._weights is not None:
            ref, version = self._weights
            loaded = ray.get(handle.update_weights.remote(ref, version), timeout=_RESTART_TIMEOUT_S)
            assert loaded == version, (loaded, version)
        ray.get(handle.start.remote(), timeout=_RESTART_TIMEOUT_S)
        self._active[wid] = handle
        self.restarts_total += 1
        logger.warning(
            "rollout worker %d restarted and back in rotation (restart %d of %d)",
            wid,
            self.restarts_total,
            self._max_restarts,
        )

    def _orphans_now(self) -> list[int]:
        in_flight_before = self._dispatcher_in_flight()
        refs = [worker.health.remote() for worker in self._active.values()]
        try:
            answers = ray.get(refs, timeout=self._health_timeout_s)
        except (GetTimeoutError, ActorDiedError, ActorUnavailableError, RayTaskError):
            return []  # the next check() finds the culprit and the orphans with it
        claimed = {gid for h in answers for gid in h.in_flight_group_ids}
        return sorted(set(in_flight_before) - claimed)


def _kill_and_wait(handle: Any, timeout_s: float = 30.0) -> None:
    """Kill a worker actor and wait (bounded) until calls to it fail, i.e. its process is gone."""
    ray.kill(handle, no_restart=True)
    with contextlib.suppress(ActorDiedError, ActorUnavailableError, GetTimeoutError, RayTaskError):
        ray.get(handle.health.remote(), timeout=timeout_s)
