"""Datastore controller: the metadata of every held sample; it never sees an array.

Dataflow (one controller actor, N storage-unit actors, any number of clients):

    writer  --put(data)-----------> storage unit g % N    (data plane: one call per unit touched)
    writer  --register(metas)-----> controller            (control plane: one call per put batch)
    reader  --get_batch_meta------> controller  -> BatchMeta (sample ids, units, versions, lengths)
    reader  --get(ids, columns)---> storage units         (one call per unit, in parallel)
    reader  --release(ids)--------> controller  -> unit.delete(ids)
    stage   --locate / add_columns / mark_columns-------> adds columns (e.g. a reward stage)

Who blocks whom: ``register`` waits while the store holds ``capacity_samples`` (back-pressure on
writers; a release or an eviction wakes it). ``get_batch_meta`` waits for ``num_groups`` complete
groups with the requested columns (a register or mark_columns wakes it). Both waits are asyncio
events in this async actor (no CPU while waiting), each with a deadline after which the caller gets
a ``TimedOut`` naming what was missing. State changes happen between awaits on the actor's one event
loop, so a claim is atomic: two readers of one task never get the same group. Shutdown:
``DataStoreClient.shutdown`` kills the actors; blocked callers fail with Ray's ActorDiedError.

State, kept incrementally so that each call costs O(its own batch), not O(store):
- per sample: unit, ready columns, versions, length, insertion seq;
- per group: samples, per-column ready counts, min version, the tasks that claimed it;
- ``_complete``: complete groups in completion order (oldest first);
- ``_pending[task]``: the complete groups that task has not taken, an ordered dict, so taking from
  the head and removing a released group are O(1);
- ``_stale_heap``: (group min version, group id) of complete groups, so evicting every group older
  than ``min_version`` costs O(evicted * log groups) and needs no scan.

Per-call cost: register O(batch); get_batch_meta O(groups returned + groups skipped at the head of
the task's queue because a requested column is missing + evicted); release O(samples released +
tasks); mark_columns O(samples). The O(store) calls are ``snapshot_metas`` (a checkpoint) and, once
per task, the first get of a new task (it copies ``_complete``).

Scaling to hundreds of writers: a writer makes one controller call per put batch (a group or a
few), carrying only ids and a few ints per sample, and the array bytes go straight to the units; a
Python async actor handles a few thousand such calls per second, so with groups of 8-16 samples the
controller stays under its limit up to roughly 10^4-10^5 samples/s. Past that (or with many tiny
puts) it stops scaling: the fix is bigger put batches per writer, then one controller per task or
per partition of group ids; the units already scale out by adding more of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from datastore.config import DataStoreConfig
from datastore.types import BatchMeta, SampleMeta, StoreStats, TimedOut

logger = logging.getLogger(__name__)

_PARTIAL, _COMPLETE, _RETIRED = "partial", "complete", "retired"


@dataclass
class _Sample:
    meta: SampleMeta
    """What readers get: as registered, with the controller's seq and the current columns."""
    columns: set[str]
    """All columns written so far (put + add_columns)."""


def _meta_with(meta: SampleMeta, columns: tuple[str, ...], seq: int) -> SampleMeta:
    # Not dataclasses.replace, which is several times slower; this runs for every sample put.
    m = meta
    return SampleMeta(
        m.sample_id, m.group_id, m.group_size, m.unit, columns, m.min_version, m.max_version, m.length, seq
    )


def _count(counts: dict[str, int], names: Iterable[str], delta: int) -> None:
    # Plain loop: Counter.update/subtract pay a Mapping isinstance check per call on the hot path.
    for name in names:
        counts[name] = counts.get(name, 0) + delta


@dataclass
class _Group:
    group_id: int
    group_size: int
    min_version: int
    sample_ids: list[str] = field(default_factory=list)
    column_counts: dict[str, int] = field(default_factory=dict)
    claimed_by: set[str] = field(default_factory=set)
    status: str = _PARTIAL
    """partial -> complete when group_size samples are in -> retired once any sample leaves."""

    def has_columns(self, columns: list[str]) -> bool:
        return all(self.column_counts.get(name, 0) == self.group_size for name in columns)


