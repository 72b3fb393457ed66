"""Records of the datastore: what writers send, what readers get back, and store statistics.

Producers and consumers:
- ``SampleWrite``: made by rollout workers (``SampleWrite.from_trajectory``), sent by
  ``DataStoreClient.put``; its columns go to one storage unit, the rest to the controller.
- ``SampleMeta`` / ``BatchMeta``: made by the controller, returned by ``get_batch_meta`` to trainer
  ranks, which pass them to ``get_data`` (and their sample ids to ``release``).
- ``StoreStats``: made by the controller for metrics and tests.
- ``TimedOut``: internal reply of a controller wait that ran out of time; the client turns it into
  ``DataStoreTimeout``.
- ``StoreSnapshot``: the pickled content of a snapshot file.

Shape legend: P = prompt length, R = response length (tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from areal_like.types import Trajectory


class DataStoreTimeout(TimeoutError):
    """A blocking datastore call waited its whole timeout; the message names what is missing."""


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

    @classmethod
    def from_trajectory(cls, traj: Trajectory) -> SampleWrite:
        return cls(
            sample_id=traj.sample_id,
            group_id=traj.group_id,
            group_size=traj.group_size,
            columns=traj.columns(),
            min_version=traj.min_version,
            max_version=traj.max_version,
            length=len(traj.prompt_ids) + len(traj.response_ids),
        )


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

    def as_metrics(self) -> dict[str, float]:
        metrics = {
            "datastore/num_samples": float(self.num_samples),
            "datastore/num_partial_groups": float(self.num_partial_groups),
            "datastore/fill_fraction": self.num_samples / self.capacity_samples,
            "datastore/evicted_samples_total": float(self.evicted_samples_total),
            "datastore/evicted_groups_total": float(self.evicted_groups_total),
            "datastore/puts_total": float(self.puts_total),
            "datastore/gets_total": float(self.gets_total),
        }
        for task, count in self.num_unconsumed.items():
            metrics[f"datastore/unconsumed/{task}"] = float(count)
        return metrics


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
