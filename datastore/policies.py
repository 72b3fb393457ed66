"""Sampling policies: which ready groups a consumer gets.

Two plug points, all pure functions of metadata (no Ray, no arrays):
- ``SamplingPolicy`` (registry ``SAMPLING_POLICIES``, factory ``make_sampling_policy``): picks
  ``num_groups`` of the groups a task may take. The controller hands it only complete groups (all
  ``group_size`` samples written, as GRPO needs) whose requested columns are all ready, that the
  task has not taken, and that are not stale, oldest first. ``oldest_first`` is the default.
- ``is_stale``: the staleness predicate. A sample whose oldest token is older than the reader's
  ``min_version`` (= version - eta) is evicted and counted, never returned.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Iterable
from typing import Protocol, TypeVar

logger = logging.getLogger(__name__)


class GroupCandidate(Protocol):
    """What a policy may read about a group (the controller's group record)."""

    group_id: int
    group_size: int
    min_version: int
    """Oldest policy version among the group's tokens."""
    num_tokens: int
    """Tokens over the group's samples (prompt + response)."""


G = TypeVar("G", bound=GroupCandidate)
"""A group record type a policy reads (the controller's): policies hand back what they were given."""


class SamplingPolicy(Protocol):
    """Chooses the groups one get_batch_meta call claims."""

    def select(self, candidates: Iterable[G], num_groups: int) -> list[G]:
        """Up to ``num_groups`` of ``candidates`` (given oldest first, possibly lazily) in the order
        the batch should hold them. Fewer than ``num_groups`` means "not enough": nothing is claimed.
        Cost: take what you need; a policy that looks at every candidate is O(ready groups) per call."""
        ...


class OldestFirst:
    """The ``num_groups`` oldest (first completed) groups: FIFO, bounded staleness, O(num_groups)."""

    def select(self, candidates: Iterable[G], num_groups: int) -> list[G]:
        return list(itertools.islice(candidates, num_groups))


class FreshestFirst:
    """The groups with the newest oldest-token version (ties: oldest first); keeps staleness low when
    the buffer runs ahead of training, at O(ready groups) per call. Older groups wait (and are
    evicted once past eta)."""

    def select(self, candidates: Iterable[G], num_groups: int) -> list[G]:
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
