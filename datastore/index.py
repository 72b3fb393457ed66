"""The controller's metadata index: every held sample and group, readiness, consumption, staleness.

Pure Python and synchronous (no Ray, no asyncio, no arrays), so the controller actor wraps it with
waits and unit calls, and unit tests drive it directly. State is kept incrementally so that each
call costs O(its own batch), not O(store):
- per sample: unit, ready columns, versions, length, bytes, insertion seq;
- per group: samples, per-column ready counts, min version, tokens, the tasks that claimed it;
- ``_complete``: complete groups in completion order (oldest first);
- ``_pending[task]``: the complete groups that task has not taken, an ordered dict, so taking from
  the head and removing a released group are O(1);
- ``_stale_heap``: (group min version, group id) of complete groups, so evicting every group older
  than ``min_version`` costs O(evicted * log groups) and needs no scan.

Per-call cost: add O(batch); claim O(groups returned + groups skipped at the head of the task's
queue because a requested column is missing or they are stale) with ``oldest_first`` (O(ready
groups) with a policy that ranks them all); release O(samples + tasks); mark_columns O(samples).
O(store): ``snapshot_metas`` (a checkpoint), ``remove_unit`` (a unit died), and once per task the
first claim of a new task (it copies ``_complete``).
"""

from __future__ import annotations

import heapq
import logging
from collections import Counter, OrderedDict
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field

from datastore.policies import SamplingPolicy, is_stale
from datastore.types import BatchMeta, SampleMeta, SampleMetaColumns

logger = logging.getLogger(__name__)

_PARTIAL, _COMPLETE, _RETIRED = "partial", "complete", "retired"


@dataclass
class HeldSample:
    meta: SampleMeta
    """What readers get: as registered, with the controller's seq and the current columns."""
    columns: set[str]
    """All columns written so far (put + add_columns)."""


def _meta_with(meta: SampleMeta, columns: tuple[str, ...], seq: int, nbytes: int) -> SampleMeta:
    # Not dataclasses.replace, which is several times slower; this runs for every sample put.
    m = meta
    return SampleMeta(
        m.sample_id,
        m.group_id,
        m.group_size,
        m.unit,
        columns,
        m.min_version,
        m.max_version,
        m.length,
        seq,
        nbytes,
    )


def _count(counts: dict[str, int], names: Iterable[str], delta: int) -> None:
    # Plain loop: Counter.update/subtract pay a Mapping isinstance check per call on the hot path.
    for name in names:
        counts[name] = counts.get(name, 0) + delta


@dataclass
class GroupRecord:
    """A prompt group as the index tracks it (policies read it as a ``GroupCandidate``)."""

    group_id: int
    group_size: int
    min_version: int
    num_tokens: int = 0
    sample_ids: list[str] = field(default_factory=list)
    column_counts: dict[str, int] = field(default_factory=dict)
    claimed_by: set[str] = field(default_factory=set)
    status: str = _PARTIAL
    """partial -> complete when group_size samples are in -> retired once any sample leaves."""

    def has_columns(self, columns: list[str]) -> bool:
        return all(self.column_counts.get(name, 0) == self.group_size for name in columns)


@dataclass
class UnitLoss:
    """What ``remove_unit`` took out of the index."""

    lost_sample_ids: list[str]
    """Samples whose data was on the dead unit."""
    group_ids: list[int]
    """Their groups, removed whole (queued for regeneration)."""
    removed: list[HeldSample]
    """Every sample removed (the lost ones and their group siblings on other units)."""


