"""Datastore client: the only way other packages touch the store.

It holds actor handles and the config only, so it pickles into other Ray actors (rollout workers,
trainer ranks). Array bytes go between the client and the storage units directly; the controller
gets ids and a few ints per sample (see ``datastore.controller`` for the dataflow and costs).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError

from datastore.config import DataStoreConfig
from datastore.types import (
    BatchMeta,
    DataStoreTimeout,
    SampleMeta,
    SampleWrite,
    StoreSnapshot,
    StoreStats,
    TimedOut,
)

logger = logging.getLogger(__name__)

# Reply deadline of calls that do not wait by design (metadata, unit reads and writes); a call that
# waits (put, blocking get) gets its own timeout plus this margin.
_RPC_TIMEOUT_S = 120.0
# Restore puts in chunks so that a snapshot larger than one put's limit still goes back in.
_RESTORE_CHUNK_SAMPLES = 1024


class DataStoreClient:
    """Put samples, claim batches of complete groups, read their columns, release them."""

    def __init__(self, config: DataStoreConfig, controller: Any, units: list[Any]) -> None:
        self._config = config
        self._controller = controller
        self._units = units

    # ---- writers -------------------------------------------------------------------------------

    def put(self, samples: list[SampleWrite]) -> None:
        """Write samples: data to the unit of each sample's group, then metadata to the controller.

        Blocks while the store holds ``capacity_samples`` (back-pressure), up to ``put_timeout_s``,
        then raises DataStoreTimeout; on any failure the data already written is deleted again.
        """
        if not samples:
            return
        if len(samples) > self._config.capacity_samples:
            raise ValueError(
                f"datastore: one put of {len(samples)} samples exceeds datastore.capacity_samples="
                f"{self._config.capacity_samples}; put in smaller batches or raise the capacity"
            )
        samples_per_unit: dict[int, list[SampleWrite]] = {}
        for sample in samples:
            if not sample.columns:
                raise ValueError(f"datastore: sample {sample.sample_id!r} has no columns")
            samples_per_unit.setdefault(self._unit_of(sample.group_id), []).append(sample)
        refs = {
            unit: self._units[unit].put.remote([s.sample_id for s in group], [s.columns for s in group])
            for unit, group in samples_per_unit.items()
        }
        metas = [self._meta_of(sample) for sample in samples]
        written: list[int] = []
        try:
            for unit, ref in refs.items():
                self._get(ref, _RPC_TIMEOUT_S, f"put to storage unit {unit}")
                written.append(unit)
            reply = self._get(
                self._controller.register.remote(metas, self._config.put_timeout_s),
                self._config.put_timeout_s + _RPC_TIMEOUT_S,
                "put (register with the controller)",
            )
        except Exception:
            try:
                self._delete({unit: samples_per_unit[unit] for unit in written})
            except Exception:  # keep the original failure; this one is only logged
                logger.exception("datastore: could not delete the data of a failed put")
            raise
        if isinstance(reply, TimedOut):
            self._delete(samples_per_unit)
            raise DataStoreTimeout(reply.message)

    def add_columns(self, sample_ids: list[str], columns: list[dict[str, np.ndarray]]) -> None:
        """Add columns to samples already in the store (e.g. a reward stage); readers see them after."""
        if len(sample_ids) != len(columns):
            raise ValueError(
                f"datastore.add_columns: {len(sample_ids)} sample ids but {len(columns)} column dicts"
            )
        if not sample_ids:
            return
        units = self._get(self._controller.locate.remote(sample_ids), _RPC_TIMEOUT_S, "add_columns (locate)")
        positions = _positions_per_unit(units)
        refs = [
            self._units[unit].add_columns.remote([sample_ids[i] for i in idx], [columns[i] for i in idx])
            for unit, idx in positions.items()
        ]
        self._get(refs, _RPC_TIMEOUT_S, "add_columns (write to storage units)")
        names = [sorted(cols) for cols in columns]
        ref = self._controller.mark_columns.remote(sample_ids, names)
        self._get(ref, _RPC_TIMEOUT_S, "add_columns (mark columns ready)")

    # ---- readers -------------------------------------------------------------------------------

    def get_batch_meta(
        self,
        task: str,
        columns: list[str],
        num_groups: int,
        min_version: int | None = None,
        timeout_s: float | None = 0.0,
    ) -> BatchMeta | None:
        """Claim for ``task`` the ``num_groups`` oldest complete groups whose ``columns`` are all written.

        Groups come back oldest first and are marked consumed by ``task`` (other tasks still get
        them). With ``min_version``, unclaimed groups holding a sample older than it are evicted
        (see ``drain_evictions``) and never returned. ``timeout_s``: 0 returns None at once when
        there are not enough groups; None waits ``get_timeout_s``; otherwise waits that long, then
        raises DataStoreTimeout naming what was missing.
        """
        if num_groups < 1:
            raise ValueError(f"datastore.get_batch_meta: num_groups={num_groups}: must be >= 1")
        if timeout_s is None:
            timeout_s = self._config.get_timeout_s
        if timeout_s < 0:
            raise ValueError(f"datastore.get_batch_meta: timeout_s={timeout_s}: must be >= 0 or None")
        ref = self._controller.get_batch_meta.remote(task, list(columns), num_groups, min_version, timeout_s)
        reply = self._get(ref, timeout_s + _RPC_TIMEOUT_S, f"get_batch_meta for task {task!r}")
        if isinstance(reply, TimedOut):
            raise DataStoreTimeout(reply.message)
        return reply

    def get_data(self, samples: list[SampleMeta], columns: list[str]) -> list[dict[str, np.ndarray]]:
        """The requested columns of each sample, in the order of ``samples`` (one call per unit).

        Large arrays may come back as read-only views of Ray's object store: copy before writing.
        """
        return self._fetch(samples, list(columns))

    def release(self, sample_ids: list[str]) -> None:
        """Delete samples (data and metadata) once consumed; frees capacity for blocked writers."""
        if sample_ids:
            self._get(self._controller.release.remote(list(sample_ids)), _RPC_TIMEOUT_S, "release")

    def drain_evictions(self) -> list[int]:
        """Group ids evicted as stale since the last drain (for regeneration or accounting)."""
        return self._get(self._controller.drain_evictions.remote(), _RPC_TIMEOUT_S, "drain_evictions")

    def stats(self) -> StoreStats:
        return self._get(self._controller.stats.remote(), _RPC_TIMEOUT_S, "stats")

    # ---- checkpoint and lifecycle --------------------------------------------------------------

    def snapshot(self, path: str, task: str) -> int:
        """Write every sample ``task`` has not consumed (all columns) to ``path`` atomically.

        Call it with writers and readers paused (at a checkpoint); returns the number of samples.
        """
        metas = self._get(self._controller.snapshot_metas.remote(task), _RPC_TIMEOUT_S, "snapshot")
        rows = self._fetch(metas, None)
        snapshot = StoreSnapshot(
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
                for meta, row in zip(metas, rows, strict=True)
            ],
            task=task,
        )
        tmp_path = f"{path}.tmp"
        with open(tmp_path, "wb") as f:
            pickle.dump(snapshot, f, protocol=pickle.HIGHEST_PROTOCOL)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
        logger.info("datastore: snapshot of %d samples unconsumed by %r -> %s", len(metas), task, path)
        return len(metas)

    def restore(self, path: str) -> list[int]:
        """Put a snapshot's samples back (into a fresh store), oldest first; returns the restored
        group ids in that order (the dispatcher uses them to decide which prompts to requeue)."""
        with open(path, "rb") as f:
            snapshot = pickle.load(f)
        if not isinstance(snapshot, StoreSnapshot) or snapshot.format_version != 1:
            raise ValueError(f"datastore.restore: {path} is not a datastore snapshot (format 1)")
        for start in range(0, len(snapshot.samples), _RESTORE_CHUNK_SAMPLES):
            self.put(snapshot.samples[start : start + _RESTORE_CHUNK_SAMPLES])
        logger.info("datastore: restored %d samples from %s", len(snapshot.samples), path)
        return list(dict.fromkeys(sample.group_id for sample in snapshot.samples))

    def shutdown(self) -> None:
        """Kill the controller and the units; the data is gone. Safe to call twice."""
        for actor in [self._controller, *self._units]:
            with contextlib.suppress(ValueError):  # Ray refuses handles of actors it already removed
                ray.kill(actor, no_restart=True)

    # ---- internals -----------------------------------------------------------------------------

    def _unit_of(self, group_id: int) -> int:
        # All samples of a group on one unit: a group is read together. Consecutive ids go round robin.
        return group_id % len(self._units)

    def _meta_of(self, sample: SampleWrite) -> SampleMeta:
        return SampleMeta(
            sample_id=sample.sample_id,
            group_id=sample.group_id,
            group_size=sample.group_size,
            unit=self._unit_of(sample.group_id),
            columns=tuple(sorted(sample.columns)),
            min_version=sample.min_version,
            max_version=sample.max_version,
            length=sample.length,
            seq=-1,  # assigned by the controller
        )

    def _fetch(self, samples: list[SampleMeta], columns: list[str] | None) -> list[dict[str, np.ndarray]]:
        positions = _positions_per_unit([s.unit for s in samples])
        refs = {
            unit: self._units[unit].get.remote([samples[i].sample_id for i in idx], columns)
            for unit, idx in positions.items()
        }
        rows: list[dict[str, np.ndarray]] = [{} for _ in samples]
        for unit, idx in positions.items():
            unit_rows = self._get(refs[unit], _RPC_TIMEOUT_S, f"get_data from storage unit {unit}")
            for i, row in zip(idx, unit_rows, strict=True):
                rows[i] = row
        return rows

    def _delete(self, samples_per_unit: dict[int, list[SampleWrite]]) -> None:
        refs = [
            self._units[unit].delete.remote([s.sample_id for s in group])
            for unit, group in samples_per_unit.items()
        ]
        self._get(refs, _RPC_TIMEOUT_S, "delete from storage units")

    @staticmethod
    def _get(refs: Any, timeout_s: float, what: str) -> Any:
        try:
            return ray.get(refs, timeout=timeout_s)
        except GetTimeoutError as err:
            raise DataStoreTimeout(
                f"datastore: {what} got no reply within {timeout_s:.0f}s; a datastore actor is stuck or dead"
            ) from err


def _positions_per_unit(units: list[int]) -> dict[int, list[int]]:
    """unit -> positions in the caller's list of the samples on that unit."""
    positions: dict[int, list[int]] = {}
    for i, unit in enumerate(units):
        positions.setdefault(unit, []).append(i)
    return positions
