"""Storage unit: one actor holding the column data of a shard of the samples, in CPU memory.

It knows nothing about groups, versions or consumers (the controller does); it maps
sample id -> column name -> array and answers puts, gets and deletes by id, one call per batch,
with the data column-packed (``datastore.packing``). Clients and the controller call it over the
wire (``datastore.wire``; Ray only starts it and checks it is alive). All calls run on the actor's
one asyncio loop and none awaits, so a put never interleaves with a get of the same sample.

Memory: a put's packed column arrives in one buffer of its own and each sample keeps a view of it,
so that buffer is freed when the last of its samples is deleted. Samples of one put are consumed
together in practice (oldest first), so little is held past its use.
"""

from __future__ import annotations

import logging

import numpy as np

from datastore.packing import PackedRows, pack_rows, unpack_rows
from datastore.placement import listen_host
from datastore.wire import DEFAULT_MAX_CONNECTIONS, Endpoint, WireServer

logger = logging.getLogger(__name__)


class StorageUnit:
    """Column data of the samples routed to this unit (wrapped as a Ray actor by ``make_datastore``)."""

    WIRE_METHODS = frozenset({"put", "add_columns", "get", "delete", "num_samples"})

    def __init__(
        self, unit_index: int, secret: bytes, max_connections: int = DEFAULT_MAX_CONNECTIONS
    ) -> None:
        self._unit_index = unit_index
        self._data: dict[str, dict[str, np.ndarray]] = {}
        self._wire = WireServer(self, set(self.WIRE_METHODS), secret, max_connections=max_connections)

    async def start_wire(self, loopback: bool = False) -> Endpoint:
        """Start serving on the loopback address (every actor on this node) or this node's address;
        returns where clients connect."""
        import ray

        return await self._wire.start(listen_host(loopback), ray.get_runtime_context().get_node_id())

    def node_id(self) -> str:
        """The Ray node this unit runs on (writers on that node write here)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def put(self, rows: PackedRows) -> None:
        """Store new samples; refuses ids already held (a put never overwrites a live sample)."""
        sample_ids = rows.sample_ids
        duplicates = [sid for sid in sample_ids if sid in self._data]
        if duplicates or len(set(sample_ids)) != len(sample_ids):
            raise ValueError(
                f"datastore unit {self._unit_index}: sample ids already held or repeated in the put: "
                f"{duplicates[:5] or sample_ids[:5]}; sample ids must be unique while held"
            )
        for sid, row in zip(sample_ids, unpack_rows(rows), strict=True):
            self._data[sid] = row

    def add_columns(self, rows: PackedRows) -> None:
        """Add (or overwrite) columns of samples already held."""
        missing = [sid for sid in rows.sample_ids if sid not in self._data]
        if missing:
            raise KeyError(
                f"datastore unit {self._unit_index}: add_columns on samples not held: {missing[:5]}"
            )
        for sid, row in zip(rows.sample_ids, unpack_rows(rows), strict=True):
            self._data[sid].update(row)

    def get(self, sample_ids: list[str], columns: list[str] | None) -> tuple[PackedRows, list[str]]:
        """The requested columns (all when ``columns`` is None) of the held samples among
        ``sample_ids``, in order, and the ids not held (released, evicted or lost)."""
        held, rows, missing = [], [], []
        for sid in sample_ids:
            row = self._data.get(sid)
            if row is None:
                missing.append(sid)
                continue
            if columns is not None:
                absent = [name for name in columns if name not in row]
                if absent:
                    raise KeyError(
                        f"datastore unit {self._unit_index}: sample {sid!r} has no column(s) {absent}; "
                        f"it has {sorted(row)}"
                    )
                row = {name: row[name] for name in columns}
            held.append(sid)
            rows.append(row)
        return pack_rows(held, rows), missing

    def delete(self, sample_ids: list[str]) -> int:
        """Drop samples; ids not held are ignored. Returns how many were dropped."""
        num_deleted = 0
        for sid in sample_ids:
            num_deleted += self._data.pop(sid, None) is not None
        return num_deleted

    def num_samples(self) -> int:
        return len(self._data)
