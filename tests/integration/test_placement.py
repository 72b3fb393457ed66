"""Placement over several nodes, on one machine with Ray's multi-node test cluster."""

from __future__ import annotations

import pytest
import ray
from ray.cluster_utils import Cluster

from areal_like.placement import (
    PlacementConfig,
    node_of,
    placement_report,
    rendezvous_address,
    rollout_options,
    trainer_options,
)

pytestmark = pytest.mark.slow


@ray.remote
class Probe:
    def ping(self) -> int:
        return 1


@pytest.fixture
def three_nodes():
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, include_dashboard=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_trainers_pack_or_spread_and_rollout_workers_spread_over_nodes(three_nodes):
    packed = [Probe.options(**o).remote() for o in trainer_options(PlacementConfig(trainer="pack"), 2)]
    assert len({node_of(a) for a in packed}) == 1

    spread = [
        Probe.options(**o).remote() for o in trainer_options(PlacementConfig(trainer="strict_spread"), 3)
    ]
    spread_nodes = [
        ray.get(a.__ray_call__.remote(lambda s: ray.get_runtime_context().get_node_id())) for a in spread
    ]
    assert len(set(spread_nodes)) == 3

    workers = [
        Probe.options(**rollout_options(PlacementConfig(rollout="spread"), i)).remote() for i in range(3)
    ]
    worker_nodes = [
        ray.get(a.__ray_call__.remote(lambda s: ray.get_runtime_context().get_node_id())) for a in workers
    ]
    assert len(set(worker_nodes)) == 3  # one per node, deterministically

    report = placement_report({"trainer": packed, "rollout worker": workers})
    assert report.startswith("placement:") and "rollout worker" in report and "0@" in report


def test_strict_spread_beyond_the_node_count_fails_naming_the_resources(three_nodes):
    with pytest.raises(TimeoutError, match="could not be placed"):
        trainer_options(PlacementConfig(trainer="strict_spread", ready_timeout_s=3), 4)


def test_rendezvous_address_is_on_rank_zeros_node(three_nodes):
    options = trainer_options(PlacementConfig(trainer="pack"), 1)
    host, port = rendezvous_address(options[0])
    rank0 = Probe.options(**options[0]).remote()
    assert host == node_of(rank0) and 0 < port < 65536
