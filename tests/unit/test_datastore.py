"""The datastore on a local Ray: controller + storage units + client, small stores per test."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from areal_like.core.types import TRAJECTORY_COLUMNS, Trajectory
from datastore import DataStoreConfig, DataStoreSamplesLost, DataStoreTimeout, SampleWrite, make_datastore

ALL_COLUMNS = list(TRAJECTORY_COLUMNS)


def make_sample(group_id: int, index: int, group_size: int, versions: list[int] | None = None) -> SampleWrite:
    """A trajectory with arrays unique to (group_id, index); response length = index + 2."""
    response_len = index + 2
    traj = Trajectory(
        group_id=group_id,
        index=index,
        group_size=group_size,
        prompt_ids=np.arange(3, dtype=np.int64) + 10 * group_id,
        response_ids=np.arange(response_len, dtype=np.int64) + 100 * group_id + index,
        behav_logprobs=np.full(response_len, -0.1 * (index + 1), dtype=np.float32),
        versions=np.asarray(versions if versions is not None else [0] * response_len, dtype=np.int64),
        reward=float(group_id) + 0.5 * index,
        finish_reason="stop",
    )
    return traj.sample_write()


def make_group(group_id: int, group_size: int = 2, version: int = 0) -> list[SampleWrite]:
    return [make_sample(group_id, i, group_size, [version] * (i + 2)) for i in range(group_size)]


def without_reward(samples: list[SampleWrite]) -> list[SampleWrite]:
    for sample in samples:
        del sample.columns["reward"]
    return samples


def wait_until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def kill_and_wait(actor, timeout_s: float = 30.0) -> None:
    """Crash an actor's process (SIGKILL, as the OOM killer would) and return once Ray reports it
    dead. ray.kill is not used: Ray declares the actor dead before its process has exited."""
    import os
    import signal

    import ray

    os.kill(ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=timeout_s), signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.num_samples.remote(), timeout=timeout_s)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.05)
    raise AssertionError("the actor did not die in time")


def unit_sizes(store) -> list[int]:
    """Samples held by each storage unit (reaches past the client: the data plane itself)."""
    import ray

    return ray.get([unit.num_samples.remote() for unit in store._units])


@pytest.fixture
def new_store(ray_local):
    """Builds small stores and shuts them all down after the test. One storage unit unless a test
    needs several (each actor costs ~0.5 s to start on a 2-core machine)."""
    stores = []

    def build(**overrides):
        store = make_datastore(DataStoreConfig(**{"num_storage_units": 1, **overrides}))
        stores.append(store)
        return store

    yield build
    for store in stores:
        store.shutdown()


def test_config_loads_through_omegaconf_and_errors_name_the_field_the_value_and_the_fix():
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(DataStoreConfig), {"capacity_samples": 8})
    assert OmegaConf.to_object(merged) == DataStoreConfig(capacity_samples=8)
    with pytest.raises(ValueError, match=r"datastore\.num_storage_units=0: must be >= 1"):
        DataStoreConfig(num_storage_units=0)
    with pytest.raises(ValueError, match=r"datastore\.capacity_samples=-5"):
        DataStoreConfig(capacity_samples=-5)


def test_put_then_get_returns_the_exact_arrays_oldest_group_first(new_store):
    store = new_store(num_storage_units=2)
    written = {s.sample_id: s for gid in (5, 2, 9) for s in make_group(gid, group_size=3)}
    for gid in (5, 2, 9):  # three puts: insertion order, not group id order, is the age
        store.put([s for s in written.values() if s.group_id == gid])

    batch = store.get_batch_meta("train", ALL_COLUMNS, num_groups=3)

    assert batch.group_ids == [5, 2, 9]
    assert [s.group_id for s in batch.samples] == [5, 5, 5, 2, 2, 2, 9, 9, 9]
    assert batch.num_tokens == sum(s.length for s in written.values())
    rows = store.get_data(batch.samples, ALL_COLUMNS)
    for meta, row in zip(batch.samples, rows, strict=True):
        for name in ALL_COLUMNS:
            np.testing.assert_array_equal(row[name], written[meta.sample_id].columns[name])
            assert row[name].dtype == written[meta.sample_id].columns[name].dtype


def test_a_group_is_not_returned_until_all_its_samples_are_written(new_store):
    store = new_store()
    group = make_group(0, group_size=3)
    store.put(group[:2])

    assert store.get_batch_meta("train", ALL_COLUMNS, num_groups=1) is None
    assert store.stats().num_partial_groups == 1

    store.put(group[2:])
    batch = store.get_batch_meta("train", ALL_COLUMNS, num_groups=1)
    assert sorted(batch.sample_ids) == ["0:0", "0:1", "0:2"]


def test_a_consumer_asking_for_reward_gets_nothing_until_add_columns_adds_it(new_store):
    store = new_store()
    store.put(without_reward(make_group(0)))

    assert store.get_batch_meta("train", ["reward"], num_groups=1) is None
    assert store.get_batch_meta("inspect", ["response_ids"], num_groups=1).group_ids == [0]

    store.add_columns(["0:0", "0:1"], [{"reward": np.array([1.0], np.float32)}, {"reward": np.array([0.0])}])
    batch = store.get_batch_meta("train", ["reward"], num_groups=1)
    assert batch.group_ids == [0]
    assert all("reward" in s.columns for s in batch.samples)
    rewards = [row["reward"][0] for row in store.get_data(batch.samples, ["reward"])]
    assert rewards == [1.0, 0.0]
    assert store.stats().ready_per_column["reward"] == 2


def test_two_tasks_consume_the_same_samples_independently_and_never_twice(new_store):
    store = new_store()
    store.put(make_group(0) + make_group(1))

    assert store.get_batch_meta("train", ALL_COLUMNS, num_groups=2).group_ids == [0, 1]
    assert store.get_batch_meta("train", ALL_COLUMNS, num_groups=1) is None
    assert store.get_batch_meta("eval", ALL_COLUMNS, num_groups=1).group_ids == [0]
    assert store.get_batch_meta("eval", ALL_COLUMNS, num_groups=1).group_ids == [1]
    assert store.stats().num_unconsumed == {"train": 0, "eval": 0}
    fresh = store.get_batch_meta("fresh", ALL_COLUMNS, num_groups=2, policy="freshest_first")
    assert fresh.group_ids == [0, 1]  # same version: oldest first
    with pytest.raises(ValueError, match="unknown"):
        store.get_batch_meta("fresh", ALL_COLUMNS, num_groups=1, policy="newest")

    # Two readers of one task block at once; each new group goes to exactly one of them.
    with ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(store.get_batch_meta, "train", ALL_COLUMNS, 1, None, 10.0) for _ in range(2)]
        time.sleep(0.3)
        store.put(make_group(2) + make_group(3))
        claimed = sorted(f.result(timeout=10).group_ids[0] for f in waiting)
    assert claimed == [2, 3]


def test_stale_groups_are_evicted_counted_reported_and_never_returned(new_store):
    store = new_store()
    store.put(make_group(0, version=0))
    store.put(make_group(1, version=3))
    store.put([make_sample(2, 0, 2, [3, 3]), make_sample(2, 1, 2, [1, 3, 3])])  # one old token

    batch = store.get_batch_meta("train", ALL_COLUMNS, num_groups=1, min_version=2)

    assert batch.group_ids == [1]
    assert store.get_batch_meta("train", ALL_COLUMNS, num_groups=1, min_version=2) is None
    stats = store.stats()
    assert (stats.evicted_groups_total, stats.evicted_samples_total, stats.num_samples) == (2, 4, 2)
    assert sorted(store.drain_evictions()) == [0, 2]
    assert store.drain_evictions() == []
    wait_until(lambda: sum(unit_sizes(store)) == 2)  # the evicted data is gone from the units too


def test_a_blocking_get_times_out_with_a_message_naming_columns_ready_count_and_task(new_store):
    store = new_store()
    store.put(make_group(0))  # complete, with reward
    store.put(without_reward(make_group(1)))  # complete, reward missing
    store.put(make_group(2)[:1])  # partial

    start = time.monotonic()
    with pytest.raises(DataStoreTimeout) as err:
        store.get_batch_meta("train", ["reward"], num_groups=4, timeout_s=0.3)

    assert time.monotonic() - start >= 0.3
    message = str(err.value)
    assert "4 complete groups with columns ['reward'] for task 'train'" in message
    assert (
        "1 ready, 1 complete but missing a column, 1 groups partially written (1 of their 2 samples in)"
        in message
    )
    assert "0 evicted as stale" in message


def test_put_blocks_while_the_store_is_full_and_proceeds_after_release(new_store):
    store = new_store(capacity_samples=4, put_timeout_s=0.5)
    store.put(make_group(0, group_size=4))

    with pytest.raises(DataStoreTimeout, match=r"holds 4/4 samples"):
        store.put(make_group(1))
    assert sum(unit_sizes(store)) == 4  # the refused put left no data behind

    batch = store.get_batch_meta("train", ALL_COLUMNS, num_groups=1)
    with ThreadPoolExecutor(1) as pool:
        blocked_put = pool.submit(store.put, make_group(1))
        time.sleep(0.2)
        assert not blocked_put.done()
        store.release(batch.sample_ids)
        blocked_put.result(timeout=5)
    assert store.get_batch_meta("train", ALL_COLUMNS, num_groups=1).group_ids == [1]
    assert store.stats().released_total == 4


def test_a_put_repeating_a_held_sample_id_is_refused_and_keeps_the_held_data(new_store):
    store = new_store()
    store.put(make_group(0))
    duplicate = make_sample(0, 1, 2)
    duplicate.columns["prompt_ids"] = np.zeros(3, dtype=np.int64)

    with pytest.raises(ValueError, match="unique"):
        store.put([duplicate])

    batch = store.get_batch_meta("train", ["prompt_ids"], num_groups=1)
    rows = store.get_data(batch.samples, ["prompt_ids"])
    np.testing.assert_array_equal(rows[1]["prompt_ids"], [0, 1, 2])
    assert store.stats().puts_total == 2


def test_snapshot_restore_keeps_unconsumed_samples_and_drops_consumed_ones(new_store, tmp_path):
    store = new_store(num_storage_units=2)
    store.put(make_group(0))
    store.put(without_reward(make_group(1)))
    store.add_columns(["1:0", "1:1"], [{"reward": np.array([7.0], np.float32)}] * 2)
    store.put(make_group(2)[:1])  # partial groups are unconsumed too
    store.get_batch_meta("train", ALL_COLUMNS, num_groups=1)  # consumes group 0
    path = str(tmp_path / "datastore.pkl")

    assert store.snapshot(path, task="train") == 3
    store.shutdown()
    fresh = new_store()  # one unit: restore routes samples by the new store's layout
    assert fresh.restore(path) == [1, 2]

    batch = fresh.get_batch_meta("train", ALL_COLUMNS, num_groups=1)
    assert batch.group_ids == [1]
    rows = fresh.get_data(batch.samples, ALL_COLUMNS)
    original = make_group(1)
    for row, sample in zip(rows, original, strict=True):
        np.testing.assert_array_equal(row["response_ids"], sample.columns["response_ids"])
        assert row["reward"][0] == 7.0
    assert fresh.get_batch_meta("train", ALL_COLUMNS, num_groups=1) is None
    fresh.put(make_group(2)[1:])
    assert fresh.get_batch_meta("train", ALL_COLUMNS, num_groups=1).group_ids == [2]


def test_the_client_works_when_passed_into_another_ray_actor(new_store):
    import ray

    @ray.remote(num_cpus=0)
    class Writer:
        def __init__(self, store):
            self.store = store

        def write(self, samples: list[SampleWrite]) -> int:
            self.store.put(samples)
            return self.store.stats().puts_total

    store = new_store()
    writer = Writer.remote(store)
    try:
        assert ray.get(writer.write.remote(make_group(4)), timeout=60) == 2
        batch = store.get_batch_meta("train", ALL_COLUMNS, num_groups=1, timeout_s=10.0)
        rows = store.get_data(batch.samples, ["response_ids"])
        np.testing.assert_array_equal(rows[0]["response_ids"], make_group(4)[0].columns["response_ids"])
    finally:
        ray.kill(writer)


def test_stats_report_sizes_ready_columns_and_the_latency_clients_saw(new_store):
    store = new_store()
    store.put(make_group(0) + without_reward(make_group(1)))
    batch = store.get_batch_meta("train", ["response_ids"], num_groups=2)
    store.get_data(batch.samples, ["response_ids"])
    store.release(batch.sample_ids[:2])

    stats = store.stats()

    held = without_reward(make_group(1))  # group 0 was released
    assert stats.num_bytes == sum(a.nbytes for sample in held for a in sample.columns.values())
    assert (stats.num_samples, stats.num_groups, stats.unit_num_samples) == (2, 1, [2])
    assert stats.ready_per_column["response_ids"] == 2 and "reward" not in stats.ready_per_column
    assert {op: lat.count for op, lat in stats.latency_ms.items()} == {
        "put": 1,
        "get_batch_meta": 1,
        "get_data": 1,
        "release": 1,
    }
    metrics = stats.as_metrics()
    assert metrics["datastore/ready/response_ids"] == 2.0
    assert metrics["datastore/latency/put_p50_ms"] > 0
    assert metrics["datastore/lost_samples_total"] == 0.0


def test_a_killed_storage_unit_loses_its_groups_readers_get_a_clear_error_and_the_rest_carry_on(new_store):
    import ray

    store = new_store(num_storage_units=2, health_check_interval_s=60.0)  # the client finds the death
    for gid in range(4):  # groups 0 and 2 on unit 0, 1 and 3 on unit 1
        store._home_slot = gid % 2  # which of this node's units this client writes to
        store.put(make_group(gid))
    batch = store.get_batch_meta("train", ALL_COLUMNS, num_groups=2)
    assert batch.group_ids == [0, 1] and [s.unit for s in batch.samples] == [0, 0, 1, 1]

    kill_and_wait(store._units[1])
    with pytest.raises(DataStoreSamplesLost, match=r"2 samples of the request are lost.*drain_lost") as err:
        store.get_data(batch.samples, ALL_COLUMNS)

    assert (err.value.sample_ids, err.value.group_ids, err.value.units) == (["1:0", "1:1"], [1], [1])
    stats = store.stats()
    assert (stats.dead_units, stats.lost_groups_total, stats.lost_samples_total) == ([1], 2, 4)
    assert sorted(store.drain_lost()) == [1, 3] and store.drain_lost() == []
    store.release(batch.sample_ids)  # ids of lost samples are ignored
    store._home_slot = 1  # would pick the dead unit: the put goes to the live one
    store.put(make_group(4))
    later = store.get_batch_meta("train", ALL_COLUMNS, num_groups=2)
    assert later.group_ids == [2, 4] and {s.unit for s in later.samples} == {0}
    rows = store.get_data(later.samples, ["response_ids"])
    np.testing.assert_array_equal(rows[0]["response_ids"], make_group(2)[0].columns["response_ids"])
    wait_until(lambda: ray.get(store._units[0].num_samples.remote()) == 4)  # group 0's delete landed
