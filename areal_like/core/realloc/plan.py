"""The reallocation plan: who sends which tensor regions to whom, in which bucket, at which offset.

Pure Python, built once per run (shapes do not change between steps) by the controller and handed
to every member process; each executes the buckets it takes part in, in the plan's global order.

Members are processes: trainer ranks are members ``0..N-1``; each engine rank is *hosted* by a
member that receives for it. Split placement (engines on their own GPUs or CPU processes): engine
rank e is hosted by member ``N + e``. Colocated placement: engine rank e is hosted by the trainer
rank on its GPU, which writes straight into the engine's CUDA IPC staging arena.

How the plan is made (``make_plan``):
1. Needs: each engine tensor's placements, grouped by identical (logical tensor, rectangle), so a
   region that several engine ranks need (DP replicas, replicated norms, replicated KV heads) is
   sent once to all of them.
2. Senders: each logical tensor's flat range is cut where source ranges start or end; a piece
   held by the host of a receiver is copied locally (no wire); the rest goes from the least
   loaded holder (largest tensors first), which spreads ZeRO-2 replicas over all ranks and is
   forced under ZeRO-3 (every element has one holder: each rank sends its own shard, no gather).
3. Streams: pieces with the same sender and the same set of receiving members are packed, in
   tensor order, into buckets of at most ``bucket_bytes`` (a piece that does not fit is cut by
   rows, a row by columns); offsets are aligned to 16 bytes.
4. Order: buckets of different streams alternate (round robin), so every sender has work at
   once; local copies come last, overlapping the broadcasts still in flight.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from areal_like.core.realloc.layout import (
    DTYPE_BYTES,
    DestinationLayout,
    Rect,
    SourceLayout,
    check_destination,
    flat_range_rects,
    view2d,
)

ALIGN_BYTES = 16
"""Every piece starts at a multiple of this in its bucket (dtype views and vector copies)."""
CHECKSUM_BYTES = 8
"""Trailer of a bucket sent with checksums: an int64 sum of the payload's int32 words."""


@dataclass(frozen=True)
class Dst:
    """Where a piece lands: engine rank ``receiver``'s tensor ``tensor`` at (row, col) of its 2-D view."""

    receiver: int
    tensor: str
    row: int
    col: int


@dataclass(frozen=True)
class Piece:
    """One rectangle of one logical tensor inside a bucket."""

    tensor: str
    """Logical (trainer) tensor name."""
    rect: Rect
    """Region of the logical tensor's 2-D view; the sender reads it from its flat source."""
    dtype: str
    """Wire dtype (the engine's)."""
    offset: int
    """Byte offset in the bucket, a multiple of ALIGN_BYTES."""
    dsts: tuple[Dst, ...]
    """Every engine-rank region it is copied to."""

    @property
    def nbytes(self) -> int:
        return self.rect.numel * DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class Bucket:
    """One broadcast (or, with no peers, one batch of local copies)."""

    index: int
    """Position in the plan's global order."""
    sender: int
    """Member that packs and sends it."""
    peers: tuple[int, ...]
    """Members that receive it over the wire (sorted); () = local copies on the sender."""
    receivers: tuple[int, ...]
    """Engine ranks it serves (sorted)."""
    payload_bytes: int
    """Bytes of the pieces with alignment gaps; the checksum trailer, if any, follows."""
    pieces: tuple[Piece, ...]

    @property
    def members(self) -> tuple[int, ...]:
        """The broadcast group: sender first, then peers (group rank 0 is the root)."""
        return (self.sender, *self.peers)

    @property
    def is_local(self) -> bool:
        return not self.peers


@dataclass(frozen=True)
class PlanSummary:
    """What a plan moves; printed by ``--dry-run`` and logged at start-up."""

    num_buckets: int
    num_local_buckets: int
    num_pieces: int
    wire_bytes: int
    """Bytes leaving senders (each broadcast counted once)."""
    local_bytes: int
    """Bytes copied inside a process (colocated pieces)."""
    delivered_bytes: int
    """Bytes landing in engine ranks (wire bytes times receivers, plus local)."""
    max_bucket_bytes: int
    num_groups: int
    """Distinct broadcast groups (communicators)."""
    sender_bytes: dict[int, int]
    """Wire bytes per sending member."""
    link_bytes: dict[str, int]
    """Wire bytes per link 'sender -> peer,peer'."""