class DataStoreController:
    """Metadata, readiness, consumption and staleness of the held samples (an async Ray actor)."""

    def __init__(self, config: DataStoreConfig, units: list) -> None:
        self._capacity = config.capacity_samples
        self._units = units
        self._samples: dict[str, _Sample] = {}  # insertion order == seq order
        self._groups: dict[int, _Group] = {}
        self._complete: OrderedDict[int, None] = OrderedDict()
        self._pending: dict[str, OrderedDict[int, None]] = {}
        self._consumed_held: dict[str, int] = {}  # per task: held samples it has claimed
        self._stale_heap: list[tuple[int, int]] = []
        self._column_counts: dict[str, int] = {}
        self._num_partial = 0
        self._next_seq = 0
        self._evicted_unreported: list[int] = []
        self._deletes_in_flight: list = []
        self._totals = Counter()  # puts, gets, released, evicted_samples, evicted_groups
        # Broadcast events: set() wakes every current waiter, then a fresh event is armed.
        self._data_changed = asyncio.Event()
        self._room_freed = asyncio.Event()

    # ---- writers -------------------------------------------------------------------------------

    async def register(self, metas: list[SampleMeta], timeout_s: float) -> TimedOut | None:
        """Make samples whose data is already on the units visible; waits for room while full."""
        self._check_register(metas)
        loop = asyncio.get_running_loop()
        start = loop.time()
        while len(self._samples) + len(metas) > self._capacity:
            remaining = start + timeout_s - loop.time()
            if remaining <= 0:
                return TimedOut(
                    f"datastore: waited {timeout_s:.1f}s to put {len(metas)} samples; the store holds "
                    f"{len(self._samples)}/{self._capacity} samples. Consumers must "
                    f"call release() after using samples, or raise datastore.capacity_samples"
                )
            await self._wait(self._room_freed, remaining)
        self._check_register(metas)  # the store may have changed while we waited
        for meta in metas:
            self._add_sample(meta)
        self._totals["puts"] += len(metas)
        self._signal_data()
        return None

    async def locate(self, sample_ids: list[str]) -> list[int]:
        """The storage unit of each sample."""
        return [self._get_sample(sid).meta.unit for sid in sample_ids]

    async def mark_columns(self, sample_ids: list[str], names: list[list[str]]) -> None:
        """Record columns a later stage wrote to the units for existing samples."""
        for sid, sample_names in zip(sample_ids, names, strict=True):
            sample = self._get_sample(sid)
            group = self._groups[sample.meta.group_id]
            new_names = set(sample_names) - sample.columns
            if not new_names:
                continue
            sample.columns |= new_names
            sample.meta = _meta_with(sample.meta, tuple(sorted(sample.columns)), sample.meta.seq)
            _count(group.column_counts, new_names, +1)
            _count(self._column_counts, new_names, +1)
        self._signal_data()

    # ---- readers -------------------------------------------------------------------------------

    async def get_batch_meta(
        self, task: str, columns: list[str], num_groups: int, min_version: int | None, timeout_s: float
    ) -> BatchMeta | TimedOut | None:
        """Claim the ``num_groups`` oldest complete groups ready for ``task``; see the client's docstring."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        num_evicted = 0
        while True:
            if min_version is not None:
                num_evicted += self._evict_stale(min_version)
            batch = self._try_claim(task, columns, num_groups, min_version)
            if batch is not None:
                return batch
            remaining = start + timeout_s - loop.time()
            if remaining > 0:
                await self._wait(self._data_changed, remaining)
                continue
            if timeout_s == 0:
                return None
            pending = self._pending_for(task)
            num_ready = sum(self._groups[g].has_columns(columns) for g in pending)
            stale_note = f" (min_version={min_version})" if min_version is not None else ""
            return TimedOut(
                f"datastore: waited {timeout_s:.1f}s for {num_groups} complete groups with columns "
                f"{columns} for task {task!r}; {num_ready} ready, {len(pending) - num_ready} complete but "
                f"missing a column, {self._num_partial} groups partially written, {num_evicted} evicted "
                f"as stale{stale_note}"
            )

    async def release(self, sample_ids: list[str]) -> int:
        """Forget samples and delete their data; unknown ids are ignored. Returns how many were held."""
        removed = [self._remove_sample(sid) for sid in sample_ids if sid in self._samples]
        self._totals["released"] += len(removed)
        self._delete_data(removed)
        self._signal_room()
        # Awaiting the deletes (ours and earlier evictions') surfaces a dead unit here and guarantees
        # that a re-put of a released id reaches the unit after its delete.
        in_flight, self._deletes_in_flight = self._deletes_in_flight, []
        await asyncio.gather(*in_flight)
        return len(removed)

    async def drain_evictions(self) -> list[int]:
        evicted, self._evicted_unreported = self._evicted_unreported, []
        return evicted

    async def snapshot_metas(self, task: str) -> list[SampleMeta]:
        """Every held sample whose group ``task`` has not claimed, in insertion order (O(store))."""
        return [
            sample.meta
            for sample in self._samples.values()
            if task not in self._groups[sample.meta.group_id].claimed_by
        ]

    async def stats(self) -> StoreStats:
        return StoreStats(
            num_samples=len(self._samples),
            num_groups=len(self._groups),
            num_partial_groups=self._num_partial,
            num_unconsumed={task: len(self._samples) - n for task, n in self._consumed_held.items()},
            ready_per_column={name: n for name, n in self._column_counts.items() if n > 0},
            capacity_samples=self._capacity,
            evicted_samples_total=self._totals["evicted_samples"],
            evicted_groups_total=self._totals["evicted_groups"],
            puts_total=self._totals["puts"],
            gets_total=self._totals["gets"],
            released_total=self._totals["released"],
        )

    # ---- internals -----------------------------------------------------------------------------

    def _check_register(self, metas: list[SampleMeta]) -> None:
        incoming: Counter[int] = Counter()
        seen: set[str] = set()
        for meta in metas:
            if meta.group_size < 1:
                raise ValueError(f"datastore: sample {meta.sample_id!r}: group_size={meta.group_size} < 1")
            if meta.sample_id in self._samples or meta.sample_id in seen:
                raise ValueError(f"datastore: sample id {meta.sample_id!r} is already held; must be unique")
            seen.add(meta.sample_id)
            incoming[meta.group_id] += 1
            group = self._groups.get(meta.group_id)
            size = group.group_size if group is not None else meta.group_size
            if meta.group_size != size:
                raise ValueError(
                    f"datastore: sample {meta.sample_id!r} says group {meta.group_id} has "
                    f"group_size={meta.group_size}, another sample of it says {size}"
                )
            held = len(group.sample_ids) if group is not None else 0
            if (group is not None and group.status != _PARTIAL) or held + incoming[meta.group_id] > size:
                raise ValueError(
                    f"datastore: group {meta.group_id} already has its {size} samples (or was released); "
                    f"sample {meta.sample_id!r} does not fit. Use a fresh group_id per prompt group"
                )

    def _add_sample(self, meta: SampleMeta) -> None:
        group = self._groups.get(meta.group_id)
        if group is None:
            group = self._groups[meta.group_id] = _Group(meta.group_id, meta.group_size, meta.min_version)
            self._num_partial += 1
        registered = _meta_with(meta, tuple(sorted(meta.columns)), self._next_seq)
        self._samples[meta.sample_id] = _Sample(registered, set(meta.columns))
        self._next_seq += 1
        group.sample_ids.append(meta.sample_id)
        group.min_version = min(group.min_version, meta.min_version)
        _count(group.column_counts, meta.columns, +1)
        _count(self._column_counts, meta.columns, +1)
        if len(group.sample_ids) == group.group_size:
            group.status = _COMPLETE
            self._num_partial -= 1
            self._complete[group.group_id] = None
            for pending in self._pending.values():
                pending[group.group_id] = None
            heapq.heappush(self._stale_heap, (group.min_version, group.group_id))
            if len(self._stale_heap) > 2 * len(self._complete) + 1024:
                # Entries of released groups linger (lazy deletion); rebuild once they dominate.
                self._stale_heap = [(self._groups[g].min_version, g) for g in self._complete]
                heapq.heapify(self._stale_heap)

    def _pending_for(self, task: str) -> OrderedDict[int, None]:
        pending = self._pending.get(task)
        if pending is None:
            pending = self._pending[task] = OrderedDict.fromkeys(self._complete)
            self._consumed_held[task] = 0
            logger.info("datastore: new consumer task %r starts with %d complete groups", task, len(pending))
        return pending

    def _try_claim(
        self, task: str, columns: list[str], num_groups: int, min_version: int | None
    ) -> BatchMeta | None:
        pending = self._pending_for(task)
        chosen: list[_Group] = []
        stale_for_task: list[int] = []
        for group_id in pending:
            group = self._groups[group_id]
            if min_version is not None and group.min_version < min_version:
                stale_for_task.append(group_id)  # claimed by another task, so not evicted; skip it here
            elif group.has_columns(columns):
                chosen.append(group)
                if len(chosen) == num_groups:
                    break
        for group_id in stale_for_task:
            del pending[group_id]
        if len(chosen) < num_groups:
            return None
        samples = []
        for group in chosen:
            del pending[group.group_id]
            group.claimed_by.add(task)
            self._consumed_held[task] += len(group.sample_ids)
            samples.extend(self._samples[sid].meta for sid in group.sample_ids)
        self._totals["gets"] += len(samples)
        return BatchMeta(samples)

    def _evict_stale(self, min_version: int) -> int:
        """Delete unclaimed complete groups with a sample older than ``min_version``; returns how many."""
        num_evicted = 0
        while self._stale_heap and self._stale_heap[0][0] < min_version:
            _, group_id = heapq.heappop(self._stale_heap)
            group = self._groups.get(group_id)
            if group is None or group.status != _COMPLETE or group.min_version >= min_version:
                continue  # a lingering entry of a released group
            if group.claimed_by:
                continue  # in use by a task that claimed it before it went stale; release deletes it
            removed = [self._remove_sample(sid) for sid in list(group.sample_ids)]
            self._delete_data(removed)
            self._evicted_unreported.append(group_id)
            self._totals["evicted_groups"] += 1
            self._totals["evicted_samples"] += len(removed)
            num_evicted += 1
        if num_evicted:
            logger.info("datastore: evicted %d groups older than version %d", num_evicted, min_version)
            self._signal_room()
        return num_evicted

    def _remove_sample(self, sample_id: str) -> _Sample:
        sample = self._samples.pop(sample_id)
        group = self._groups[sample.meta.group_id]
        group.sample_ids.remove(sample_id)
        _count(group.column_counts, sample.columns, -1)
        _count(self._column_counts, sample.columns, -1)
        for task in group.claimed_by:
            self._consumed_held[task] -= 1
        if group.status == _PARTIAL:
            self._num_partial -= 1
        elif group.status == _COMPLETE:
            self._complete.pop(group.group_id, None)
            for pending in self._pending.values():
                pending.pop(group.group_id, None)
        group.status = _RETIRED
        if not group.sample_ids:
            del self._groups[group.group_id]
        return sample

    def _delete_data(self, samples: list[_Sample]) -> None:
        ids_per_unit: dict[int, list[str]] = {}
        for sample in samples:
            ids_per_unit.setdefault(sample.meta.unit, []).append(sample.meta.sample_id)
        for unit, ids in ids_per_unit.items():
            self._deletes_in_flight.append(self._units[unit].delete.remote(ids))

    def _get_sample(self, sample_id: str) -> _Sample:
        sample = self._samples.get(sample_id)
        if sample is None:
            raise KeyError(f"datastore: sample {sample_id!r} is not held (never put, released or evicted)")
        return sample

    async def _wait(self, event: asyncio.Event, timeout_s: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)

    def _signal_data(self) -> None:
        self._data_changed.set()
        self._data_changed = asyncio.Event()

    def _signal_room(self) -> None:
        self._room_freed.set()
        self._room_freed = asyncio.Event()
