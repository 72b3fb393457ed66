"""Datastore controller: the metadata of every held sample; it never sees an array.

Dataflow (one controller actor, N storage-unit actors spread over nodes, any number of clients;
every arrow is a call over ``datastore.wire``, TCP straight to the actor, except the health pings):

    writer  --put(packed rows)---------> its node's storage unit   (data plane, one call per unit)
    writer  --register(metas)----------> controller                (control plane, one call per put)
    reader  --get_batch_meta-----------> controller -> BatchMeta (sample ids, units, versions, lengths)
    reader  --get(ids, columns)--------> storage units            (one call per unit)
    reader  --release(ids)-------------> controller --delete(ids)--> units (a task; not awaited by the reader)
    stage   --locate / add_columns / mark_columns--------------> adds columns (e.g. a reward stage)
    health loop (in the controller) --Ray ping--> every unit, every health_check_interval_s

Who blocks whom: ``register`` waits while the store holds ``capacity_samples`` (back-pressure on
writers; a release, an eviction or a lost unit wakes it). ``get_batch_meta`` waits for ``num_groups``
ready groups (a register or mark_columns wakes it). Both waits are asyncio events in this async
actor (no CPU while waiting), each with a deadline after which the caller gets a reply naming what
was missing. State changes happen between awaits on the actor's one event loop, so a claim is
atomic: two readers of one task never get the same group. The metadata itself and its per-call
costs are in ``datastore.index``.

Unit failure: a unit that Ray reports dead (RayActorError on a ping: the health loop's, or the one
a client or the controller makes when a wire call to the unit fails) is marked dead. Every group
with a sample on it is removed (counted in ``lost_samples_total`` / ``lost_groups_total``, ids
queued for ``drain_lost``, late samples of those groups dropped), register refuses samples routed to
it (the writer re-routes), and readers of a batch that held such samples get
``DataStoreSamplesLost``. The run goes on with the other units. Shutdown:
``DataStoreClient.shutdown`` kills the actors; blocked callers get a WireError (connection closed).

Scaling to hundreds of writers: a writer makes two wire calls per put, one to its node-local unit
with the bytes and one here with ids and a few ints per sample (column-wise). A call costs this
actor ~0.1 ms of CPU plus O(batch) index work (~5 us per sample added, ~3 us removed), so with
puts of a few groups the controller spends ~15-20 us of CPU per sample put and got (measured:
``areal-like bench datastore --min-tokens 1 --max-tokens 16``, where it is the busiest process), i.e.
one core carries ~50k samples/s however many writers share it; hundreds of writers cost one socket
each (mind ``ulimit -n`` past a few thousand) and nothing per idle writer. Past ~50k samples/s, or
~5-10k calls/s of tiny puts, one Python event loop stops scaling and metadata latency grows with
its queue: then put bigger batches, and split the metadata over several controllers (one per
consumer task, or per partition of group ids); units already scale out by adding more of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

import numpy as np
from ray.exceptions import RayActorError

from datastore.config import DataStoreConfig
from datastore.index import MetadataIndex
from datastore.placement import listen_host
from datastore.policies import SAMPLING_POLICIES, make_sampling_policy
from datastore.types import (
    LatencySummary,
    RegisterReply,
    SampleMetaColumns,
    StoreStats,
    TimedOut,
)
from datastore.wire import AsyncWireClient, Endpoint, WireError, WireServer

logger = logging.getLogger(__name__)

LATENCY_WINDOW = 4096
"""Recent calls per kind over which latency percentiles are computed."""
# Deadline of the controller's own calls to a unit (deletes, liveness checks).
_UNIT_CALL_TIMEOUT_S = 60.0


class _LatencyWindow:
    def __init__(self) -> None:
        self.count = 0
        self.recent: deque[float] = deque(maxlen=LATENCY_WINDOW)

    def summary(self) -> LatencySummary:
        p50, p99 = np.percentile(np.fromiter(self.recent, float), [50, 99]) if self.recent else (0.0, 0.0)
        return LatencySummary(self.count, round(float(p50), 4), round(float(p99), 4))


class DataStoreController:
    """Metadata, readiness, consumption, staleness and unit health (an async Ray actor)."""

    WIRE_METHODS = frozenset(
        {
            "register",
            "locate",
            "mark_columns",
            "get_batch_meta",
            "release",
            "drain_evictions",
            "drain_lost",
            "lost_among",
            "report_dead_unit",
            "record_latencies",
            "snapshot_metas",
            "stats",
        }
    )

    def __init__(self, config: DataStoreConfig, secret: bytes) -> None:
        self._config = config
        self._units: list = []
        self._unit_nodes: list[str] = []
        self._unit_endpoints: list[Endpoint] = []
        self._secret = secret
        self._wire_server = WireServer(self, set(self.WIRE_METHODS), secret, config.max_connections)
        self._wire: AsyncWireClient | None = None  # made in start(), when the node is known
        self._index = MetadataIndex(0)
        self._policies = {name: make_sampling_policy(name) for name in SAMPLING_POLICIES}
        self._dead: dict[int, str] = {}  # unit -> why it was declared dead
        self._deletes_in_flight: set[asyncio.Task] = set()
        self._latency: dict[str, _LatencyWindow] = {}
        self._health_task: asyncio.Task | None = None
        # Broadcast events: set() wakes every current waiter, then a fresh event is armed.
        self._data_changed = asyncio.Event()
        self._room_freed = asyncio.Event()

    async def start(
        self, units: list, unit_nodes: list[str], unit_endpoints: list[Endpoint], loopback: bool = False
    ) -> Endpoint:
        """Take the (started) units, start serving on this node's address (or loopback); returns where
        clients connect. Called once, by ``make_datastore``, before any client exists."""
        import ray

        assert not self._units, "DataStoreController.start called twice"
        self._units, self._unit_nodes, self._unit_endpoints = units, unit_nodes, unit_endpoints
        self._index = MetadataIndex(len(units))
        node_id = ray.get_runtime_context().get_node_id()
        self._wire = AsyncWireClient(self._secret, node_id)
        return await self._wire_server.start(listen_host(loopback), node_id)

    # ---- writers -------------------------------------------------------------------------------

    async def register(self, new: SampleMetaColumns, timeout_s: float) -> RegisterReply:
        """Make samples whose data is on the units visible; waits for room while the store is full."""
        self._ensure_health_task()
        if refused := self._refused(new):
            return RegisterReply(None, refused, sorted(self._dead))
        self._index.check_new(new)
        loop = asyncio.get_running_loop()
        start = loop.time()
        while len(self._index.samples) + len(new) > self._config.capacity_samples:
            remaining = start + timeout_s - loop.time()
            if remaining <= 0:
                message = (
                    f"datastore: waited {timeout_s:.1f}s to put {len(new)} samples; the store holds "
                    f"{len(self._index.samples)}/{self._config.capacity_samples} samples. Consumers must "
                    f"call release() after using samples, or raise datastore.capacity_samples"
                )
                return RegisterReply(message, [], sorted(self._dead))
            await self._wait(self._room_freed, remaining)
        if refused := self._refused(new):  # a unit may have died while we waited
            return RegisterReply(None, refused, sorted(self._dead))
        self._index.check_new(new)  # the store may have changed while we waited
        dropped = self._index.add(new)
        self._delete_data([(m.unit, m.sample_id) for m in dropped])
        self._signal_data()
        return RegisterReply(None, [], sorted(self._dead))

    async def locate(self, sample_ids: list[str]) -> SampleMetaColumns:
        """Where each sample lives (its metadata)."""
        return SampleMetaColumns.of([self._index.get(sid).meta for sid in sample_ids])

    async def mark_columns(self, sample_ids: list[str], names: list[list[str]], nbytes: list[int]) -> None:
        """Record columns a later stage wrote to the units for existing samples."""
        self._index.mark_columns(sample_ids, names, nbytes)
        self._signal_data()

    # ---- readers -------------------------------------------------------------------------------

    async def get_batch_meta(
        self,
        task: str,
        columns: list[str],
        num_groups: int,
        min_version: int | None,
        timeout_s: float,
        policy: str | None = None,
    ) -> SampleMetaColumns | TimedOut | None:
        """Claim ``num_groups`` ready groups for ``task``; see the client's docstring."""
        self._ensure_health_task()
        chooser = self._policies[policy or self._config.sampling_policy]
        loop = asyncio.get_running_loop()
        start = loop.time()
        num_evicted = 0
        while True:
            if min_version is not None:
                evicted = self._index.evict_stale(min_version)
                if evicted:
                    num_evicted += len({s.meta.group_id for s in evicted})
                    self._delete_data([(s.meta.unit, s.meta.sample_id) for s in evicted])
                    self._signal_room()
            batch = self._index.claim(task, columns, num_groups, min_version, chooser)
            if batch is not None:
                return SampleMetaColumns.of(batch.samples)
            remaining = start + timeout_s - loop.time()
            if remaining > 0:
                await self._wait(self._data_changed, remaining)
                continue
            if timeout_s == 0:
                return None
            stale_note = f" (min_version={min_version})" if min_version is not None else ""
            return TimedOut(
                f"datastore: waited {timeout_s:.1f}s for {num_groups} complete groups with columns "
                f"{columns} for task {task!r}; {self._index.describe_wait(task, columns)}, "
                f"{num_evicted} evicted as stale{stale_note}, {self._index.totals['lost_groups']} groups "
                f"lost (dead units: {sorted(self._dead) or 'none'})"
            )

    async def release(self, sample_ids: list[str]) -> int:
        """Forget samples and delete their data; unknown ids are ignored. Returns how many were held.

        The unit deletes run as tasks of the controller, not awaited here, so a released id may not
        be put again until its delete has landed; ids are unique per group in practice."""
        self._ensure_health_task()
        removed = self._index.release(sample_ids)
        self._delete_data([(s.meta.unit, s.meta.sample_id) for s in removed])
        self._signal_room()
        return len(removed)

    async def drain_evictions(self) -> list[int]:
        evicted, self._index.evicted_unreported = self._index.evicted_unreported, []
        return evicted

    async def drain_lost(self) -> list[int]:
        lost, self._index.lost_unreported = self._index.lost_unreported, []
        return lost

    async def lost_among(self, group_ids: list[int]) -> list[int]:
        """The groups among ``group_ids`` removed because a unit died."""
        return self._index.lost_among(group_ids)

    async def report_dead_unit(self, unit: int, cause: str) -> list[int]:
        """A client saw Ray report ``unit`` dead; returns every unit known dead."""
        self._mark_dead(unit, cause)
        return sorted(self._dead)

    async def record_latencies(self, latencies_s: dict[str, list[float]]) -> None:
        """Client-measured call latencies (seconds), sent now and then by every client."""
        for op, values in latencies_s.items():
            window = self._latency.setdefault(op, _LatencyWindow())
            window.count += len(values)
            window.recent.extend(v * 1e3 for v in values)

    async def snapshot_metas(self, task: str) -> SampleMetaColumns:
        return SampleMetaColumns.of(self._index.snapshot_metas(task))

    async def stats(self) -> StoreStats:
        self._ensure_health_task()
        index = self._index
        return StoreStats(
            num_samples=len(index.samples),
            num_groups=len(index.groups),
            num_partial_groups=index.num_partial,
            num_unconsumed=index.num_unconsumed(),
            ready_per_column={name: n for name, n in index.column_counts.items() if n > 0},
            capacity_samples=self._config.capacity_samples,
            evicted_samples_total=index.totals["evicted_samples"],
            evicted_groups_total=index.totals["evicted_groups"],
            puts_total=index.totals["puts"],
            gets_total=index.totals["gets"],
            released_total=index.totals["released"],
            num_bytes=index.num_bytes,
            unit_num_samples=list(index.unit_num_samples),
            dead_units=sorted(self._dead),
            lost_samples_total=index.totals["lost_samples"],
            lost_groups_total=index.totals["lost_groups"],
            latency_ms={op: window.summary() for op, window in sorted(self._latency.items())},
        )

    # ---- unit health ---------------------------------------------------------------------------

    def _refused(self, new: SampleMetaColumns) -> list[int]:
        return sorted(set(new.units) & self._dead.keys()) if self._dead else []

    def _mark_dead(self, unit: int, cause: str) -> None:
        if unit in self._dead:
            return
        self._dead[unit] = cause
        loss = self._index.remove_unit(unit)
        self._delete_data([(s.meta.unit, s.meta.sample_id) for s in loss.removed])
        logger.warning(
            "datastore: storage unit %d on node %s is dead (%s): %d samples lost on it, %d groups "
            "removed (%d samples) and queued for regeneration; %d of %d units left",
            unit,
            self._unit_nodes[unit][:12],
            cause.splitlines()[0][:200] if cause else "?",
            len(loss.lost_sample_ids),
            len(loss.group_ids),
            len(loss.removed),
            len(self._units) - len(self._dead),
            len(self._units),
        )
        self._signal_room()
        self._signal_data()

    def _ensure_health_task(self) -> None:
        # Started on the first call: the actor's event loop is not running yet in __init__.
        if self._health_task is None:
            self._health_task = asyncio.get_running_loop().create_task(self._health_loop())

    async def _health_loop(self) -> None:
        interval = self._config.health_check_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.wait_for(self._check_units(), timeout=max(30.0, 10 * interval))
            except Exception:  # fault boundary: the loop must survive one bad round
                logger.exception("datastore: unit health check failed; retrying in %.1fs", interval)

    async def _check_units(self) -> None:
        """Ping every live unit through Ray; RayActorError = dead."""
        alive = [u for u in range(len(self._units)) if u not in self._dead]
        results = await asyncio.gather(
            *(self._units[u].num_samples.remote() for u in alive), return_exceptions=True
        )
        for unit, result in zip(alive, results, strict=True):
            if isinstance(result, RayActorError):
                self._mark_dead(unit, repr(result))
            elif isinstance(result, Exception):
                logger.warning("datastore: health ping of storage unit %d failed: %r", unit, result)

    async def _delete_on(self, unit: int, sample_ids: list[str]) -> None:
        try:
            assert self._wire is not None, "start() makes the wire client before any delete"
            await self._wire.call(self._unit_endpoints[unit], "delete", (sample_ids,), _UNIT_CALL_TIMEOUT_S)
        except Exception as err:  # fault boundary: a dead unit is marked, anything else is logged
            if isinstance(err, (WireError, TimeoutError)) and await self._is_dead(unit):
                return
            logger.warning("datastore: deleting %d samples on unit %d: %r", len(sample_ids), unit, err)

    async def _is_dead(self, unit: int) -> bool:
        """Ask Ray whether ``unit`` is dead (after a failed wire call); marks it dead if so."""
        try:
            await asyncio.wait_for(self._units[unit].num_samples.remote(), _UNIT_CALL_TIMEOUT_S)
        except RayActorError as err:
            self._mark_dead(unit, repr(err))
            return True
        except Exception:
            return False
        return False

    # ---- internals -----------------------------------------------------------------------------

    def _delete_data(self, unit_and_ids: list[tuple[int, str]]) -> None:
        ids_per_unit: dict[int, list[str]] = {}
        for unit, sample_id in unit_and_ids:
            if unit not in self._dead:
                ids_per_unit.setdefault(unit, []).append(sample_id)
        for unit, ids in ids_per_unit.items():
            task = asyncio.get_running_loop().create_task(self._delete_on(unit, ids))
            self._deletes_in_flight.add(task)  # keeps the task alive until done
            task.add_done_callback(self._deletes_in_flight.discard)

    async def _wait(self, event: asyncio.Event, timeout_s: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)

    def _signal_data(self) -> None:
        self._data_changed.set()
        self._data_changed = asyncio.Event()

    def _signal_room(self) -> None:
        self._room_freed.set()
        self._room_freed = asyncio.Event()