@dataclass(frozen=True)
class Plan:
    """A complete reallocation plan (see the module docstring)."""

    source: SourceLayout
    dest: DestinationLayout
    hosts: tuple[int, ...]
    """Member hosting each engine rank."""
    bucket_bytes: int
    checksum: bool
    buckets: tuple[Bucket, ...]

    @property
    def num_members(self) -> int:
        return max(self.source.num_ranks, max(self.hosts) + 1)

    def member_name(self, member: int) -> str:
        if member < self.source.num_ranks:
            hosted = [e for e, h in enumerate(self.hosts) if h == member]
            extra = f" (hosting {', '.join(self.dest.rank_name(e) for e in hosted)})" if hosted else ""
            return f"trainer rank {member}{extra}"
        hosted = [e for e, h in enumerate(self.hosts) if h == member]
        return f"member {member} ({', '.join(self.dest.rank_name(e) for e in hosted)})"

    def bucket_nbytes(self, bucket: Bucket) -> int:
        """Bytes on the wire for ``bucket`` (payload, plus the checksum trailer when enabled)."""
        return bucket.payload_bytes + (CHECKSUM_BYTES if self.checksum and not bucket.is_local else 0)

    def groups(self) -> list[tuple[int, ...]]:
        """Distinct broadcast groups (member tuples, sender first) in first-use order."""
        seen: dict[tuple[int, ...], None] = {}
        for b in self.buckets:
            if not b.is_local:
                seen.setdefault(b.members, None)
        return list(seen)

    def buckets_of(self, member: int) -> list[Bucket]:
        """The buckets ``member`` takes part in, in global order."""
        return [b for b in self.buckets if b.sender == member or member in b.peers]

    def hosted_by(self, member: int) -> list[int]:
        return [e for e, h in enumerate(self.hosts) if h == member]

    def summary(self) -> PlanSummary:
        sender_bytes: dict[int, int] = defaultdict(int)
        link_bytes: dict[str, int] = defaultdict(int)
        wire = local = delivered = 0
        for b in self.buckets:
            size = sum(p.nbytes for p in b.pieces)
            delivered += sum(p.nbytes * len(p.dsts) for p in b.pieces)
            if b.is_local:
                local += size
                continue
            wire += size
            sender_bytes[b.sender] += size
            link_bytes[f"{b.sender} -> {','.join(map(str, b.peers))}"] += size
        return PlanSummary(
            num_buckets=len(self.buckets),
            num_local_buckets=sum(b.is_local for b in self.buckets),
            num_pieces=sum(len(b.pieces) for b in self.buckets),
            wire_bytes=wire,
            local_bytes=local,
            delivered_bytes=delivered,
            max_bucket_bytes=max((self.bucket_nbytes(b) for b in self.buckets), default=0),
            num_groups=len(self.groups()),
            sender_bytes=dict(sender_bytes),
            link_bytes=dict(link_bytes),
        )

    def format(self) -> str:
        """Human-readable summary: layouts, totals, bytes per sender and per link."""
        s = self.summary()
        lines = [
            f"realloc plan: {self.source.num_ranks} trainer rank(s) ({self.source.kind}) -> "
            f"{self.dest.num_ranks} engine rank(s) ({self.dest.naming} names, "
            f"{len(set(self.dest.engine_of))} engine(s)), {self.num_members} member process(es)",
            f"  tensors {len(self.source.specs)}, buckets {s.num_buckets} ({s.num_local_buckets} local), "
            f"pieces {s.num_pieces}, groups {s.num_groups}, bucket limit {_size(self.bucket_bytes)}, "
            f"largest {_size(s.max_bucket_bytes)}, checksum {'on' if self.checksum else 'off'}",
            f"  bytes: wire {_size(s.wire_bytes)}, local {_size(s.local_bytes)}, "
            f"delivered {_size(s.delivered_bytes)}",
            f"  {'sender':<44} {'wire':>12}  buckets",
        ]
        counts: dict[int, int] = defaultdict(int)
        link_counts: dict[str, int] = defaultdict(int)
        for b in self.buckets:
            if not b.is_local:
                counts[b.sender] += 1
                link_counts[f"{b.sender} -> {','.join(map(str, b.peers))}"] += 1
        for member in sorted(s.sender_bytes):
            lines.append(
                f"    {self.member_name(member):<42} {_size(s.sender_bytes[member]):>12}  {counts[member]:>7}"
            )
        lines.append(f"  {'link (sending member -> receiving members)':<44} {'wire':>12}  buckets")
        for link in sorted(s.link_bytes):
            lines.append(f"    {link:<42} {_size(s.link_bytes[link]):>12}  {link_counts[link]:>7}")
        return "\n".join(lines)


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def split_hosts(num_trainer_ranks: int, num_engine_ranks: int) -> tuple[int, ...]:
    """Split placement: engine rank e is its own member process ``N + e``."""
    return tuple(num_trainer_ranks + e for e in range(num_engine_ranks))


