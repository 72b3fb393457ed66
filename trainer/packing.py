"""Partitioning by token count: the batch over data-parallel ranks, a minibatch into micro-batches.

Pure functions over lists of lengths (no torch), deterministic, so every rank computes the same plan
from the same inputs without talking.

- ``balanced_partition``: k parts with near-equal token sums (Karmarkar-Karp's largest differencing
  method, or greedy longest-first onto the lightest part), optionally with equal item counts.
- ``split_for_ranks``: a batch's sample records over data-parallel ranks, whole groups per rank.
- ``plan_micro_batches``: the fewest micro-batches (at least ``min_count``) that respect a token
  budget; packed micro-batches cost the sum of their lengths, padded ones count x longest; both
  are runs of the length-sorted order, so little padding is left and rows stay narrow.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datastore.types import SampleMeta


def balanced_partition(
    weights: Sequence[int], k: int, algorithm: str = "kk", equal_counts: bool = False
) -> list[list[int]]:
    """Indices of ``weights`` split into ``k`` parts with near-equal sums; each part sorted.

    kk: Karmarkar-Karp's largest differencing generalised to k parts: start from partial
    partitions, repeatedly merge the two with the largest spread (heaviest part of one onto the
    lightest of the other). Usually within a few tokens of optimal; O(n log n).
    With ``equal_counts`` every part gets len(weights) / k items (as verl's sequence balancing):
    the partial partitions start as runs of k items of the weight-sorted order, one item per part,
    so every merge keeps the counts equal.
    ffd: longest first onto the currently lightest part (LPT), within 4/3 of optimal.
    """
    if k < 1:
        raise ValueError(f"balanced_partition: k={k}: must be >= 1")
    n = len(weights)
    if equal_counts and n % k:
        raise ValueError(f"balanced_partition: {n} items cannot go to {k} parts in equal numbers")
    order = sorted(range(n), key=lambda i: (-weights[i], i))
    if algorithm == "ffd":
        if equal_counts:
            raise ValueError("balanced_partition: equal_counts needs algorithm 'kk'")
        parts: list[list[int]] = [[] for _ in range(k)]
        loads = [(0, p) for p in range(k)]
        for i in order:
            load, p = heapq.heappop(loads)
            parts[p].append(i)
            heapq.heappush(loads, (load + weights[i], p))
        return [sorted(part) for part in parts]
    if algorithm != "kk":
        raise ValueError(f"unknown partition algorithm {algorithm!r}; use 'kk' or 'ffd'")
    if n == 0:
        return [[] for _ in range(k)]
    if equal_counts:
        seeds = [order[start : start + k] for start in range(0, n, k)]
    else:
        seeds = [[i] for i in order]
    # A heap entry is a partial k-way partition: (-spread, tiebreak, [(sum, indices)] by sum, descending).
    heap: list[tuple[int, int, list[tuple[int, list[int]]]]] = []
    for tie, seed in enumerate(seeds):
        partial = [(weights[i], [i]) for i in seed] + [(0, []) for _ in range(k - len(seed))]
        partial.sort(key=lambda part: -part[0])
        heap.append((-(partial[0][0] - partial[-1][0]), tie, partial))
    heapq.heapify(heap)
    tie = len(seeds)
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        merged = [(sa + sb, ia + ib) for (sa, ia), (sb, ib) in zip(a, reversed(b), strict=True)]
        merged.sort(key=lambda part: -part[0])
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), tie, merged))
        tie += 1
    return [sorted(indices) for _, indices in heap[0][2]]


def split_for_ranks(batch: Sequence[SampleMeta], num_ranks: int) -> list[list[SampleMeta]]:
    """A batch over ``num_ranks`` data-parallel ranks: whole groups (GRPO's baseline needs them on
    one rank), equal group (hence sample) counts, token totals balanced (``balanced_partition``
    with equal counts). Within a rank, groups keep their batch order."""
    groups: dict[int, list[SampleMeta]] = {}
    for meta in batch:
        groups.setdefault(meta.group_id, []).append(meta)
    if len(groups) % max(num_ranks, 1):
        raise ValueError(
            f"split_for_ranks: {len(groups)} groups cannot go to {num_ranks} ranks in equal numbers; "
            "make the batch's group count (train.batch_groups) a multiple of the rank count"
        )
    group_ids = list(groups)
    weights = [sum(m.length for m in groups[gid]) for gid in group_ids]
    parts = balanced_partition(weights, num_ranks, "kk", equal_counts=True)
    return [[m for j in part for m in groups[group_ids[j]]] for part in parts]


def keep_local(parts: list[list[int]], owners: list[int]) -> list[list[int]]:
    """Hand ``parts`` to ranks so each rank keeps as many of its own samples as possible (greedy
    on overlap; ``owners[i]`` is the rank holding sample i). Fewer samples cross the network."""
    k = len(parts)
    overlap = [[sum(1 for i in part if owners[i] == r) for r in range(k)] for part in parts]
    pairs = sorted(((overlap[p][r], -p, -r) for p in range(k) for r in range(k)), reverse=True)
    out: list[list[int] | None] = [None] * k
    taken: set[int] = set()
    for _, neg_p, neg_r in pairs:
        if out[-neg_r] is None and -neg_p not in taken:
            out[-neg_r] = parts[-neg_p]
            taken.add(-neg_p)
    return [part if part is not None else [] for part in out]


def imbalance(loads: Sequence[float]) -> float:
    """max / mean of per-rank loads (1.0 = perfectly balanced)."""
    mean = sum(loads) / max(len(loads), 1)
    return max(loads) / mean if mean > 0 else 1.0


def plan_micro_batches(
    lengths: list[int],
    max_tokens: int | None,
    micro_batch_size: int,
    packed: bool,
    min_count: int = 1,
) -> list[list[int]]:
    """Split sample indices into micro-batches; returns exactly max(needed, min_count) lists
    (some empty when there are fewer samples than that; the caller runs dummy passes for them).

    max_tokens None: ceil(n / micro_batch_size) micro-batches of consecutive length-sorted samples.
    Otherwise the token budget decides: packed cost = sum of lengths, padded cost = count x longest.
    Micro-batches are runs of the length-sorted order either way: padded ones then carry little
    padding, and packed rows (as wide as a micro-batch's longest sequence with dense attention
    masks) stay narrow for the short sequences.
    """
    n = len(lengths)
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    if n == 0:
        return [[] for _ in range(max(min_count, 1))]
    if max_tokens is None:
        count = max(math.ceil(n / micro_batch_size), min_count)
        return _contiguous_even(order, count)
    if lengths[order[0]] > max_tokens:
        raise ValueError(
            f"a sequence of {lengths[order[0]]} tokens exceeds train.max_tokens_per_micro_batch="
            f"{max_tokens}; raise the budget to at least the longest prompt + response"
        )
    sorted_lengths = [lengths[i] for i in order]
    prefix = [0]
    for length in sorted_lengths:
        prefix.append(prefix[-1] + length)

    def cost(a: int, b: int) -> int:
        if b <= a:
            return 0
        return prefix[b] - prefix[a] if packed else (b - a) * sorted_lengths[a]

    def runs_under(cap: int) -> list[tuple[int, int]]:
        """Greedy runs [a, b) of the descending lengths with cost <= cap."""
        out, a = [], 0
        for b in range(1, n + 1):
            if cost(a, b) > cap:
                out.append((a, b - 1))
                a = b - 1
        out.append((a, n))
        return out

    count = max(len(runs_under(max_tokens)), min_count)
    # Even out: the smallest cost cap that still gives <= count runs.
    lo, hi = sorted_lengths[0], max_tokens
    while lo < hi:
        mid = (lo + hi) // 2
        if len(runs_under(mid)) <= count:
            hi = mid
        else:
            lo = mid + 1
    runs = runs_under(lo)
    while len(runs) < count:  # split the costliest run (never raises any run's cost)
        j = max(range(len(runs)), key=lambda r: cost(*runs[r]))
        a, b = runs[j]
        if b - a < 2:
            runs.append((n, n))
            continue
        mid = (a + b) // 2
        runs[j : j + 1] = [(a, mid), (mid, b)]
    return [order[a:b] for a, b in runs]


def _contiguous_even(order: list[int], count: int) -> list[list[int]]:
    base, extra = divmod(len(order), count)
    out, start = [], 0
    for c in range(count):
        size = base + (1 if c < extra else 0)
        out.append(order[start : start + size])
        start += size
    return out


def agree_on_micro_batches(
    lengths_per_minibatch: list[list[int]],
    max_tokens: int | None,
    micro_batch_size: int,
    packed: bool,
    all_reduce_max: Callable[[list[float]], list[float]],
) -> list[list[list[int]]]:
    """Plan every minibatch's micro-batches so that all ranks run the same number per minibatch
    (ZeRO reduces and gathers inside each pass). ``all_reduce_max`` is the ranks' element-wise max;
    the loop ends when no rank needs more than the agreed counts (normally after one round)."""
    counts = [1.0] * len(lengths_per_minibatch)
    while True:
        counts = all_reduce_max(counts)
        plans = [
            plan_micro_batches(lengths, max_tokens, micro_batch_size, packed, min_count=int(k))
            for lengths, k in zip(lengths_per_minibatch, counts, strict=True)
        ]
        local = [float(len(p)) for p in plans]
        agreed = all_reduce_max(local)
        if agreed == counts:
            return plans
        counts = agreed
