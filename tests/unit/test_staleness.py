"""AReaL's admission rule and the batch-time bound."""

from __future__ import annotations

from areal_like.core.types import PromptRecord
from areal_like.dispatch import PromptDispatcher
from areal_like.staleness import GateState, StalenessGate, min_allowed_version
from datastore.policies import is_stale


def test_synchronous_gate_admits_exactly_one_batch_per_version():
    gate = StalenessGate(batch_groups=4, max_staleness=0, max_concurrent=100)
    assert gate.admit(10) == 4
    gate.on_finished(accepted=4)
    assert gate.admit(1) == 0  # the batch for version 0 is complete; wait for training
    gate.set_version(1)
    assert gate.admit(10) == 4


def test_eta_lets_generation_run_eta_batches_ahead():
    gate = StalenessGate(batch_groups=4, max_staleness=2, max_concurrent=100)
    assert gate.admit(100) == 12  # (0 + 2 + 1) * 4
    gate.on_finished(accepted=12)
    gate.set_version(1)
    assert gate.admit(100) == 4


def test_concurrency_cap_bounds_running_groups():
    gate = StalenessGate(batch_groups=4, max_staleness=8, max_concurrent=3)
    assert gate.admit(10) == 3
    gate.on_finished(accepted=1)
    assert gate.admit(10) == 1


def test_evicted_and_rejected_groups_free_their_slots():
    gate = StalenessGate(batch_groups=2, max_staleness=0, max_concurrent=10)
    assert gate.admit(5) == 2
    gate.on_finished(accepted=1, rejected=1)
    assert gate.admit(5) == 1  # the rejected slot is refilled
    gate.on_finished(accepted=1)
    gate.on_evicted(1)
    assert gate.admit(5) == 1  # so is the evicted one
    assert gate.state.evicted_total == 1 and gate.state.rejected_total == 1


def test_abandoned_groups_free_their_running_slots_without_counting_as_accepted():
    gate = StalenessGate(batch_groups=2, max_staleness=0, max_concurrent=10)
    assert gate.admit(5) == 2
    gate.on_abandoned(2)
    assert (gate.state.running, gate.state.accepted, gate.state.admitted_total) == (0, 0, 2)
    assert gate.admit(5) == 2  # both slots are refilled


def test_restore_resets_running_and_recounts_accepted():
    gate = StalenessGate(batch_groups=4, max_staleness=1, max_concurrent=100)
    gate.restore(GateState(version=3, accepted=17, running=5), num_buffered_groups=2)
    assert gate.state.running == 0
    assert gate.state.accepted == 3 * 4 + 2
    assert gate.capacity() == (3 + 1 + 1) * 4 - 14


def test_batch_time_bound_is_hard():
    assert not is_stale(3, min_allowed_version(version=5, max_staleness=2))
    assert is_stale(2, min_allowed_version(version=5, max_staleness=2))
    assert is_stale(4, min_allowed_version(version=5, max_staleness=0))


def _dispatcher(n=5, eta=0, batch=2):
    prompts = [PromptRecord(f"p{i}", f"{i}+0=", str(i)) for i in range(n)]
    return PromptDispatcher(
        prompts,
        [[i] for i in range(n)],
        group_size=4,
        batch_groups=batch,
        max_staleness=eta,
        max_concurrent=100,
        seed=3,
    )


def test_dispatcher_hands_out_each_prompt_once_per_epoch():
    d = _dispatcher(n=5, eta=10, batch=1)
    groups = d.acquire(5)
    assert sorted(g.prompt.prompt_id for g in groups) == [f"p{i}" for i in range(5)]
    assert len({g.group_id for g in groups}) == 5
    assert all(g.num_samples == 4 and g.admitted_version == 0 for g in groups)


def test_dispatcher_resume_requeues_groups_that_were_in_flight():
    d = _dispatcher(n=5, eta=1, batch=2)
    first = d.acquire(3)
    d.finish([first[0].group_id], [])
    state = d.state()
    # group 1 made it into the datastore snapshot, group 2 did not
    resumed = _dispatcher(n=5, eta=1, batch=2)
    resumed.restore(state, buffered_group_ids=[first[0].group_id, first[1].group_id])
    nxt = resumed.acquire(1)[0]
    assert nxt.prompt.prompt_id == first[2].prompt.prompt_id  # the lost prompt comes back first
    assert nxt.group_id == first[2].group_id + 1  # ids never repeat
    # afterwards the stream continues where the original left off
    continued = d.acquire(1)[0]
    assert resumed.acquire(1)[0].prompt.prompt_id == continued.prompt.prompt_id


def test_abandoned_groups_are_requeued_and_free_their_slot():
    d = _dispatcher(n=5, eta=0, batch=2)
    groups = d.acquire(2)
    assert d.acquire(1) == []
    # repeats and unknown (or finished) ids are ignored, and not counted
    assert d.abandon([groups[1].group_id, groups[1].group_id, 999]) == 1
    assert d.gate_state().running == 1
    again = d.acquire(1)
    assert again[0].prompt.prompt_id == groups[1].prompt.prompt_id


def test_lost_groups_are_regenerated_first_and_free_their_slots():
    d = _dispatcher(n=5, eta=0, batch=2)
    groups = d.acquire(2)
    d.finish([g.group_id for g in groups], [])
    assert d.acquire(1) == []  # the batch for version 0 is complete
    assert d.on_lost([groups[0].group_id]) == 1
    again = d.acquire(5)
    assert [g.prompt.prompt_id for g in again] == [groups[0].prompt.prompt_id]
    assert d.gate_state().lost_total == 1 and d.gate_state().evicted_total == 0


def test_trained_groups_are_not_requeued_when_reported_lost_later():
    d = _dispatcher(n=5, eta=0, batch=1)
    g = d.acquire(1)[0]
    d.finish([g.group_id], [])
    d.on_trained([g.group_id])
    assert d.on_lost([g.group_id]) == 0