def make_plan(
    source: SourceLayout,
    dest: DestinationLayout,
    bucket_bytes: int,
    hosts: tuple[int, ...] | None = None,
    checksum: bool = False,
) -> Plan:
    """Plan the transfer of every engine tensor from ``source`` (see the module docstring).

    ``hosts[e]`` is the member receiving for engine rank e (default: split placement).
    """
    check_destination(source, dest)
    hosts = tuple(hosts) if hosts is not None else split_hosts(source.num_ranks, dest.num_ranks)
    if len(hosts) != dest.num_ranks:
        raise ValueError(f"hosts has {len(hosts)} entries for {dest.num_ranks} engine ranks; give one each")
    if any(h < 0 for h in hosts):
        raise ValueError(f"hosts={hosts}: member indices must be >= 0")
    min_bucket = ALIGN_BYTES + (CHECKSUM_BYTES if checksum else 0)
    if bucket_bytes < 4 * min_bucket:
        raise ValueError(f"bucket_bytes={bucket_bytes}: too small; use >= {4 * min_bucket} (256 MiB on GPU)")

    needs = _needs(dest)
    protos = _assign_senders(source, needs, hosts)
    streams: dict[tuple[int, tuple[int, ...]], list[_Proto]] = defaultdict(list)
    for proto in protos:
        streams[(proto.sender, proto.peers)].append(proto)
    capacity = bucket_bytes - (CHECKSUM_BYTES if checksum else 0)
    chunked = {key: _fill_buckets(items, capacity) for key, items in sorted(streams.items())}

    comm_keys = [k for k in chunked if k[1]]
    local_keys = [k for k in chunked if not k[1]]
    buckets: list[Bucket] = []
    for keys in (comm_keys, local_keys):
        depth = max((len(chunked[k]) for k in keys), default=0)
        for i in range(depth):
            for sender, peers in keys:
                if i < len(chunked[(sender, peers)]):
                    pieces, payload = chunked[(sender, peers)][i]
                    receivers = tuple(sorted({d.receiver for p in pieces for d in p.dsts}))
                    buckets.append(Bucket(len(buckets), sender, peers, receivers, payload, tuple(pieces)))
    return Plan(source, dest, hosts, bucket_bytes, checksum, tuple(buckets))


@dataclass
class _Proto:
    """A piece before it has a bucket offset."""

    order: tuple[int, int]
    """(tensor index in spec order, position) to keep buckets in tensor order."""
    tensor: str
    rect: Rect
    dtype: str
    dsts: tuple[Dst, ...]
    sender: int
    peers: tuple[int, ...]


def _needs(dest: DestinationLayout) -> dict[str, dict[Rect, list[Dst]]]:
    """logical tensor -> rectangle -> every engine region that needs exactly that rectangle."""
    needs: dict[str, dict[Rect, list[Dst]]] = defaultdict(dict)
    for rank, tensors in enumerate(dest.ranks):
        for t in tensors:
            if t.alias_of is not None:
                continue
            for p in t.placements:
                needs[p.src].setdefault(p.rect, []).append(Dst(rank, t.name, p.dst_row, p.dst_col))
    return needs


