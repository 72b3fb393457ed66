"""The staleness gate: AReaL's admission rule plus the hard batch-time bound on version lag.

Admission (AReaL Eq. 3, as in ``StalenessManager.get_capacity``): with policy version v, eta the
bound and B prompt groups per train step, a new group may start only while

    accepted + running < (v + eta + 1) * B    and    running < max_concurrent

where ``accepted`` counts finished groups that were (or will be) trained on. Groups rejected by a
filter or evicted as stale at batch time are taken back out of ``accepted`` so their slots are
refilled; otherwise evictions would shrink the capacity and the run would stall.

Batch time: a sample whose oldest token has version < v - eta is never trained on
(``datastore.policies.is_stale`` with ``min_allowed_version``); the datastore evicts it and the
gate hears of it through ``on_evicted``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class GateState:
    """The gate's counters, saved in checkpoints."""

    version: int = 0
    accepted: int = 0
    running: int = 0
    admitted_total: int = 0
    rejected_total: int = 0
    evicted_total: int = 0
    lost_total: int = 0


class StalenessGate:
    def __init__(self, batch_groups: int, max_staleness: int, max_concurrent: int) -> None:
        if batch_groups < 1 or max_staleness < 0 or max_concurrent < 1:
            raise ValueError(
                f"StalenessGate(batch_groups={batch_groups}, max_staleness={max_staleness}, "
                f"max_concurrent={max_concurrent}): need batch_groups >= 1, max_staleness >= 0, "
                "max_concurrent >= 1"
            )
        self.batch_groups = batch_groups
        self.max_staleness = max_staleness
        self.max_concurrent = max_concurrent
        self.state = GateState()

    def capacity(self) -> int:
        """How many more groups may be admitted now (never negative)."""
        s = self.state
        by_concurrency = self.max_concurrent - s.running
        by_staleness = (s.version + self.max_staleness + 1) * self.batch_groups - (s.accepted + s.running)
        return max(0, min(by_concurrency, by_staleness))

    def admit(self, wanted: int) -> int:
        """Admit up to ``wanted`` groups; returns how many were admitted."""
        granted = min(wanted, self.capacity())
        self.state.running += granted
        self.state.admitted_total += granted
        return granted

    def on_finished(self, accepted: int, rejected: int = 0) -> None:
        """Groups left generation: ``accepted`` went to the datastore, ``rejected`` were dropped."""
        assert accepted + rejected <= self.state.running, (accepted, rejected, self.state)
        self.state.running -= accepted + rejected
        self.state.accepted += accepted
        self.state.rejected_total += rejected

    def on_abandoned(self, num_groups: int) -> None:
        """Groups left generation unfinished (their worker failed, retired or stopped; the
        dispatcher requeues their prompts): free their slots."""
        assert num_groups <= self.state.running, (num_groups, self.state)
        self.state.running -= num_groups

    def on_evicted(self, num_groups: int) -> None:
        """Accepted groups were evicted as stale at batch time: free their slots."""
        self.state.accepted -= num_groups
        self.state.evicted_total += num_groups

    def on_lost(self, num_groups: int) -> None:
        """Accepted groups were lost with a storage unit: free their slots."""
        self.state.accepted -= num_groups
        self.state.lost_total += num_groups

    @property
    def version(self) -> int:
        """The policy version the engines hold (groups admitted now are generated from it)."""
        return self.state.version

    def set_version(self, version: int) -> None:
        assert version >= self.state.version, (version, self.state.version)
        self.state.version = version

    def restore(self, state: GateState, num_buffered_groups: int) -> None:
        """Resume from a checkpoint: in-flight generations are gone (their prompts are requeued), so
        ``running`` restarts at 0 and ``accepted`` counts the consumed groups plus those restored into
        the datastore (AReaL's recovery rule, which avoids capacity drift after a restart)."""
        self.state = GateState(**asdict(state))
        self.state.running = 0
        self.state.accepted = self.state.version * self.batch_groups + num_buffered_groups


def min_allowed_version(version: int, max_staleness: int) -> int:
    """The oldest token version a batch trained at ``version`` may contain."""
    return version - max_staleness
