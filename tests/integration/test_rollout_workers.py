"""Rollout workers on local Ray with a real dispatcher and datastore: metadata, dynamic sampling,
forced lengths, and the supervisor taking out of rotation a worker whose engine stalls or whose
actor dies."""

from __future__ import annotations

import threading
import time

import pytest
import ray

from areal_like.core.models import ModelBuildConfig, build_model, load_tokenizer
from areal_like.core.types import PromptRecord
from areal_like.dispatch import PromptDispatcher
from datastore import DataStoreConfig, make_datastore
from rollout.config import RolloutConfig
from rollout.samples import META_COLUMN, ForcedLengths, SampleMetadata
from rollout.supervisor import RolloutSupervisor
from rollout.worker import RolloutWorker

pytestmark = pytest.mark.slow

FIXTURES = "tests.unit.reward_fixtures"
BATCH_GROUPS, GROUP_SIZE, ETA = 4, 4, 1
CAPACITY = (ETA + 1) * BATCH_GROUPS  # groups the gate accepts at version 0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = ModelBuildConfig(hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)
    return build_model(cfg, str(tmp_path_factory.mktemp("model") / "tiny"))


class Fleet:
    """A dispatcher, a datastore and ``num_workers`` rollout workers over ``records``."""

    def __init__(self, model_dir, records, reward_fn, num_workers, forced_lengths=None, **rollout):
        tokenizer = load_tokenizer(model_dir)
        ids = [tokenizer.encode(r.text, add_special_tokens=False) for r in records]
        self.dispatcher = (
            ray.remote(PromptDispatcher)
            .options(num_cpus=0)
            .remote(records, ids, GROUP_SIZE, BATCH_GROUPS, ETA, BATCH_GROUPS, 0)
        )
        self.store = make_datastore(DataStoreConfig(num_storage_units=1))
        config = RolloutConfig(
            num_workers=num_workers, group_size=GROUP_SIZE, max_new_tokens=3, groups_per_generate=2, **rollout
        )
        actor = ray.remote(RolloutWorker).options(num_cpus=0, max_concurrency=4)
        self.workers = [
            actor.remote(
                i, config, model_dir, reward_fn, 5.0, 1, self.dispatcher, self.store, i, 0, forced_lengths
            )
            for i in range(num_workers)
        ]

    def gate(self):
        return ray.get(self.dispatcher.gate_state.remote(), timeout=30)

    def wait_for_accepted(self, num_groups, timeout_s=120.0):
        deadline = time.monotonic() + timeout_s
        while self.gate().accepted < num_groups:
            assert time.monotonic() < deadline, f"gate {self.gate()} never reached {num_groups} accepted"
            time.sleep(0.1)

    def read_all(self, num_groups):
        columns = ["reward", "versions", "response_ids", META_COLUMN]
        batch = self.store.get_batch_meta("test", columns, num_groups, min_version=None, timeout_s=30)
        return batch.samples, self.store.get_data(batch.samples, columns)

    def close(self):
        self.store.shutdown()
        for handle in (*self.workers, self.dispatcher):
            ray.kill(handle)


def stall_engine(worker) -> None:
    """Block the worker's engine thread at its next token boundary, for good."""

    def block(self):
        forever = threading.Event()
        self.engine._on_step = lambda num_generated: forever.wait()

    ray.get(worker.__ray_call__.remote(block), timeout=60)


def addition_records(answer_of):
    return [PromptRecord(f"p{i}", f"{i}+{i}=", answer_of(i)) for i in range(10)]


def test_dynamic_sampling_drops_equal_reward_groups_counts_them_and_refills_the_batch(ray_local, model_dir):
    records = addition_records(lambda i: "const" if i % 2 else "varied")
    fleet = Fleet(model_dir, records, f"{FIXTURES}:const_or_varied", 1, dynamic_sampling=True)
    try:
        ray.get(fleet.workers[0].start.remote(), timeout=120)
        fleet.wait_for_accepted(CAPACITY)
        health = ray.get(fleet.workers[0].health.remote(), timeout=30)
        gate = fleet.gate()
        assert health.groups_filtered > 0 and gate.rejected_total == health.groups_filtered
        assert gate.admitted_total >= CAPACITY + health.groups_filtered  # dropped groups were replaced

        metas, rows = fleet.read_all(CAPACITY)
        by_group: dict[int, list[float]] = {}
        for meta, row in zip(metas, rows, strict=True):
            info = SampleMetadata.from_column(row[META_COLUMN])
            by_group.setdefault(meta.group_id, []).append(float(row["reward"][0]))
            assert info.engine_id == 0 and info.group_id == meta.group_id
            assert info.response_len == len(row["response_ids"]) and info.finish_reason in ("stop", "length")
            assert (
                info.version_min == info.version_max == 0 and list(row["versions"]) == [0] * info.response_len
            )
            assert info.latency_s > 0
        assert len(by_group) == CAPACITY
        assert all(len(set(rewards)) > 1 for rewards in by_group.values())  # no zero-advantage group
    finally:
        fleet.close()


