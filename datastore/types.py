"""Records of the datastore: what writers send, what readers get back, and store statistics.

Producers and consumers:
- ``SampleWrite``: made by writers (rollout workers: ``Trajectory.sample_write``), sent by
  ``DataStoreClient.put``; its columns go to one storage unit, the rest to the controller.
- ``SampleMeta`` / ``BatchMeta``: made by the controller, returned by ``get_batch_meta`` to trainer
  ranks, which pass them to ``get_data`` (and their sample ids to ``release``).
- ``StoreStats``: made by the controller for metrics and tests.
- ``RegisterReply``: internal reply of the controller to a put; a timed-out wait becomes
  ``DataStoreTimeout`` in the client, and its dead units steer the writer's later puts.
- ``TimedOut``: internal reply of a controller wait that ran out of time; the client turns it into
  ``DataStoreTimeout``.
- ``LatencySummary``: client-measured call latencies, reduced by the controller, inside ``StoreStats``.
- ``StoreSnapshot``: the pickled content of a snapshot file.
- ``StoreHandles``: how to reach the store's actors; made by ``make_datastore``, travels inside
  every ``DataStoreClient``.

Shape legend: P = prompt length, R = response length (tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from datastore.wire import Endpoint


class DataStoreTimeout(TimeoutError):
    """A blocking datastore call waited its whole timeout; the message names what is missing."""


class DataStoreSamplesLost(RuntimeError):
    """Samples a reader asked for are gone because their storage unit died.

    The controller has removed their whole groups and queued the group ids in ``drain_lost()`` for
    regeneration; the caller drops (releases) the batch and asks for another.
    """

    def __init__(self, message: str, sample_ids: list[str], group_ids: list[int], units: list[int]) -> None:
        super().__init__(message)
        self.sample_ids = sample_ids
        self.group_ids = group_ids
        self.units = units

    def __reduce__(self):  # keeps the fields across Ray's pickling of errors
        return type(self), (str(self), self.sample_ids, self.group_ids, self.units)


@dataclass
class SampleWrite:
    """One sample as a writer hands it to the store."""

    sample_id: str
    """Unique while the sample is held (``Trajectory.sample_id``: 'group_id:index')."""
    group_id: int
    """The prompt group; readers get whole groups only."""
    group_size: int
    """Samples in the group; the group is complete once this many are written."""
    columns: dict[str, np.ndarray]
    """Column name -> array, e.g. prompt_ids int64 [P], response_ids int64 [R], reward float32 [1]."""
    min_version: int
    """Oldest policy version among the sample's tokens (the staleness key)."""
    max_version: int
    """Newest policy version among the sample's tokens."""
    length: int
    """Tokens in the sample (prompt + response), for token-budget batching."""


@dataclass(frozen=True)
class SampleMeta:
    """Where a sample lives and what is known about it; no arrays."""

    sample_id: str
    group_id: int
    group_size: int
    unit: int
    """Index of the storage unit holding the sample's data."""
    columns: tuple[str, ...]
    """Columns written so far (sorted), as of when this record was made."""
    min_version: int
    max_version: int
    length: int
    """Tokens in the sample (prompt + response)."""
    seq: int
    """Insertion counter over the store's life; lower = written earlier."""
    nbytes: int = 0
    """Bytes of the sample's arrays over all its columns (for size metrics)."""


@dataclass
class SampleMetaColumns:
    """Many samples' ``SampleMeta``, one list per field: how metadata crosses between clients and
    the controller (register, get_batch_meta, locate, snapshot). It pickles about ten times faster
    than a list of records, which is most of a metadata call's cost per sample."""

    sample_ids: list[str]
    group_ids: list[int]
    group_sizes: list[int]
    units: list[int]
    columns: list[tuple[str, ...]]
    """Equal tuples are one object, so pickle sends each distinct column set once."""
    min_versions: list[int]
    max_versions: list[int]
    lengths: list[int]
    seqs: list[int]
    nbytes: list[int]

    def __len__(self) -> int:
        return len(self.sample_ids)

    @classmethod
    def of(cls, metas: list[SampleMeta]) -> SampleMetaColumns:
        shared: dict[tuple[str, ...], tuple[str, ...]] = {}
        return cls(
            [m.sample_id for m in metas],
            [m.group_id for m in metas],
            [m.group_size for m in metas],
            [m.unit for m in metas],
            [shared.setdefault(m.columns, m.columns) for m in metas],
            [m.min_version for m in metas],
            [m.max_version for m in metas],
            [m.length for m in metas],
            [m.seq for m in metas],
            [m.nbytes for m in metas],
        )

    @classmethod
    def for_writes(cls, samples: list[SampleWrite], units: list[int], nbytes: list[int]) -> SampleMetaColumns:
        """What a writer registers: ``units[i]`` holds sample i, whose arrays take ``nbytes[i]``."""
        column_sets: dict[frozenset[str], tuple[str, ...]] = {}
        columns = []
        for sample in samples:
            key = frozenset(sample.columns)
            names = column_sets.get(key)
            if names is None:
                names = column_sets[key] = tuple(sorted(key))
            columns.append(names)
        return cls(
            [s.sample_id for s in samples],
            [s.group_id for s in samples],
            [s.group_size for s in samples],
            units,
            columns,
            [s.min_version for s in samples],
            [s.max_version for s in samples],
            [s.length for s in samples],
            [-1] * len(samples),  # seq: assigned by the controller
            nbytes,
        )

    def rows(self) -> list[SampleMeta]:
        return list(
            map(
                SampleMeta,
                self.sample_ids,
                self.group_ids,
                self.group_sizes,
                self.units,
                self.columns,
                self.min_versions,
                self.max_versions,
                self.lengths,
                self.seqs,
                self.nbytes,
            )
        )


