"""The realloc communicator: a private rendezvous store and one process group per broadcast group.

Nothing here touches ``torch.distributed``'s default group (DeepSpeed's, on trainer ranks): the
store is a ``TCPStore`` on its own port hosted by member 0 (trainer rank 0), and the process groups
are ``ProcessGroupGloo``/``ProcessGroupNCCL`` objects built directly on prefixes of that store, each
only by its members. So weight sync never queues behind, or deadlocks with, training collectives.

The store also carries liveness and progress: each member writes ``alive/m{m}`` when it connects
and ``v{version}/m{m}`` = buckets completed during a transfer. When a wait times out, the executor
reads them to name the members that never arrived or are stuck behind (``progress``).
Rebuilding after a failure means a new ``ReallocGroup`` on a new port on every member.
"""

from __future__ import annotations

import datetime
import logging
import time

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


class ReallocError(RuntimeError):
    """A weight transfer failed; the engines keep their previous weights and version."""

    def __init__(self, message: str, unresponsive: list[str] | None = None) -> None:
        super().__init__(message)
        self.unresponsive = unresponsive or []
        """Names of the members that did not arrive or did not progress."""


class ReallocGroup:
    """This member's handle on the realloc communicator (see the module docstring)."""

    def __init__(
        self,
        member: int,
        names: list[str],
        master_addr: str,
        master_port: int,
        backend: str,
        timeout_s: float,
        connect_timeout_s: float,
    ) -> None:
        if not 0 <= member < len(names):
            raise ValueError(f"realloc member {member} outside 0..{len(names) - 1}")
        if backend == "nccl" and not hasattr(dist, "ProcessGroupNCCL"):
            raise ValueError("realloc.backend='nccl' but this torch has no NCCL (CPU build); use 'gloo'")
        self.member = member
        self.names = names
        self.backend = backend
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.connect_timeout = datetime.timedelta(seconds=connect_timeout_s)
        self._addr, self._port = master_addr, master_port
        self._store: dist.TCPStore | None = None
        self._pgs: dict[tuple[int, ...], dist.ProcessGroup] = {}

    # ---- connecting ------------------------------------------------------------------------------
    @property
    def store(self) -> dist.TCPStore:
        if self._store is None:
            try:
                self._store = dist.TCPStore(
                    self._addr,
                    self._port,
                    None,
                    self.member == 0,
                    self.connect_timeout,
                    wait_for_workers=False,
                )
                self._store.set_timeout(self.timeout)
            except Exception as e:
                raise ReallocError(
                    f"realloc: {self.names[self.member]} could not reach the realloc store at "
                    f"{self._addr}:{self._port} (hosted by {self.names[0]}) within "
                    f"{self.connect_timeout.total_seconds():.0f}s: {e}",
                    [self.names[0]],
                ) from e
        return self._store

    def connect(self, groups: list[tuple[int, ...]]) -> None:
        """Meet every member this one shares a group with, then build the groups it belongs to, in
        the given order (the same on every member, so group construction cannot deadlock)."""
        mine = [g for g in dict.fromkeys(groups) if self.member in g and g not in self._pgs]
        if not mine:
            return
        peers = sorted({m for g in mine for m in g})
        self.wait_for(peers, what="connect", timeout=self.connect_timeout)
        for members in mine:
            self._pgs[members] = self._build(members)
        logger.info("realloc %s: connected %d group(s)", self.names[self.member], len(mine))

    def wait_for(self, members: list[int], what: str, timeout: datetime.timedelta) -> None:
        """Mark this member alive and wait until ``members`` are; the error names the absent."""
        self.store.set(f"alive/m{self.member}", "1")
        keys = [f"alive/m{m}" for m in members]
        try:
            self.store.wait(keys, timeout)
        except Exception as e:
            missing = [self.names[m] for m, k in zip(members, keys, strict=True) if not self.store.check([k])]
            raise ReallocError(
                f"realloc {what}: {', '.join(missing) or 'some members'} did not arrive within "
                f"{timeout.total_seconds():.0f}s (waiting in {self.names[self.member]})",
                missing,
            ) from e

    def _build(self, members: tuple[int, ...]) -> dist.ProcessGroup:
        prefix = dist.PrefixStore(f"realloc/g/{'-'.join(map(str, members))}/", self.store)
        rank = members.index(self.member)
        if self.backend == "gloo":
            return dist.ProcessGroupGloo(prefix, rank, len(members), self.timeout)
        opts = dist.ProcessGroupNCCL.Options()
        # NCCL's own watchdog tears the process down on timeout; give it a margin so our host-side
        # wait raises first, names the stragglers and aborts only this communicator.
        opts._timeout = self.timeout + datetime.timedelta(seconds=60)
        pg = dist.ProcessGroupNCCL(prefix, rank, len(members), opts)
        # Create the communicator now (NCCL does it lazily at the first collective), so that set-up
        # cost and set-up failures land in connect(), not in the first transfer.
        probe = torch.zeros(1, device=torch.device("cuda", torch.cuda.current_device()))
        pg.broadcast(probe, 0).wait(self.connect_timeout)
        return pg

    def pg(self, members: tuple[int, ...]) -> dist.ProcessGroup:
        try:
            return self._pgs[members]
        except KeyError:
            raise AssertionError(f"realloc group {members} used before connect()") from None

    # ---- progress ------------------------------------------------------------------------------
    def mark(self, version: int, buckets_done: int) -> None:
        self.store.set(f"v{version}/m{self.member}", str(buckets_done))
        if buckets_done == 0 and version >= 2:
            self.store.delete_key(f"v{version - 2}/m{self.member}")

    def progress(self, version: int, members: list[int]) -> dict[int, int | None]:
        """Buckets each member has completed in ``version`` (None: not arrived for it)."""
        out: dict[int, int | None] = {}
        for m in members:
            key = f"v{version}/m{m}"
            out[m] = int(self.store.get(key)) if self.store.check([key]) else None
        return out

    # ---- shutdown ------------------------------------------------------------------------------
    def close(self, wait_s: float = 10.0) -> None:
        """Drop the process groups; member 0 keeps the store up until every member that connected
        has closed too (or ``wait_s``), so no one loses the store mid-call."""
        self.abort()
        self._pgs.clear()
        if self._store is None:
            return
        self._store.add("closed", 1)
        if self.member == 0:
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                arrived = sum(self._store.check([f"alive/m{m}"]) for m in range(len(self.names)))
                if int(self._store.add("closed", 0)) >= arrived:
                    break
                time.sleep(0.01)
        self._store = None

    def abort(self) -> None:
        """After a failed transfer: abort the NCCL communicators so no kernel waits forever (gloo
        ops end by their own timeout). The group is unusable afterwards: build a new one."""
        if self.backend == "nccl":
            for pg in self._pgs.values():
                abort = getattr(pg, "abort", None) or getattr(pg, "_abort", None)
                if abort is not None:
                    abort()
        self._pgs.clear()
