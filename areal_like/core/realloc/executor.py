"""The plan executor: one per member process, the same code over gloo (CPU) and NCCL (GPU).

Dataflow of one transfer (``run(version)``), all member processes at once:
- A trainer rank walks its buckets in the plan's global order. For a bucket it sends, it takes a
  free send buffer (``send_buffers``, 2 = double buffering), packs the pieces into it (reading its
  flat parameter shards, casting to the wire dtype) and posts an async broadcast on the bucket's
  group; while that broadcast runs it packs the next one. A local bucket (colocated) is copied
  straight into the hosted engine's staging.
- An engine process (or, colocated, the trainer rank hosting an engine) posts an async broadcast
  into a free receive buffer for each bucket it receives; when one completes it checks the
  checksum and unpacks the pieces into the staging tensors of the engine ranks it hosts.
- Who blocks whom: a process waits only for its oldest in-flight bucket, and only to free a
  buffer or at the end. Every process posts in the same global order, so the earliest unfinished
  bucket always has all its members posted: no deadlock for any buffer count. Different senders'
  buckets alternate in that order, so all senders stream at once.
- CPU (gloo): the host waits for a bucket (with the timeout) before reusing its buffer.
  GPU (NCCL): packing and unpacking run on a side stream and buffer reuse is ordered on the
  streams (``work.wait()`` makes the side stream wait; NCCL orders its stream after the side
  stream at each post), so the host never stalls the link; it confirms every bucket, with the
  timeout, at the end, and checksum verdicts are read there too.
- Timeouts: every host wait has ``timeout_s``; on failure the error names the members that never
  arrived for this version or are stuck behind, from the progress each member publishes to the
  store (throttled, and always just before it blocks).
- All-or-nothing: ``run`` returns only when every bucket arrived (and verified); the caller hands
  the staging to the engine (``update_weights(staging, version)``) only then. On failure the
  staging is garbage, the engine untouched, and the executor refuses further runs (rebuild it).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import time
from collections import deque
from dataclasses import dataclass

import torch

from areal_like.core.realloc.config import ReallocConfig
from areal_like.core.realloc.group import ReallocError, ReallocGroup
from areal_like.core.realloc.pack import (
    CopyList,
    FlatSource,
    local_copies,
    pack_copies,
    payload_checksum,
    unpack_copies,
    write_checksum,
)
from areal_like.core.realloc.plan import CHECKSUM_BYTES, Bucket, Plan

logger = logging.getLogger(__name__)

_MARK_EVERY_S = 0.2
"""Progress is published at most this often, and always before a blocking wait."""


@dataclass
class TransferStats:
    """What one member did in one transfer (returned to the controller for ``timing/`` metrics)."""

    member: int
    version: int
    seconds: float
    """Wall time of ``run`` on this member, connect included on the first call."""
    sent_bytes: int
    """Wire bytes this member broadcast as root."""
    received_bytes: int
    """Wire bytes this member received."""
    local_bytes: int
    """Bytes copied locally (colocated pieces)."""
    num_buckets: int


@dataclass
class _InFlight:
    bucket: Bucket
    work: torch.distributed.Work | None
    """The collective's handle (None when this member neither sends nor receives the bucket)."""
    buf: torch.Tensor
    sending: bool