def _assign_senders(
    source: SourceLayout, needs: dict[str, dict[Rect, list[Dst]]], hosts: tuple[int, ...]
) -> list[_Proto]:
    holdings: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for shard in source.shards:
        holdings[shard.name].append((shard.start, shard.end, shard.rank))
    order = {s.name: i for i, s in enumerate(source.specs)}
    load = [0] * source.num_ranks
    protos: list[_Proto] = []
    # Largest first, so the greedy least-loaded choice balances bytes (LPT scheduling).
    for name in sorted(needs, key=lambda n: (-source.spec(n).nbytes, order[n])):
        spec = source.spec(name)
        _, cols = view2d(spec.shape)
        item = DTYPE_BYTES[spec.dtype]
        cuts = sorted({0, spec.numel, *(x for a, b, _ in holdings[name] for x in (a, b))})
        for start, end in zip(cuts, cuts[1:], strict=False):
            holders = sorted({r for a, b, r in holdings[name] if a <= start and end <= b})
            if not holders:
                if any(rect.intersect(r) for rect in needs[name] for r in flat_range_rects(start, end, cols)):
                    raise ValueError(
                        f"tensor {name!r}: elements [{start}, {end}) are needed but held by no trainer rank"
                    )
                continue
            for rect in flat_range_rects(start, end, cols):
                for need, dsts in needs[name].items():
                    part = rect.intersect(need)
                    if part is None:
                        continue
                    shifted = tuple(
                        Dst(
                            d.receiver, d.tensor, d.row + part.row0 - need.row0, d.col + part.col0 - need.col0
                        )
                        for d in dsts
                    )
                    pos = (order[name], len(protos))
                    local = [d for d in shifted if hosts[d.receiver] in holders]
                    for h in sorted({hosts[d.receiver] for d in local}):
                        mine = tuple(d for d in local if hosts[d.receiver] == h)
                        protos.append(_Proto(pos, name, part, spec.dtype, mine, h, ()))
                    remote = tuple(d for d in shifted if hosts[d.receiver] not in holders)
                    if remote:
                        sender = min(holders, key=lambda r: (load[r], r))
                        load[sender] += part.numel * item
                        peers = tuple(sorted({hosts[d.receiver] for d in remote}))
                        protos.append(_Proto(pos, name, part, spec.dtype, remote, sender, peers))
    protos.sort(key=lambda p: p.order)
    return protos


def _fill_buckets(protos: list[_Proto], capacity: int) -> list[tuple[list[Piece], int]]:
    """Pack pieces in order into buckets of at most ``capacity`` bytes. A piece that does not fit
    is cut into whole rows; a bucket with no room for one more row is closed; only a single row
    larger than a whole bucket is cut by columns."""
    buckets: list[tuple[list[Piece], int]] = []
    current: list[Piece] = []
    used = 0
    for proto in protos:
        item = DTYPE_BYTES[proto.dtype]
        pending = [proto.rect]
        while pending:
            rect = pending.pop(0)
            offset = -(-used // ALIGN_BYTES) * ALIGN_BYTES
            room = max(capacity - offset, 0) // item
            rows_fit = room // rect.cols
            if rect.numel <= room:
                head = rect
            elif rows_fit >= 1:
                head = Rect(rect.row0, rect.row0 + rows_fit, rect.col0, rect.col1)
                pending.insert(0, Rect(rect.row0 + rows_fit, rect.row1, rect.col0, rect.col1))
            elif current:
                buckets.append((current, used))
                current, used = [], 0
                pending.insert(0, rect)
                continue
            else:  # one row is larger than a whole bucket: cut its columns
                head = Rect(rect.row0, rect.row0 + 1, rect.col0, rect.col0 + room)
                rest = [Rect(rect.row0, rect.row0 + 1, rect.col0 + room, rect.col1)]
                if rect.rows > 1:
                    rest.append(Rect(rect.row0 + 1, rect.row1, rect.col0, rect.col1))
                pending[0:0] = rest
            row_shift, col_shift = head.row0 - proto.rect.row0, head.col0 - proto.rect.col0
            dsts = tuple(Dst(d.receiver, d.tensor, d.row + row_shift, d.col + col_shift) for d in proto.dsts)
            current.append(Piece(proto.tensor, head, proto.dtype, offset, dsts))
            used = offset + head.numel * item
    if current:
        buckets.append((current, used))
    return [(pieces, -(-used // ALIGN_BYTES) * ALIGN_BYTES) for pieces, used in buckets]