def test_forced_lengths_ignore_eos_and_fix_every_response_length(ray_local, model_dir):
    fleet = Fleet(
        model_dir, addition_records(str), f"{FIXTURES}:exact", 1, ForcedLengths(median=2, sigma=0.0)
    )
    try:
        ray.get(fleet.workers[0].start.remote(), timeout=120)
        fleet.wait_for_accepted(CAPACITY)
        _, rows = fleet.read_all(CAPACITY)
        infos = [SampleMetadata.from_column(row[META_COLUMN]) for row in rows]
        assert {(info.response_len, info.finish_reason) for info in infos} == {(2, "length")}
    finally:
        fleet.close()


def test_a_worker_whose_engine_stalls_retires_and_its_groups_are_generated_elsewhere(ray_local, model_dir):
    fleet = Fleet(model_dir, addition_records(str), f"{FIXTURES}:exact", 2, engine_stall_timeout_s=1.0)
    supervisor = RolloutSupervisor(fleet.workers, fleet.dispatcher, health_timeout_s=30)
    try:
        stall_engine(fleet.workers[0])
        ray.get([w.start.remote() for w in fleet.workers], timeout=120)
        fleet.wait_for_accepted(CAPACITY)  # worker 1 alone fills the batch, requeued prompts included
        healthy = supervisor.check()
        assert [h.worker_id for h in healthy] == [1] and supervisor.active_ids == [1]
        [retired] = supervisor.retired
        assert retired.worker_id == 0 and "made no decode step" in retired.reason
        stalled = next(h for h in supervisor.all_health() if h.worker_id == 0)
        assert (
            stalled.groups_abandoned == 2 and stalled.groups_done == 0 and stalled.in_flight_group_ids == []
        )
        assert supervisor.metrics()["rollout/engines_retired_total"] == 1.0
        state = ray.get(fleet.dispatcher.state.remote(), timeout=30)
        assert state.requeue == []  # the two handed-back prompts were acquired again
        metas, rows = fleet.read_all(CAPACITY)
        assert {SampleMetadata.from_column(r[META_COLUMN]).engine_id for r in rows} == {1}
    finally:
        fleet.close()


def test_a_dead_worker_is_taken_out_of_rotation_and_its_groups_are_resubmitted(ray_local, model_dir):
    fleet = Fleet(model_dir, addition_records(str), f"{FIXTURES}:exact", 2)
    supervisor = RolloutSupervisor(fleet.workers, fleet.dispatcher, health_timeout_s=30)
    try:
        stall_engine(fleet.workers[0])  # so it holds its groups until it dies
        ray.get([w.start.remote() for w in fleet.workers], timeout=120)
        deadline = time.monotonic() + 60
        while len(ray.get(fleet.workers[0].health.remote(), timeout=30).in_flight_group_ids) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ray.kill(fleet.workers[0])
        healthy = supervisor.check()
        assert [h.worker_id for h in healthy] == [1]
        assert "actor died" in supervisor.retired[0].reason
        assert supervisor.groups_resubmitted_total == 2
        assert supervisor.metrics()["rollout/groups_resubmitted_total"] == 2.0
        fleet.wait_for_accepted(CAPACITY)
        gate = fleet.gate()
        assert gate.running <= 2  # only worker 1's groups are left in flight
        # Weight updates now go to worker 1 only (a dead worker in the list would fail the sync).
        weights = ray.get(fleet.workers[1].__ray_call__.remote(_engine_weights), timeout=60)
        supervisor.update_weights(ray.put(weights), version=1, timeout_s=60)
        assert ray.get(fleet.workers[1].health.remote(), timeout=30).version == 1
        # A dead worker's acquire that Ray runs late: a group in flight that no worker holds.
        ray.get(fleet.dispatcher.set_version.remote(3), timeout=30)  # room in the gate
        (late,) = ray.get(fleet.dispatcher.acquire.remote(1), timeout=30)
        supervisor.check()
        assert late.group_id not in ray.get(fleet.dispatcher.state.remote(), timeout=30).in_flight
        assert supervisor.groups_resubmitted_total == 3
    finally:
        fleet.close()


def _engine_weights(worker):
    return {name: tensor.clone() for name, tensor in worker.engine.model.state_dict().items()}
