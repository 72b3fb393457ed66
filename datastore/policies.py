"""Sampling policies: which ready groups a consumer gets, and how a batch is split over DP ranks.

Three plug points, all pure functions of metadata (no Ray, no arrays):
- ``SamplingPolicy`` (registry ``SAMPLING_POLICIES``, factory ``make_sampling_policy``): picks
  ``num_groups`` of the groups a task may take. The controller hands it only complete groups (all
  ``group_size`` samples written, as GRPO needs) whose requested columns are all ready, that the
  task has not taken, and that are not stale, oldest first. ``oldest_first`` is the default.
- ``is_stale``: the staleness predicate. A sample whose oldest token is older than the reader's
  ``min_version`` (= version - eta) is evicted and counted, never returned.
- ``split_for_ranks``: one batch -> one shard per data-parallel rank, whole groups per rank, equal
  group (hence sample) counts, token totals balanced by Karmarkar-Karp largest differencing.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Iterable, Sequence
from typing import Protocol

from datastore.types import SampleMeta

logger = logging.getLogger(__name__)


class GroupCandidate(Protocol):
    """What a policy may read about a group (the controller's group record)."""

    group_id: int
    group_size: int
    min_version: int
    """Oldest policy version among the group's tokens."""
    num_tokens: int
    """Tokens over the group's samples (prompt + response)."""


class SamplingPolicy(Protocol):
    """Chooses the groups one get_batch_meta call claims."""

    def select(self, candidates: Iterable[GroupCandidate], num_groups: int) -> list[GroupCandidate]:
        """Up to ``num_groups`` of ``candidates`` (given oldest first, possibly lazily) in the order
        the batch should hold them. Fewer than ``num_groups`` means "not enough": nothing is claimed.
        Cost: take what you need; a policy that looks at every candidate is O(ready groups) per call."""
        ...


class OldestFirst:
    """The ``num_groups`` oldest (first completed) groups: FIFO, bounded staleness, O(num_groups)."""

    def select(self, candidates: Iterable[GroupCandidate], num_groups: int) -> list[GroupCandidate]:
        return list(itertools.islice(candidates, num_groups))


class FreshestFirst:
    """The groups with the newest oldest-token version (ties: oldest first); keeps staleness low when
    the buffer runs ahead of training, at O(ready groups) per call. Older groups wait (and are
    evicted once past eta)."""

    def select(self, candidates: Iterable[GroupCandidate], num_groups: int) -> list[GroupCandidate]:
        ranked = heapq.nsmallest(
            num_groups, enumerate(candidates), key=lambda item: (-item[1].min_version, item[0])
        )
        return [group for _, group in ranked]


SAMPLING_POLICIES: dict[str, type[SamplingPolicy]] = {
    "oldest_first": OldestFirst,
    "freshest_first": FreshestFirst,
}


def make_sampling_policy(name: str) -> SamplingPolicy:
    policy = SAMPLING_POLICIES.get(name)
    if policy is None:
        raise ValueError(
            f"datastore sampling policy {name!r} is unknown; choose one of {sorted(SAMPLING_POLICIES)}"
        )
    return policy()


def is_stale(sample_min_version: int, min_version: int | None) -> bool:
    """True when a sample (or group) whose oldest token has ``sample_min_version`` may not be trained
    on by a reader that accepts versions >= ``min_version`` (None: no bound)."""
    return min_version is not None and sample_min_version < min_version


def split_for_ranks(batch: Sequence[SampleMeta], num_ranks: int) -> list[list[SampleMeta]]:
    """Split a batch over ``num_ranks`` DP ranks: whole groups, equal group counts, balanced tokens.

    Karmarkar-Karp with equal-size partitions (as verl's seqlen balancing): groups sorted by tokens
    are dealt ``num_ranks`` at a time into partial splits, and the two splits with the largest spread
    are merged repeatedly, heaviest part of one with the lightest of the other. O(G log G) for G
    groups. Within a rank, groups keep their batch order. ``split_imbalance`` reports the result.
    """
    if num_ranks < 1:
        raise ValueError(f"split_for_ranks: num_ranks={num_ranks}: must be >= 1")
    groups: dict[int, list[SampleMeta]] = {}
    for meta in batch:
        groups.setdefault(meta.group_id, []).append(meta)
    if len(groups) % num_ranks:
        raise ValueError(
            f"split_for_ranks: {len(groups)} groups cannot go to {num_ranks} ranks in equal numbers; "
            "make the batch's group count (train.batch_groups) a multiple of the rank count"
        )
    order = {gid: i for i, gid in enumerate(groups)}
    weights = {gid: sum(m.length for m in metas) for gid, metas in groups.items()}
    by_weight = sorted(groups, key=lambda gid: (weights[gid], order[gid]))
    # A partial split: per rank, (token sum, group ids). Heap key: -(spread), then a tiebreak counter.
    heap: list[tuple[int, int, list[tuple[int, list[int]]]]] = []
    for start in range(0, len(by_weight), num_ranks):
        parts = [(weights[gid], [gid]) for gid in by_weight[start : start + num_ranks]]
        heap.append((-(parts[-1][0] - parts[0][0]), start, parts))
    heapq.heapify(heap)
    tiebreak = len(by_weight)
    while len(heap) > 1:
        _, _, first = heapq.heappop(heap)
        _, _, second = heapq.heappop(heap)
        heaviest_first = sorted(first, key=lambda p: -p[0])
        lightest_first = sorted(second, key=lambda p: p[0])
        merged = sorted(
            ((a[0] + b[0], a[1] + b[1]) for a, b in zip(heaviest_first, lightest_first, strict=True)),
            key=lambda p: p[0],
        )
        heapq.heappush(heap, (-(merged[-1][0] - merged[0][0]), tiebreak, merged))
        tiebreak += 1
    parts = heap[0][2] if heap else [(0, []) for _ in range(num_ranks)]
    shards = [[m for gid in sorted(gids, key=order.__getitem__) for m in groups[gid]] for _, gids in parts]
    logger.debug(
        "split_for_ranks: %d groups over %d ranks, imbalance %.3f",
        len(groups),
        num_ranks,
        split_imbalance(shards),
    )
    return shards


def split_imbalance(shards: Sequence[Sequence[SampleMeta]]) -> float:
    """max rank tokens / mean rank tokens - 1 (0 = perfectly balanced)."""
    tokens = [sum(m.length for m in shard) for shard in shards]
    mean = sum(tokens) / len(tokens) if tokens else 0.0
    return max(tokens) / mean - 1.0 if mean > 0 else 0.0
