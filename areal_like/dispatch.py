"""The prompt dispatcher: the one place that decides which prompt is generated next, and when.

It owns the training prompt stream (shuffled epochs, position checkpointed) and the staleness gate.
Rollout workers call ``acquire`` for work and ``finish`` when a group's samples are in the
datastore; the controller calls ``set_version`` after every weight sync, ``on_trained`` after each
step, ``on_lost`` when a storage unit died with accepted groups, and ``on_evicted`` when the
datastore drops stale groups. It runs as one small Ray actor (``num_cpus=0``); every call is O(groups
asked for), so hundreds of workers polling it cost microseconds each.

Checkpoint rule: groups that are in flight at a checkpoint are not saved as samples; their prompts
are saved and requeued first on resume (unless their samples made it into the datastore snapshot),
so no prompt is lost or silently skipped.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass, field

from areal_like.core.types import PromptGroup, PromptRecord
from areal_like.staleness import GateState, StalenessGate

logger = logging.getLogger(__name__)


@dataclass
class DispatcherState:
    """Everything ``PromptDispatcher`` needs to resume; saved in checkpoints."""

    gate: GateState
    epoch: int
    position: int
    next_group_id: int
    requeue: list[int] = field(default_factory=list)
    """Prompt indices (into the training set) to hand out before the stream continues."""
    in_flight: dict[int, int] = field(default_factory=dict)
    """Groups generating at checkpoint time: group id -> prompt index."""


class PromptDispatcher:
    def __init__(
        self,
        prompts: list[PromptRecord],
        prompt_ids: list[list[int]],
        group_size: int,
        batch_groups: int,
        max_staleness: int,
        max_concurrent: int,
        seed: int,
    ) -> None:
        if not prompts:
            raise ValueError("PromptDispatcher: the training prompt set is empty")
        assert len(prompts) == len(prompt_ids)
        self._prompts = prompts
        self._prompt_ids = [tuple(ids) for ids in prompt_ids]
        self._group_size = group_size
        self.gate = StalenessGate(batch_groups, max_staleness, max_concurrent)
        self._seed = seed
        self._epoch = 0
        self._position = 0
        self._order = self._order_for_epoch(0)
        self._next_group_id = 0
        self._requeue: list[int] = []
        self._in_flight: dict[int, int] = {}  # group_id -> prompt index, while generating
        self._buffered: dict[int, int] = {}  # group_id -> prompt index, accepted and not yet trained

    # ---- called by rollout workers -------------------------------------------------------------
    def acquire(self, max_groups: int) -> list[PromptGroup]:
        """Admit up to ``max_groups`` new groups (fewer, or none, when the gate is closed)."""
        granted = self.gate.admit(max_groups)
        groups = []
        for _ in range(granted):
            index = self._next_prompt_index()
            group = PromptGroup(
                group_id=self._next_group_id,
                prompt=self._prompts[index],
                prompt_ids=self._prompt_ids[index],
                num_samples=self._group_size,
                admitted_version=self.gate.version,
            )
            self._in_flight[group.group_id] = index
            self._next_group_id += 1
            groups.append(group)
        return groups

    def finish(self, accepted_group_ids: list[int], rejected_group_ids: list[int]) -> None:
        """Groups left generation: accepted ones are in the datastore, rejected ones were dropped."""
        # A worker retired as dead that was only slow can report groups already handed back.
        accepted = [g for g in accepted_group_ids if g in self._in_flight]
        rejected = [g for g in rejected_group_ids if g in self._in_flight]
        for gid in accepted:
            self._buffered[gid] = self._in_flight.pop(gid)
        for gid in rejected:
            del self._in_flight[gid]
        late = len(accepted_group_ids) + len(rejected_group_ids) - len(accepted) - len(rejected)
        if late:
            logger.warning("finish: %d group(s) were already handed back; ignored", late)
        self.gate.on_finished(len(accepted), len(rejected))

    def abandon(self, group_ids: list[int]) -> int:
        """A worker failed with these groups in flight: free their slots and requeue their prompts.
        Ids no longer in flight (finished meanwhile, or repeated) are ignored; returns how many were
        requeued."""
        indices = [self._in_flight.pop(gid) for gid in group_ids if gid in self._in_flight]
        self._requeue.extend(indices)
        self.gate.on_abandoned(len(indices))
        return len(indices)

    # ---- called by the controller --------------------------------------------------------------
    def set_version(self, version: int) -> None:
        self.gate.set_version(version)

    def on_trained(self, group_ids: list[int]) -> None:
        """These groups were consumed by a train step."""
        for gid in group_ids:
            self._buffered.pop(gid, None)

    def on_evicted(self, group_ids: list[int]) -> None:
        """The datastore evicted these accepted groups as stale: free their slots (new prompts)."""
        if group_ids:
            logger.info(
                "staleness: %d groups evicted at batch time; their slots are refilled", len(group_ids)
            )
            for gid in group_ids:
                self._buffered.pop(gid, None)
            self.gate.on_evicted(len(group_ids))

    def on_lost(self, group_ids: list[int]) -> int:
        """A storage unit died with these groups: generate their prompts again (first in line) and
        free their slots. Groups restored from a checkpoint have no prompt on record here; their slots
        are freed and the stream moves on. Returns how many prompts were requeued."""
        requeued = 0
        for gid in group_ids:
            index = self._buffered.pop(gid, None)
            if index is not None:
                self._requeue.append(index)
                requeued += 1
        if group_ids:
            logger.warning("datastore lost %d groups; %d prompts requeued", len(group_ids), requeued)
            self.gate.on_lost(len(group_ids))
        return requeued

    def gate_state(self) -> GateState:
        return GateState(**asdict(self.gate.state))

    def state(self) -> DispatcherState:
        return DispatcherState(
            gate=self.gate_state(),
            epoch=self._epoch,
            position=self._position,
            next_group_id=self._next_group_id,
            requeue=list(self._requeue),
            in_flight=dict(self._in_flight),
        )

    def restore(self, state: DispatcherState, buffered_group_ids: list[int]) -> None:
        """Resume from ``state``. Groups that were in flight at the checkpoint are requeued unless
        their samples are among ``buffered_group_ids`` (restored into the datastore)."""
        self.gate.restore(state.gate, num_buffered_groups=len(buffered_group_ids))
        self._epoch = state.epoch
        self._position = state.position
        self._order = self._order_for_epoch(state.epoch)
        self._next_group_id = state.next_group_id
        buffered = set(buffered_group_ids)
        lost = [index for gid, index in sorted(state.in_flight.items()) if gid not in buffered]
        self._requeue = [*state.requeue, *lost]
        self._in_flight = {}
        logger.info(
            "dispatcher resumed at epoch %d position %d; %d prompts requeued",
            self._epoch,
            self._position,
            len(self._requeue),
        )

    # ---- internals ---------------------------------------------------------------------------------
    def _order_for_epoch(self, epoch: int) -> list[int]:
        # A pure function of (seed, epoch): a resumed run rebuilds the same order from the position.
        order = list(range(len(self._prompts)))
        random.Random(self._seed * 1_000_003 + epoch).shuffle(order)
        return order

    def _next_prompt_index(self) -> int:
        if self._requeue:
            return self._requeue.pop(0)
        if self._position >= len(self._order):
            self._epoch += 1
            self._position = 0
            self._order = self._order_for_epoch(self._epoch)
        index = self._order[self._position]
        self._position += 1
        return index
