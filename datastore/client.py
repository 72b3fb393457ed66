"""Datastore client: the only way other packages touch the store.

It holds the config and ``StoreHandles`` only, so it pickles into other Ray actors (rollout
workers, trainer ranks); per-process state (its node, its wire connections, the units it saw die,
latencies not yet sent) starts empty on arrival. Every call goes over ``datastore.wire`` straight to
an actor: array bytes between the client and the storage units, column-packed; ids and a few ints
per sample to the controller (see ``datastore.controller`` for the dataflow and costs). Ray is used
only to confirm that an unreachable unit is dead. Safe to use from several threads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError

from datastore.config import DataStoreConfig
from datastore.packing import pack_rows, unpack_rows
from datastore.placement import candidate_units
from datastore.snapshot import read_snapshot, write_snapshot
from datastore.types import (
    BatchMeta,
    DataStoreSamplesLost,
    DataStoreTimeout,
    RegisterReply,
    SampleMeta,
    SampleMetaColumns,
    SampleWrite,
    StoreHandles,
    StoreSnapshot,
    StoreStats,
    TimedOut,
)
from datastore.wire import WireClient, WireError

logger = logging.getLogger(__name__)

# Reply deadline of calls that do not wait by design (metadata, unit reads and writes); a call that
# waits (put, blocking get) gets its own timeout plus this margin.
_RPC_TIMEOUT_S = 120.0
# Restore puts in chunks so that a snapshot larger than one put's limit still goes back in, and a
# snapshot reads in chunks so that no unit packs its whole content into one reply.
_RESTORE_CHUNK_SAMPLES = 1024
_SNAPSHOT_CHUNK_SAMPLES = 1024
# Latencies go to the controller once this many are buffered or this long after the last send,
# whichever comes first (one small call); stats() sends them at once.
_LATENCY_FLUSH_COUNT = 256
_LATENCY_FLUSH_S = 2.0


class _UnitDead(Exception):
    """Internal: a wire call to a unit failed and Ray confirms the unit is dead (already reported)."""

    def __init__(self, unit: int) -> None:
        super().__init__(unit)
        self.unit = unit


class DataStoreClient:
    """Put samples, claim batches of complete groups, read their columns, release them."""

    def __init__(self, config: DataStoreConfig, handles: StoreHandles) -> None:
        self._config = config
        self._handles = handles
        self._init_process_state()

    def __getstate__(self) -> dict:
        return {"_config": self._config, "_handles": self._handles}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_process_state()

    def _init_process_state(self) -> None:
        self._units = self._handles.units  # Ray handles (tests reach the units through them)
        self._node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        self._wire = WireClient(self._handles.secret, self._node_id)
        # Which of its node's units this process writes to; os.urandom leaves the run's seeded RNGs alone.
        self._home_slot = int.from_bytes(os.urandom(4), "little")
        self._dead: set[int] = set()
        self._lock = threading.Lock()
        self._latencies: dict[str, list[float]] = {}
        self._num_latencies = 0
        self._last_flush = time.monotonic()
        self.latency_reports_failed = 0
        """Latency batches this process could not send (they are dropped)."""

    # ---- writers -------------------------------------------------------------------------------

    def put(self, samples: list[SampleWrite]) -> None:
        """Write samples: data to one of this node's units (the same one for every put of this
        process, so a group written by one worker lives on one unit), then metadata to the controller.

        Blocks while the store holds ``capacity_samples`` (back-pressure), up to ``put_timeout_s``,
        then raises DataStoreTimeout; on any failure the data already written is deleted again. A
        unit found dead is reported and the put goes to the live ones.
        """
        if not samples:
            return
        if len(samples) > self._config.capacity_samples:
            raise ValueError(
                f"datastore: one put of {len(samples)} samples exceeds datastore.capacity_samples="
                f"{self._config.capacity_samples}; put in smaller batches or raise the capacity"
            )
        for sample in samples:
            if not sample.columns:
                raise ValueError(f"datastore: sample {sample.sample_id!r} has no columns")
        start = time.perf_counter()
        self._put(samples, node_id=self._node_id)
        self._record("put", time.perf_counter() - start)

    def add_columns(self, sample_ids: list[str], columns: list[dict[str, np.ndarray]]) -> None:
        """Add columns to samples already in the store (e.g. a reward stage); readers see them after."""
        if len(sample_ids) != len(columns):
            raise ValueError(
                f"datastore.add_columns: {len(sample_ids)} sample ids but {len(columns)} column dicts"
            )
        if not sample_ids:
            return
        metas = self._call_controller("locate", sample_ids).rows()
        for unit, idx in _positions_per_unit([m.unit for m in metas]).items():
            rows = pack_rows([sample_ids[i] for i in idx], [columns[i] for i in idx])
            try:
                self._call_unit(unit, "add_columns", rows)
            except _UnitDead:
                lost = [metas[i] for i in idx]
                raise self._lost_error([m.sample_id for m in lost], [m.group_id for m in lost]) from None
        names = [sorted(cols) for cols in columns]
        nbytes = [sum(np.asarray(a).nbytes for a in cols.values()) for cols in columns]
        self._call_controller("mark_columns", sample_ids, names, nbytes)

    # ---- readers -------------------------------------------------------------------------------

    def get_batch_meta(
        self,
        task: str,
        columns: list[str],
        num_groups: int,
        min_version: int | None = None,
        timeout_s: float | None = 0.0,
        policy: str | None = None,
    ) -> BatchMeta | None:
        """Claim for ``task`` ``num_groups`` complete groups whose ``columns`` are all written.

        ``policy`` (default ``datastore.sampling_policy``, 'oldest_first') picks which of the ready
        groups; they are marked consumed by ``task`` (other tasks still get them). With
        ``min_version``, unclaimed groups holding a sample older than it are evicted (see
        ``drain_evictions``) and never returned. ``timeout_s``: 0 returns None at once when there
        are not enough groups; None waits ``get_timeout_s``; otherwise waits that long, then raises
        DataStoreTimeout naming what was missing.
        """
        if num_groups < 1:
            raise ValueError(f"datastore.get_batch_meta: num_groups={num_groups}: must be >= 1")
        if timeout_s is None:
            timeout_s = self._config.get_timeout_s
        if timeout_s < 0:
            raise ValueError(f"datastore.get_batch_meta: timeout_s={timeout_s}: must be >= 0 or None")
        if policy is not None:
            from datastore.policies import make_sampling_policy

            make_sampling_policy(policy)  # fails here, naming the choices, rather than in the actor
        start = time.perf_counter()
        args = (task, list(columns), num_groups, min_version, timeout_s, policy)
        reply = self._call_controller("get_batch_meta", *args, wait_s=timeout_s)
        self._record("get_batch_meta", time.perf_counter() - start)
        if isinstance(reply, TimedOut):
            raise DataStoreTimeout(reply.message)
        return BatchMeta(reply.rows()) if reply is not None else None

    def get_data(self, samples: list[SampleMeta], columns: list[str]) -> list[dict[str, np.ndarray]]:
        """The requested columns of each sample, in the order of ``samples`` (one call per unit).

        Arrays are views into one receive buffer per unit and column (the store keeps its own
        copy, so writing to them changes nothing there). Raises
        DataStoreSamplesLost if some samples were on a unit that died (their groups are queued in
        ``drain_lost``); the caller releases the batch and gets another.
        """
        start = time.perf_counter()
        rows, lost = self._fetch(samples, list(columns))
        if lost:
            raise self._lost_error([samples[i].sample_id for i in lost], [samples[i].group_id for i in lost])
        self._record("get_data", time.perf_counter() - start)
        return rows

    def release(self, sample_ids: list[str]) -> None:
        """Delete samples (data and metadata) once consumed; frees capacity for blocked writers."""
        if sample_ids:
            start = time.perf_counter()
            self._call_controller("release", list(sample_ids))
            self._record("release", time.perf_counter() - start)

    def drain_evictions(self) -> list[int]:
        """Group ids evicted as stale since the last drain (for regeneration or accounting)."""
        return self._call_controller("drain_evictions")

    def drain_lost(self) -> list[int]:
        """Group ids removed since the last drain because a storage unit died: regenerate them."""
        return self._call_controller("drain_lost")

    def stats(self) -> StoreStats:
        self._flush_latencies(force=True)
        return self._call_controller("stats")

    # ---- checkpoint and lifecycle --------------------------------------------------------------

    def snapshot(self, path: str, task: str) -> int:
        """Write every sample ``task`` has not consumed (all columns) to ``path`` atomically.

        Call it with writers and readers paused (at a checkpoint); returns the number of samples.
        Groups found lost on the way are left out (they are in ``drain_lost``).
        """
        snapshot = self.snapshot_samples(task)
        write_snapshot(path, snapshot)
        num = len(snapshot.samples)
        logger.info("datastore: snapshot of %d samples unconsumed by %r -> %s", num, task, path)
        return num

    def snapshot_samples(self, task: str) -> StoreSnapshot:
        """``snapshot`` in memory: the caller writes it (``datastore.snapshot.write_snapshot``)
        when it likes, e.g. in the background while training goes on."""
        metas = self._call_controller("snapshot_metas", task).rows()
        rows: list[dict[str, np.ndarray]] = []
        lost_groups: set[int] = set()
        for start in range(0, len(metas), _SNAPSHOT_CHUNK_SAMPLES):  # bounded replies from the units
            chunk = metas[start : start + _SNAPSHOT_CHUNK_SAMPLES]
            chunk_rows, lost = self._fetch(chunk, None)
            rows += chunk_rows
            lost_groups.update(chunk[i].group_id for i in lost)
        if lost_groups:
            logger.warning("datastore: snapshot leaves out %d groups lost with a dead unit", len(lost_groups))
        kept = [(m, row) for m, row in zip(metas, rows, strict=True) if m.group_id not in lost_groups]
        return StoreSnapshot(
            samples=[
                SampleWrite(
                    sample_id=meta.sample_id,
                    group_id=meta.group_id,
                    group_size=meta.group_size,
                    columns=row,
                    min_version=meta.min_version,
                    max_version=meta.max_version,
                    length=meta.length,
                )
                for meta, row in kept
            ],
            task=task,
        )

    def restore(self, path: str) -> list[int]:
        """Put a snapshot's samples back (into a fresh store, spread over its live units), oldest
        first; returns the restored group ids in that order (the dispatcher uses them to decide
        which prompts to requeue)."""
        snapshot = read_snapshot(path)
        for start in range(0, len(snapshot.samples), _RESTORE_CHUNK_SAMPLES):
            self._put(snapshot.samples[start : start + _RESTORE_CHUNK_SAMPLES], node_id=None)
        logger.info("datastore: restored %d samples from %s", len(snapshot.samples), path)
        return list(dict.fromkeys(sample.group_id for sample in snapshot.samples))

    def shutdown(self) -> None:
        """Kill the controller and the units; the data is gone. Safe to call twice."""
        for actor in [self._handles.controller, *self._handles.units]:
            with contextlib.suppress(ValueError):  # Ray refuses handles of actors it already removed
                ray.kill(actor, no_restart=True)

    # ---- internals -----------------------------------------------------------------------------

    def _put(self, samples: list[SampleWrite], node_id: str | None) -> None:
        """Route, write, register; put again elsewhere (at most once per unit) when a unit is dead."""
        for _ in range(len(self._units) + 1):
            candidates = candidate_units(self._handles.unit_nodes, self._dead, node_id)
            if node_id is not None:  # a writer: all its puts to one of its node's units
                unit_of = [candidates[self._home_slot % len(candidates)]] * len(samples)
            else:  # a restore: spread by group
                unit_of = [candidates[s.group_id % len(candidates)] for s in samples]
            positions = _positions_per_unit(unit_of)
            written: list[int] = []
            nbytes = [0] * len(samples)
            try:
                for unit, idx in positions.items():
                    rows = pack_rows([samples[i].sample_id for i in idx], [samples[i].columns for i in idx])
                    for i, size in zip(idx, rows.row_nbytes(), strict=True):
                        nbytes[i] = size
                    self._call_unit(unit, "put", rows)
                    written.append(unit)
                metas = SampleMetaColumns.for_writes(samples, unit_of, nbytes)
                timeout_s = self._config.put_timeout_s
                reply: RegisterReply = self._call_controller("register", metas, timeout_s, wait_s=timeout_s)
            except BaseException as err:
                self._delete_quietly({u: positions[u] for u in written}, samples)
                if isinstance(err, _UnitDead):
                    continue
                raise
            self._dead.update(reply.dead_units)
            if reply.refused_dead_units or reply.timed_out:
                self._delete_quietly({u: positions[u] for u in written if u not in self._dead}, samples)
            if reply.timed_out:
                raise DataStoreTimeout(reply.timed_out)
            if not reply.refused_dead_units:
                return
        raise RuntimeError(f"datastore: put found a dead unit on every try; dead units {sorted(self._dead)}")

    def _delete_quietly(self, positions: dict[int, list[int]], samples: list[SampleWrite]) -> None:
        for unit, idx in positions.items():
            try:
                self._call_unit(unit, "delete", [samples[i].sample_id for i in idx])
            except Exception:  # keep the caller's failure; this one is only logged
                logger.exception("datastore: could not delete the data of a failed put on unit %d", unit)

    def _fetch(
        self, samples: list[SampleMeta], columns: list[str] | None
    ) -> tuple[list[dict[str, np.ndarray]], list[int]]:
        """Rows of ``samples`` (empty dicts for lost ones) and the positions of the lost ones."""
        rows: list[dict[str, np.ndarray]] = [{} for _ in samples]
        missing: list[int] = []
        for unit, idx in _positions_per_unit([s.unit for s in samples]).items():
            if unit in self._dead:
                missing.extend(idx)
                continue
            try:
                packed, absent = self._call_unit(unit, "get", [samples[i].sample_id for i in idx], columns)
            except _UnitDead:
                missing.extend(idx)
                continue
            absent_set = set(absent)
            held = [i for i in idx if samples[i].sample_id not in absent_set]
            missing.extend(i for i in idx if samples[i].sample_id in absent_set)
            for i, row in zip(held, unpack_rows(packed), strict=True):
                rows[i] = row
        if missing:
            group_ids = list(dict.fromkeys(samples[i].group_id for i in missing))
            lost_groups = set(self._call_controller("lost_among", group_ids))
            not_lost = [samples[i].sample_id for i in missing if samples[i].group_id not in lost_groups]
            if not_lost:
                raise KeyError(f"datastore: samples {not_lost[:5]} are not held (released or evicted?)")
        return rows, sorted(missing)

    def _lost_error(self, sample_ids: list[str], group_ids: list[int]) -> DataStoreSamplesLost:
        groups = list(dict.fromkeys(group_ids))
        return DataStoreSamplesLost(
            f"datastore: {len(sample_ids)} samples of the request are lost (dead storage units: "
            f"{sorted(self._dead)}); their {len(groups)} groups were removed and queued in drain_lost() "
            "for regeneration. Release the batch and get another",
            sample_ids,
            groups,
            sorted(self._dead),
        )

    def _call_controller(self, method: str, *args: Any, wait_s: float = 0.0) -> Any:
        endpoint = self._handles.controller_endpoint
        timeout_s = wait_s + _RPC_TIMEOUT_S
        try:
            return self._wire.call(endpoint, method, args, timeout_s)
        except TimeoutError as err:
            raise DataStoreTimeout(
                f"datastore: {method} got no reply from the controller within {timeout_s:.0f}s; "
                "it is stuck or dead"
            ) from err

    def _call_unit(self, unit: int, method: str, *args: Any) -> Any:
        """``method`` on a unit; raises _UnitDead (after reporting it) if Ray says the unit is dead."""
        try:
            return self._wire.call(self._handles.unit_endpoints[unit], method, args, _RPC_TIMEOUT_S)
        except (WireError, TimeoutError) as err:
            try:
                ray.get(self._units[unit].num_samples.remote(), timeout=_RPC_TIMEOUT_S)
            except RayActorError as dead:
                self._dead.add(unit)
                self._dead.update(self._call_controller("report_dead_unit", unit, repr(dead)))
                raise _UnitDead(unit) from err
            except Exception:
                pass
            if isinstance(err, TimeoutError):
                raise DataStoreTimeout(f"datastore: {method} on storage unit {unit}: {err}") from err
            raise

    def _record(self, op: str, seconds: float) -> None:
        with self._lock:
            self._latencies.setdefault(op, []).append(seconds)
            self._num_latencies += 1
        self._flush_latencies(force=False)

    def _flush_latencies(self, force: bool) -> None:
        with self._lock:
            now = time.monotonic()
            due = self._num_latencies >= _LATENCY_FLUSH_COUNT or now - self._last_flush > _LATENCY_FLUSH_S
            if not self._latencies or not (force or due):
                return
            batch, self._latencies, self._num_latencies, self._last_flush = self._latencies, {}, 0, now
        try:
            self._call_controller("record_latencies", batch)
        except Exception:  # fault boundary: metrics must not fail the call they measured
            self.latency_reports_failed += 1
            logger.warning("datastore: could not send call latencies to the controller", exc_info=True)


def _positions_per_unit(units: list[int]) -> dict[int, list[int]]:
    """unit -> positions in the caller's list of the samples on that unit."""
    positions: dict[int, list[int]] = {}
    for i, unit in enumerate(units):
        positions.setdefault(unit, []).append(i)
    return positions