@dataclass
class BatchMeta:
    """Complete groups handed to one consumer, oldest first; samples of a group are adjacent."""

    samples: list[SampleMeta]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def sample_ids(self) -> list[str]:
        return [s.sample_id for s in self.samples]

    @property
    def group_ids(self) -> list[int]:
        """Distinct group ids in batch order."""
        return list(dict.fromkeys(s.group_id for s in self.samples))

    @property
    def num_tokens(self) -> int:
        return sum(s.length for s in self.samples)


@dataclass
class LatencySummary:
    """Latency of one kind of client call over a recent window (milliseconds)."""

    count: int
    """Calls measured over the store's life."""
    p50_ms: float
    p99_ms: float
    """Both over the last ``LATENCY_WINDOW`` calls of this kind."""


@dataclass
class StoreStats:
    """Counters of the controller; ``as_metrics`` gives them under ``datastore/`` keys."""

    num_samples: int
    """Samples held now (written, not released or evicted)."""
    num_groups: int
    """Groups held now, complete or not."""
    num_partial_groups: int
    """Groups still waiting for some of their samples."""
    num_unconsumed: dict[str, int]
    """Per consumer task seen so far: held samples that task has not taken yet."""
    ready_per_column: dict[str, int]
    """Per column: held samples that have it."""
    capacity_samples: int
    evicted_samples_total: int
    evicted_groups_total: int
    """Groups deleted unread because a sample was older than a reader's min_version."""
    puts_total: int
    """Samples written over the store's life."""
    gets_total: int
    """Samples handed out by get_batch_meta over the store's life, summed over tasks."""
    released_total: int
    """Samples released by consumers over the store's life."""
    num_bytes: int = 0
    """Bytes of the held samples' arrays."""
    unit_num_samples: list[int] = field(default_factory=list)
    """Held samples per storage unit (0 for a dead one)."""
    dead_units: list[int] = field(default_factory=list)
    """Storage units found dead (their samples were lost)."""
    lost_samples_total: int = 0
    """Samples removed because their group had data on a dead unit: the dead unit's own, their
    group siblings on live units, and late samples of those groups (dropped on arrival)."""
    lost_groups_total: int = 0
    """Groups removed because one of their samples was lost (queued in ``drain_lost``)."""
    latency_ms: dict[str, LatencySummary] = field(default_factory=dict)
    """Per client call kind (put, get_batch_meta, get_data, release): latency as clients saw it;
    get_batch_meta includes the time it waited for data."""

    def as_metrics(self) -> dict[str, float]:
        metrics = {
            "datastore/num_samples": float(self.num_samples),
            "datastore/num_groups": float(self.num_groups),
            "datastore/num_partial_groups": float(self.num_partial_groups),
            "datastore/num_bytes": float(self.num_bytes),
            "datastore/fill_fraction": self.num_samples / self.capacity_samples,
            "datastore/evicted_samples_total": float(self.evicted_samples_total),
            "datastore/evicted_groups_total": float(self.evicted_groups_total),
            "datastore/lost_samples_total": float(self.lost_samples_total),
            "datastore/lost_groups_total": float(self.lost_groups_total),
            "datastore/dead_units": float(len(self.dead_units)),
            "datastore/puts_total": float(self.puts_total),
            "datastore/gets_total": float(self.gets_total),
        }
        for task, count in self.num_unconsumed.items():
            metrics[f"datastore/unconsumed/{task}"] = float(count)
        for column, count in self.ready_per_column.items():
            metrics[f"datastore/ready/{column}"] = float(count)
        for op, latency in self.latency_ms.items():
            metrics[f"datastore/latency/{op}_p50_ms"] = latency.p50_ms
            metrics[f"datastore/latency/{op}_p99_ms"] = latency.p99_ms
        return metrics


@dataclass
class RegisterReply:
    """Controller -> writer after a put's metadata."""

    timed_out: str | None
    """Set when the store stayed full for the whole put timeout: what was waited for."""
    refused_dead_units: list[int]
    """Non-empty when some samples were routed to units the controller knows are dead: nothing was
    registered, and the writer puts again avoiding them."""
    dead_units: list[int]
    """Every unit known dead, so writers stop routing to units they have not touched yet."""


@dataclass(frozen=True)
class TimedOut:
    """Controller reply when a wait ran out; ``message`` says what was missing."""

    message: str


@dataclass
class StoreSnapshot:
    """Content of a snapshot file: the samples in insertion order, with every column they had."""

    samples: list[SampleWrite]
    task: str
    """The consumer task whose unconsumed samples were saved."""
    format_version: int = 1


@dataclass
class StoreHandles:
    """The store's actors: Ray handles (lifecycle, health) and wire endpoints (every data call)."""

    controller: Any
    """Ray actor handle of the DataStoreController."""
    units: list[Any]
    """Ray actor handles of the StorageUnits, by unit index."""
    unit_nodes: list[str]
    """Ray node id of each unit."""
    controller_endpoint: Endpoint
    unit_endpoints: list[Endpoint]
    secret: bytes
    """Proves a wire connection comes from this store's clients (see ``datastore.wire``)."""