class MetadataIndex:
    """All metadata of the held samples; see the module docstring for costs."""

    def __init__(self, num_units: int) -> None:
        self.samples: dict[str, HeldSample] = {}  # insertion order == seq order
        self.groups: dict[int, GroupRecord] = {}
        self._complete: OrderedDict[int, None] = OrderedDict()
        self._pending: dict[str, OrderedDict[int, None]] = {}
        self.consumed_held: dict[str, int] = {}  # per task: held samples it has claimed
        self._stale_heap: list[tuple[int, int]] = []
        self.column_counts: dict[str, int] = {}
        self.unit_num_samples = [0] * num_units
        self.num_bytes = 0
        self.num_partial = 0
        self._next_seq = 0
        self._lost_groups: set[int] = set()  # tombstones: late samples of these groups are dropped
        self.evicted_unreported: list[int] = []
        self.lost_unreported: list[int] = []
        self.totals: Counter[str] = Counter()  # puts gets released evicted_* lost_*

    # ---- writers -------------------------------------------------------------------------------

    def check_new(self, new: SampleMetaColumns) -> None:
        """Raise ValueError if ``new`` cannot be added (duplicate ids, inconsistent groups)."""
        if len(set(new.sample_ids)) != len(new):
            repeated = [sid for sid, n in Counter(new.sample_ids).items() if n > 1]
            raise ValueError(f"datastore: sample ids {repeated[:5]} repeated in one put; must be unique")
        incoming: Counter[int] = Counter()
        for sid, group_id, group_size in zip(new.sample_ids, new.group_ids, new.group_sizes, strict=True):
            if group_size < 1:
                raise ValueError(f"datastore: sample {sid!r}: group_size={group_size} < 1")
            if sid in self.samples:
                raise ValueError(f"datastore: sample id {sid!r} is already held; must be unique")
            if group_id in self._lost_groups:
                continue  # dropped by add()
            incoming[group_id] += 1
            group = self.groups.get(group_id)
            size = group.group_size if group is not None else group_size
            if group_size != size:
                raise ValueError(
                    f"datastore: sample {sid!r} says group {group_id} has group_size={group_size}, "
                    f"another sample of it says {size}"
                )
            held = len(group.sample_ids) if group is not None else 0
            if (group is not None and group.status != _PARTIAL) or held + incoming[group_id] > size:
                raise ValueError(
                    f"datastore: group {group_id} already has its {size} samples (or was released); "
                    f"sample {sid!r} does not fit. Use a fresh group_id per prompt group"
                )

    def add(self, new: SampleMetaColumns) -> list[SampleMeta]:
        """Add checked samples (columns sorted, as clients send them), numbering them in order;
        returns those dropped because their group was lost earlier."""
        new.seqs = list(range(self._next_seq, self._next_seq + len(new)))
        self._next_seq += len(new)
        dropped = []
        for meta in new.rows():
            if meta.group_id in self._lost_groups:
                dropped.append(meta)
            else:
                self._add_sample(meta)
        self.totals["puts"] += len(new) - len(dropped)
        self.totals["lost_samples"] += len(dropped)
        return dropped

    def mark_columns(self, sample_ids: list[str], names: list[list[str]], nbytes: list[int]) -> None:
        """Record columns a later stage wrote to the units for existing samples (``nbytes``: what
        each wrote; a column written twice is counted twice in the size metric)."""
        for sid, sample_names, sample_bytes in zip(sample_ids, names, nbytes, strict=True):
            sample = self.get(sid)
            group = self.groups[sample.meta.group_id]
            new_names = set(sample_names) - sample.columns
            sample.columns |= new_names
            meta = sample.meta
            sample.meta = _meta_with(
                meta, tuple(sorted(sample.columns)), meta.seq, meta.nbytes + sample_bytes
            )
            self.num_bytes += sample_bytes
            _count(group.column_counts, new_names, +1)
            _count(self.column_counts, new_names, +1)

    # ---- readers -------------------------------------------------------------------------------

    def claim(
        self,
        task: str,
        columns: list[str],
        num_groups: int,
        min_version: int | None,
        policy: SamplingPolicy,
    ) -> BatchMeta | None:
        """Claim for ``task`` the groups ``policy`` picks among its ready ones; None if too few."""
        pending = self._pending_for(task)
        stale_for_task: list[int] = []

        def candidates() -> Generator[GroupRecord, None, None]:
            for group_id in pending:
                group = self.groups[group_id]
                if is_stale(group.min_version, min_version):
                    stale_for_task.append(group_id)  # claimed by another task, so not evicted
                elif group.has_columns(columns):
                    yield group

        ready = candidates()
        chosen = policy.select(ready, num_groups)
        ready.close()  # before pending changes under the suspended generator
        for group_id in stale_for_task:
            del pending[group_id]
        if len(chosen) < num_groups:
            return None
        samples: list[SampleMeta] = []
        for group in chosen:
            del pending[group.group_id]
            group.claimed_by.add(task)
            self.consumed_held[task] += len(group.sample_ids)
            samples.extend(self.samples[sid].meta for sid in group.sample_ids)
        self.totals["gets"] += len(samples)
        return BatchMeta(samples)

    def evict_stale(self, min_version: int) -> list[HeldSample]:
        """Remove unclaimed complete groups with a sample older than ``min_version``."""
        removed: list[HeldSample] = []
        num_groups = 0
        while self._stale_heap and self._stale_heap[0][0] < min_version:
            _, group_id = heapq.heappop(self._stale_heap)
            group = self.groups.get(group_id)
            if group is None or group.status != _COMPLETE or not is_stale(group.min_version, min_version):
                continue  # a lingering entry of a released group
            if group.claimed_by:
                continue  # in use by a task that claimed it before it went stale; release deletes it
            removed.extend(self._remove_sample(sid) for sid in list(group.sample_ids))
            self.evicted_unreported.append(group_id)
            num_groups += 1
        if num_groups:
            self.totals["evicted_groups"] += num_groups
            self.totals["evicted_samples"] += len(removed)
            logger.info("datastore: evicted %d groups older than version %d", num_groups, min_version)
        return removed

    def release(self, sample_ids: list[str]) -> list[HeldSample]:
        """Forget held samples among ``sample_ids`` (others are ignored); returns them."""
        removed = [self._remove_sample(sid) for sid in sample_ids if sid in self.samples]
        self.totals["released"] += len(removed)
        return removed

    def remove_unit(self, unit: int) -> UnitLoss:
        """A unit died: remove every group with a sample on it (O(store), once per dead unit)."""
        lost_ids = [sid for sid, sample in self.samples.items() if sample.meta.unit == unit]
        group_ids = list(dict.fromkeys(self.samples[sid].meta.group_id for sid in lost_ids))
        removed = [self._remove_sample(sid) for gid in group_ids for sid in list(self.groups[gid].sample_ids)]
        self._lost_groups.update(group_ids)
        self.lost_unreported.extend(group_ids)
        self.totals["lost_samples"] += len(removed)
        self.totals["lost_groups"] += len(group_ids)
        return UnitLoss(lost_ids, group_ids, removed)

    def lost_among(self, group_ids: Iterable[int]) -> list[int]:
        return [gid for gid in group_ids if gid in self._lost_groups]

    def describe_wait(self, task: str, columns: list[str]) -> str:
        """What a reader of ``task`` waiting for ``columns`` is missing (O(task's pending groups))."""
        pending = self._pending_for(task)
        num_ready = sum(self.groups[g].has_columns(columns) for g in pending)
        partial = [g for g in self.groups.values() if g.status == _PARTIAL]
        written = sum(len(g.sample_ids) for g in partial)
        expected = sum(g.group_size for g in partial)
        return (
            f"{num_ready} ready, {len(pending) - num_ready} complete but missing a column, "
            f"{len(partial)} groups partially written ({written} of their {expected} samples in)"
        )

    def snapshot_metas(self, task: str) -> list[SampleMeta]:
        """Every held sample whose group ``task`` has not claimed, in insertion order (O(store))."""
        return [
            sample.meta
            for sample in self.samples.values()
            if task not in self.groups[sample.meta.group_id].claimed_by
        ]

    def num_unconsumed(self) -> dict[str, int]:
        return {task: len(self.samples) - n for task, n in self.consumed_held.items()}

    def get(self, sample_id: str) -> HeldSample:
        sample = self.samples.get(sample_id)
        if sample is None:
            raise KeyError(
                f"datastore: sample {sample_id!r} is not held (never put, released, evicted or lost)"
            )
        return sample

    # ---- internals -----------------------------------------------------------------------------

    def _add_sample(self, meta: SampleMeta) -> None:
        group = self.groups.get(meta.group_id)
        if group is None:
            group = self.groups[meta.group_id] = GroupRecord(meta.group_id, meta.group_size, meta.min_version)
            self.num_partial += 1
        self.samples[meta.sample_id] = HeldSample(meta, set(meta.columns))
        self.unit_num_samples[meta.unit] += 1
        self.num_bytes += meta.nbytes
        group.sample_ids.append(meta.sample_id)
        if meta.min_version < group.min_version:
            group.min_version = meta.min_version
        group.num_tokens += meta.length
        group_counts, store_counts = group.column_counts, self.column_counts
        for name in meta.columns:  # inlined _count: this runs for every column of every sample put
            group_counts[name] = group_counts.get(name, 0) + 1
            store_counts[name] = store_counts.get(name, 0) + 1
        if len(group.sample_ids) == group.group_size:
            group.status = _COMPLETE
            self.num_partial -= 1
            self._complete[group.group_id] = None
            for pending in self._pending.values():
                pending[group.group_id] = None
            heapq.heappush(self._stale_heap, (group.min_version, group.group_id))
            if len(self._stale_heap) > 2 * len(self._complete) + 1024:
                # Entries of released groups linger (lazy deletion); rebuild once they dominate.
                self._stale_heap = [(self.groups[g].min_version, g) for g in self._complete]
                heapq.heapify(self._stale_heap)

    def _pending_for(self, task: str) -> OrderedDict[int, None]:
        pending = self._pending.get(task)
        if pending is None:
            pending = self._pending[task] = OrderedDict.fromkeys(self._complete)
            self.consumed_held[task] = 0
            logger.info("datastore: new consumer task %r starts with %d complete groups", task, len(pending))
        return pending

    def _remove_sample(self, sample_id: str) -> HeldSample:
        sample = self.samples.pop(sample_id)
        group = self.groups[sample.meta.group_id]
        group.sample_ids.remove(sample_id)
        self.unit_num_samples[sample.meta.unit] -= 1
        self.num_bytes -= sample.meta.nbytes
        group_counts, store_counts = group.column_counts, self.column_counts
        for name in sample.columns:
            group_counts[name] -= 1
            store_counts[name] -= 1
        for task in group.claimed_by:
            self.consumed_held[task] -= 1
        if group.status == _PARTIAL:
            self.num_partial -= 1
        elif group.status == _COMPLETE:
            self._complete.pop(group.group_id, None)
            for pending in self._pending.values():
                pending.pop(group.group_id, None)
        group.status = _RETIRED
        if not group.sample_ids:
            del self.groups[group.group_id]
        return sample