class ReallocExecutor:
    """Runs member ``member``'s part of ``plan`` (see the module docstring)."""

    def __init__(
        self, plan: Plan, member: int, config: ReallocConfig, master_addr: str, master_port: int
    ) -> None:
        if not 0 <= member < plan.num_members:
            raise ValueError(f"realloc member {member}: the plan has members 0..{plan.num_members - 1}")
        self.plan = plan
        self.member = member
        self.config = config
        names = [plan.member_name(m) for m in range(plan.num_members)]
        self.group = ReallocGroup(
            member,
            names,
            master_addr,
            master_port,
            config.backend,
            config.timeout_s,
            config.connect_timeout_s,
        )
        if config.backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
            self.stream = torch.cuda.Stream(self.device)
        else:
            self.device, self.stream = torch.device("cpu"), None
        self.buckets = plan.buckets_of(member)
        self.hosted = plan.hosted_by(member)
        send_sizes = [plan.bucket_nbytes(b) for b in self.buckets if b.sender == member and not b.is_local]
        recv = [b for b in self.buckets if b.sender != member]
        self._send_pool = _Pool(config.send_buffers if send_sizes else 0, max(send_sizes, default=0))
        self._senders_heard = sorted({b.sender for b in recv if not b.is_local})
        num_senders_heard = len({b.sender for b in recv})
        self._recv_pool = _Pool(
            min(config.max_receive_buffers, 2 * num_senders_heard),
            max((plan.bucket_nbytes(b) for b in recv), default=0),
        )
        self._broken: str | None = None
        self._copy_cache: dict[tuple[str, int, int], CopyList] = {}
        self._copy_signature: tuple = ()

    @classmethod
    def rejoin(
        cls,
        previous: ReallocExecutor | None,
        plan: Plan,
        member: int,
        config: ReallocConfig,
        master_addr: str,
        master_port: int,
    ) -> ReallocExecutor:
        """A new executor on the group at ``master_port``, after leaving ``previous`` (the group being
        rebuilt, None the first time). Every member rebuilds at once, so member 0 waits only briefly
        for the others to leave the old store; a dead member never leaves it."""
        if previous is not None:
            previous.close(wait_s=2.0)
        return cls(plan, member, config, master_addr, master_port)

    def run(
        self,
        version: int,
        sources: dict[str, FlatSource] | None = None,
        staging: dict[int, dict[str, torch.Tensor]] | None = None,
    ) -> TransferStats:
        """Execute this member's buckets for ``version``.

        ``sources``: this trainer rank's flat sources (``flat_sources(module, rank, N)``), needed
        when it sends. ``staging``: engine rank -> tensors (``allocate_staging`` or, colocated, the
        IPC-opened arena) for every engine rank this member hosts. Raises ``ReallocError`` on a
        timeout or a lost peer; the staging is then incomplete and must not be loaded.
        """
        if self._broken is not None:
            raise ReallocError(
                f"realloc executor of {self._name(self.member)} failed earlier "
                f"({self._broken}); build a new one (new port) on every member"
            )
        sources, staging = sources or {}, staging or {}
        missing = [e for e in self.hosted if e not in staging]
        if missing:
            raise ValueError(
                f"realloc run: no staging for hosted engine rank(s) {missing}; pass allocate_staging(...)"
            )
        start = time.perf_counter()
        try:
            self.group.connect(self.plan.groups())
            stats = self._run(version, sources, staging)
        except ReallocError as e:
            self._fail(str(e))
            raise
        except Exception as e:
            self._fail(repr(e))
            raise ReallocError(f"realloc {self._name(self.member)} version {version}: {e}") from e
        stats.seconds = time.perf_counter() - start
        return stats

    def close(self, wait_s: float = 10.0) -> None:
        """Drop the cached views (colocated: the mapped engine arenas) and leave the group (member 0
        waits up to ``wait_s`` for the others to leave before its store goes)."""
        self._copy_cache.clear()
        self._copy_signature = ()
        self.group.close(wait_s)

    # ---- the transfer ----------------------------------------------------------------------------
    def _run(self, version: int, sources, staging) -> TransferStats:
        stats = TransferStats(self.member, version, 0.0, 0, 0, 0, len(self.buckets))
        self._version, self._done, self._marked, self._last_mark = version, 0, -1, 0.0
        self._flush_progress()
        hosted = {e: staging[e] for e in self.hosted}
        self._check_copy_cache(sources, hosted)
        ctx = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        if self.stream is not None:  # sources were written on the compute stream
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        holding: deque[_InFlight] = deque()  # posted, still owning a buffer (or a local bucket)
        unconfirmed: list[_InFlight] = []  # GPU: buffer released on the stream, not yet seen done
        checks: list[tuple[Bucket, torch.Tensor]] = []  # GPU: checksum verdicts, read at the end
        with ctx:
            for bucket in self.buckets:
                if bucket.is_local:
                    # Local copies wait for nothing remote; they come last in the plan's order.
                    self._copies("local", bucket, None, sources, hosted).run()
                    stats.local_bytes += bucket.payload_bytes
                    holding.append(_InFlight(bucket, None, None, True))
                    continue
                sending = bucket.sender == self.member
                pool = self._send_pool if sending else self._recv_pool
                while not pool.available():
                    self._release(holding.popleft(), hosted, unconfirmed, checks)
                buf = pool.take(self.device)
                nbytes = self.plan.bucket_nbytes(bucket)
                if sending:
                    self._copies("pack", bucket, buf, sources, hosted).run()
                    if self.plan.checksum:
                        write_checksum(buf, bucket.payload_bytes)
                    stats.sent_bytes += nbytes
                else:
                    stats.received_bytes += nbytes
                work = self.group.pg(bucket.members).broadcast(buf[:nbytes], 0)
                holding.append(_InFlight(bucket, work, buf, sending))
            while holding:
                self._release(holding.popleft(), hosted, unconfirmed, checks)
        for item in unconfirmed:
            self._host_wait(item)
        for bucket, ok in checks:
            if not bool(ok):
                raise self._checksum_error(bucket)
        if self.stream is not None:
            self.stream.synchronize()
        self._check_senders_arrived(version)
        self._flush_progress()
        return stats

    def _check_senders_arrived(self, version: int) -> None:
        """Every member this one received from must have started ``version`` (it marks that before
        its first send). A receive that completes although its sender never took part, as a gloo
        broadcast can when the sender closes its sockets, carries stale bytes: refuse them."""
        if not self._senders_heard:
            return
        progress = self.group.progress(version, self._senders_heard)
        absent = [m for m, done in progress.items() if done is None]
        if absent:
            notes = "; ".join(f"{self._name(m)}: not arrived for version {version}" for m in absent)
            raise ReallocError(
                f"realloc version {version}: {self._name(self.member)} completed its receives but "
                f"{notes} (its buckets hold stale bytes; nothing loaded)",
                [self._name(m) for m in absent],
            )

    def _release(self, item: _InFlight, hosted, unconfirmed: list, checks: list) -> None:
        """Free ``item``'s buffer once its collective is done: on CPU the host waits (with the
        timeout); on GPU only the side stream waits, and the host confirms at the end. NCCL's
        timed host wait polls in millisecond sleeps, which would idle the link between buckets."""
        if item.work is not None:
            if self.stream is not None:
                item.work.wait()  # the current (side) stream waits; the host does not
            else:
                self._host_wait(item)
            if not item.sending:
                if self.plan.checksum:
                    ok = payload_checksum(item.buf, item.bucket.payload_bytes) == _trailer(
                        item.buf, item.bucket
                    )
                    if self.stream is not None:
                        checks.append((item.bucket, ok))
                    elif not bool(ok):
                        raise self._checksum_error(item.bucket)
                self._copies("unpack", item.bucket, item.buf, {}, hosted).run()
            (self._send_pool if item.sending else self._recv_pool).give(item.buf)
        if self.stream is not None:
            unconfirmed.append(item)
        else:
            self._count_done()

    def _copies(self, kind: str, bucket: Bucket, buf: torch.Tensor | None, sources, hosted) -> CopyList:
        """The cached copy list of one bucket ('pack', 'unpack' or 'local') into/out of ``buf``."""
        key = (kind, bucket.index, buf.data_ptr() if buf is not None else 0)
        copies = self._copy_cache.get(key)
        if copies is None:
            if kind == "pack":
                copies = pack_copies(self.plan, bucket, sources, buf)
            elif kind == "unpack":
                copies = unpack_copies(bucket, buf, hosted)
            else:
                copies = local_copies(self.plan, bucket, sources, hosted)
            self._copy_cache[key] = copies
        return copies

    def _check_copy_cache(
        self, sources: dict[str, FlatSource], hosted: dict[int, dict[str, torch.Tensor]]
    ) -> None:
        """Cached views stay valid while every source and staging tensor keeps its storage."""
        signature = (
            tuple(
                (n, s.tensor.data_ptr(), s.start, s.tensor.numel(), s.tensor.dtype)
                for n, s in sources.items()
            ),
            tuple((e, n, t.data_ptr(), t.dtype) for e, d in hosted.items() for n, t in d.items()),
        )
        if signature != self._copy_signature:
            self._copy_cache.clear()
            self._copy_signature = signature

    def _host_wait(self, item: _InFlight) -> None:
        if item.work is not None and not item.work.is_completed():
            self._flush_progress()  # so that others' stall reports see where this member stands
            try:
                item.work.wait(datetime.timedelta(seconds=self.config.timeout_s))
            except Exception as e:
                raise ReallocError(*self._describe_stall(item.bucket, self._version, e)) from e
        if self.stream is not None:
            self._count_done()

    def _count_done(self) -> None:
        self._done += 1
        if time.monotonic() - self._last_mark > _MARK_EVERY_S:
            self._flush_progress()

    def _flush_progress(self) -> None:
        """Publish how many buckets this member completed (a store round trip, so throttled)."""
        if self._done != self._marked:
            self.group.mark(self._version, self._done)
            self._marked, self._last_mark = self._done, time.monotonic()

    def _checksum_error(self, bucket: Bucket) -> ReallocError:
        return ReallocError(
            f"realloc version {self._version}: bucket {bucket.index} from {self._name(bucket.sender)} "
            f"failed its checksum on {self._name(self.member)}"
        )

    # ---- errors ----------------------------------------------------------------------------------
    def _describe_stall(self, bucket: Bucket, version: int, error: Exception) -> tuple[str, list[str]]:
        """Message and names of the members that never arrived for ``version`` or are stuck at or
        before ``bucket`` (from the progress every member writes to the store)."""
        stragglers: list[str] = []
        notes = []
        try:
            progress = self.group.progress(version, list(range(self.plan.num_members)))
        except Exception as e:  # the store host itself is gone
            progress = {}
            notes.append(f"progress unavailable ({e}); the store host {self._name(0)} may be down")
        for m, count in sorted(progress.items()):
            if m == self.member:
                continue
            if count is None:
                stragglers.append(self._name(m))
                notes.append(f"{self._name(m)}: not arrived for version {version}")
                continue
            theirs = self.plan.buckets_of(m)
            if count < len(theirs) and theirs[count].index <= bucket.index:
                stragglers.append(self._name(m))
                notes.append(
                    f"{self._name(m)}: stuck at bucket {theirs[count].index} ({count}/{len(theirs)} done)"
                )
        peers = ", ".join(self._name(m) for m in bucket.members if m != self.member)
        message = (
            f"realloc version {version}: bucket {bucket.index} ({self._name(bucket.sender)} -> "
            f"{len(bucket.peers)} member(s)) did not complete on {self._name(self.member)} within "
            f"{self.config.timeout_s:.0f}s ({type(error).__name__}: {str(error)[:200]}). Group: {peers}. "
            + ("; ".join(notes) if notes else "every member has progressed past it; a peer may have died")
        )
        return message, stragglers

    def _fail(self, message: str) -> None:
        self._broken = message[:300]
        logger.error("realloc %s: transfer failed: %s", self._name(self.member), message)
        with contextlib.suppress(Exception):
            self.group.abort()

    def _name(self, member: int) -> str:
        return self.group.names[member]


def _trailer(buf: torch.Tensor, bucket: Bucket) -> torch.Tensor:
    return buf[bucket.payload_bytes : bucket.payload_bytes + CHECKSUM_BYTES].view(torch.int64)[0]


class _Pool:
    """Fixed set of bucket buffers, allocated on first use and kept across transfers."""

    def __init__(self, count: int, nbytes: int) -> None:
        self.count, self.nbytes = count, nbytes
        self._free: list[torch.Tensor] | None = None

    def available(self) -> bool:
        return self._free is None or bool(self._free)

    def take(self, device: torch.device) -> torch.Tensor:
        if self._free is None:
            self._free = [
                torch.empty(self.nbytes, dtype=torch.uint8, device=device) for _ in range(self.count)
            ]
        return self._free.pop()

    def give(self, buf: torch.Tensor) -> None:
        assert self._free is not None
        self._free.append(buf)
