"""Storage unit: one actor holding the column data of a shard of the samples, in CPU memory.

It knows nothing about groups, versions or consumers (the controller does); it maps
sample id -> column name -> array and answers puts, gets and deletes by id, one call per batch.
Calls run one at a time in the actor, so a put never interleaves with a get of the same sample.
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)


def _own(array: np.ndarray) -> np.ndarray:
    # Large arguments arrive as read-only views into Ray's shared object store; keeping such a view
    # pins the whole put batch there until every sample of it is gone. Copy them into our own memory.
    return array if array.flags.writeable else array.copy()


class StorageUnit:
    """Column data of the samples routed to this unit (wrapped as a Ray actor by ``make_datastore``)."""

    def __init__(self, unit_index: int) -> None:
        self._unit_index = unit_index
        self._data: dict[str, dict[str, np.ndarray]] = {}

    def put(self, sample_ids: list[str], columns: list[dict[str, np.ndarray]]) -> None:
        """Store new samples; refuses ids already held (a put never overwrites a live sample)."""
        duplicates = [sid for sid in sample_ids if sid in self._data]
        if duplicates or len(set(sample_ids)) != len(sample_ids):
            raise ValueError(
                f"datastore unit {self._unit_index}: sample ids already held or repeated in the put: "
                f"{duplicates[:5] or sample_ids[:5]}; sample ids must be unique while held"
            )
        for sid, cols in zip(sample_ids, columns, strict=True):
            self._data[sid] = {name: _own(arr) for name, arr in cols.items()}

    def add_columns(self, sample_ids: list[str], columns: list[dict[str, np.ndarray]]) -> None:
        """Add (or overwrite) columns of samples already held."""
        missing = [sid for sid in sample_ids if sid not in self._data]
        if missing:
            raise KeyError(
                f"datastore unit {self._unit_index}: add_columns on samples not held: {missing[:5]}"
            )
        for sid, cols in zip(sample_ids, columns, strict=True):
            self._data[sid].update({name: _own(arr) for name, arr in cols.items()})

    def get(self, sample_ids: list[str], columns: list[str] | None) -> list[dict[str, np.ndarray]]:
        """The requested columns of each sample (all of them when ``columns`` is None), in order."""
        out = []
        for sid in sample_ids:
            row = self._data.get(sid)
            if row is None:
                raise KeyError(f"datastore unit {self._unit_index}: sample {sid!r} is not held (released?)")
            if columns is None:
                out.append(dict(row))
                continue
            absent = [name for name in columns if name not in row]
            if absent:
                raise KeyError(
                    f"datastore unit {self._unit_index}: sample {sid!r} has no column(s) {absent}; "
                    f"it has {sorted(row)}"
                )
            out.append({name: row[name] for name in columns})
        return out

    def delete(self, sample_ids: list[str]) -> int:
        """Drop samples; ids not held are ignored. Returns how many were dropped."""
        num_deleted = 0
        for sid in sample_ids:
            num_deleted += self._data.pop(sid, None) is not None
        return num_deleted

    def num_samples(self) -> int:
        return len(self._data)
