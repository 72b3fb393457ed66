"""The datastore on a Ray cluster of three nodes on one machine (``ray.cluster_utils.Cluster``):
units spread over the nodes, writers put to their own node's unit, readers read across nodes, and
a node lost mid-run takes only its unit's groups with it."""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import pytest

from datastore import DataStoreConfig, SampleWrite, make_datastore


def make_group(group_id: int, group_size: int = 2) -> list[SampleWrite]:
    return [
        SampleWrite(
            sample_id=f"{group_id}:{i}",
            group_id=group_id,
            group_size=group_size,
            columns={"input_ids": np.arange(50, dtype=np.int32) + 1000 * group_id + i},
            min_version=0,
            max_version=0,
            length=50,
        )
        for i in range(group_size)
    ]


@pytest.fixture
def three_node_cluster():
    """A head and two worker nodes (no CPUs: every datastore actor asks for none).

    The cluster lives in a private RAY_TMPDIR, so its address file does not make other Ray
    programs on this machine connect to it, and RAY_ADDRESS points this process at it. Afterwards a
    local Ray like the session's ``ray_local`` is started again if one was running."""
    import ray
    from ray.cluster_utils import Cluster

    had_ray = ray.is_initialized()
    if had_ray:
        ray.shutdown()
    saved = {key: os.environ.get(key) for key in ("RAY_TMPDIR", "RAY_ADDRESS")}
    tmp = tempfile.mkdtemp(prefix="dsmn", dir="/tmp")  # short: Ray's socket paths live under it
    os.environ["RAY_TMPDIR"] = tmp
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=0) for _ in range(2)]
    os.environ["RAY_ADDRESS"] = cluster.address
    try:
        ray.init(address=cluster.address, configure_logging=False)
        cluster.wait_for_nodes()
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if had_ray:
            ray.init(
                address="local",
                num_cpus=2,
                include_dashboard=False,
                log_to_driver=True,
                configure_logging=False,
            )


def wait_until(predicate, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


@pytest.mark.slow
def test_units_spread_writes_stay_on_the_writers_node_and_a_lost_node_costs_only_its_groups(
    three_node_cluster,
):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cluster, workers = three_node_cluster
    store = make_datastore(DataStoreConfig(num_storage_units=3, health_check_interval_s=0.5))
    nodes = [cluster.head_node.node_id, *(w.node_id for w in workers)]
    unit_nodes = store._handles.unit_nodes
    assert sorted(unit_nodes) == sorted(nodes)  # one unit per node
    assert store._handles.controller_endpoint.node_id == nodes[0]  # beside the driver, not anywhere

    @ray.remote(num_cpus=0)
    def write(store, group_id: int) -> str:
        store.put(make_group(group_id))
        return ray.get_runtime_context().get_node_id()

    written_on = ray.get(
        [
            write.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
                store, gid
            )
            for gid, node in enumerate(nodes)
        ],
        timeout=120,
    )
    assert written_on == nodes

    batch = store.get_batch_meta("train", ["input_ids"], num_groups=3, timeout_s=30.0)
    for sample in batch.samples:  # every group sits on the unit of the node that wrote it
        assert unit_nodes[sample.unit] == nodes[sample.group_id]
    rows = store.get_data(batch.samples, ["input_ids"])  # two of the three units are on other nodes
    for sample, row in zip(batch.samples, rows, strict=True):
        np.testing.assert_array_equal(
            row["input_ids"], make_group(sample.group_id)[0].columns["input_ids"] + int(sample.sample_id[-1])
        )
    store.release(batch.sample_ids)

    store.put(make_group(10))  # on the head's unit (this process's node)
    ray.get(
        write.options(scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[2], soft=False)).remote(
            store, 11
        ),
        timeout=120,
    )
    cluster.remove_node(workers[1])  # the node of group 11's unit: no client touches it afterwards
    lost_unit = unit_nodes.index(nodes[2])
    wait_until(lambda: store.stats().dead_units == [lost_unit])  # the controller's health loop

    stats = store.stats()
    assert (stats.lost_groups_total, stats.lost_samples_total) == (1, 2)
    assert store.drain_lost() == [11]
    survivors = store.get_batch_meta("train", ["input_ids"], num_groups=1, timeout_s=10.0)
    assert survivors.group_ids == [10]
    assert store.get_batch_meta("train", ["input_ids"], num_groups=1) is None
    store.shutdown()
