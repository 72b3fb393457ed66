"""Where actors run: scheduling options per role, and the placement report printed at start.

Roles: trainer ranks are packed into one placement group (PACK: same node when they fit, so
collectives stay local; STRICT_SPREAD puts one rank per node); rollout workers and the dispatcher use
Ray's SPREAD or default (PACK-like) scheduling. All CPU asks are 0 or tiny fractions so a 2-core
machine never queues actors behind each other.

GPUs (``devices``): 'cpu' asks for none. 'split': every trainer bundle holds one GPU for its rank and
every rollout worker asks for a GPU of its own (generation and training never share a device).
'colocated': rollout worker i shares trainer rank i's bundle, each taking half of its GPU in Ray's
books; they take turns on it (the engine sleeps while the trainer steps).

Ray is imported inside the functions: ``PlacementConfig`` is part of the config, which composes
without Ray.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ray.actor import ActorHandle

logger = logging.getLogger(__name__)

_BUNDLE_CPU = 0.001  # a bundle needs some resource; this one costs nothing in practice


@dataclass
class PlacementConfig:
    """How actors spread over the nodes of the Ray cluster."""

    rollout: str = "spread"
    """Rollout workers: 'spread' (worker i on alive node i mod N) or 'default' (Ray's scheduler)."""
    trainer: str = "pack"
    """Trainer ranks, in one placement group: 'pack' (same node when they fit), 'spread' (over
    nodes when possible) or 'strict_spread' (one rank per node, fails if there are too few nodes)."""
    ready_timeout_s: float = 300.0
    """How long to wait for the trainer placement group before failing with the cluster's resources."""
    devices: str = "cpu"
    """'cpu' (no GPUs), 'split' (trainer ranks and rollout engines on disjoint GPUs, one each) or
    'colocated' (rollout worker i on trainer rank i's GPU; needs rollout.engine 'vllm' and as many
    workers as trainer ranks)."""

    def __post_init__(self) -> None:
        if self.devices not in ("cpu", "split", "colocated"):
            raise ValueError(
                f"placement.devices={self.devices!r}: allowed values are 'cpu', 'split', 'colocated'"
            )
        if self.rollout not in ("spread", "default"):
            raise ValueError(f"placement.rollout={self.rollout!r}: allowed values are 'spread', 'default'")
        if self.trainer not in ("pack", "spread", "strict_spread"):
            raise ValueError(
                f"placement.trainer={self.trainer!r}: allowed values are 'pack', 'spread', 'strict_spread'"
            )
        if self.ready_timeout_s <= 0:
            raise ValueError(f"placement.ready_timeout_s={self.ready_timeout_s}: must be > 0")


def trainer_options(config: PlacementConfig, num_ranks: int) -> list[dict]:
    """Actor ``.options`` for each trainer rank, bundle i for rank i of one placement group (with a
    GPU per bundle unless ``devices`` is 'cpu')."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundle = {"CPU": _BUNDLE_CPU} if config.devices == "cpu" else {"CPU": _BUNDLE_CPU, "GPU": 1}
    pg = placement_group([bundle] * num_ranks, strategy=config.trainer.upper())
    try:
        ray.get(pg.ready(), timeout=config.ready_timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(
            f"placement: {num_ranks} trainer bundles with strategy {config.trainer!r} could not be placed in "
            f"{config.ready_timeout_s:.0f}s; cluster resources: {ray.cluster_resources()}"
        ) from None
    gpus = {"cpu": 0, "split": 1, "colocated": 0.5}[config.devices]
    return [
        {
            "num_cpus": _BUNDLE_CPU / 2,
            "num_gpus": gpus,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=rank
            ),
        }
        for rank in range(num_ranks)
    ]


def rollout_options(
    config: PlacementConfig, worker_index: int = 0, trainer_opts: list[dict] | None = None
) -> dict:
    """'colocated': worker i in trainer rank i's bundle (half its GPU). 'split': a GPU of its own,
    spread over nodes by Ray. CPU 'spread': worker i pinned to alive node i mod N (sorted by id); Ray's
    own SPREAD is best effort and, for 0-CPU actors on a busy cluster, can put every worker on one node."""
    if config.devices == "colocated":
        if trainer_opts is None or worker_index >= len(trainer_opts):
            raise ValueError(
                f"placement.devices='colocated': rollout worker {worker_index} has no trainer rank to share "
                "a GPU with; use as many rollout workers as trainer ranks"
            )
        return {
            "num_cpus": _BUNDLE_CPU / 2,
            "num_gpus": 0.5,
            "scheduling_strategy": trainer_opts[worker_index]["scheduling_strategy"],
        }
    if config.devices == "split":
        strategy = "SPREAD" if config.rollout == "spread" else "DEFAULT"
        return {"num_cpus": 0, "num_gpus": 1, "scheduling_strategy": strategy}
    if config.rollout != "spread":
        return {"num_cpus": 0, "scheduling_strategy": "DEFAULT"}
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))
    node = nodes[worker_index % len(nodes)]
    return {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node, soft=False)}


def node_of(actor: ActorHandle) -> str:
    """The IP address of the node an actor runs on."""
    import ray

    return ray.get(actor.__ray_call__.remote(lambda _self: ray.util.get_node_ip_address()), timeout=120)


def placement_report(roles: dict[str, list[ActorHandle]]) -> str:
    """A table of role, index and node for every actor; printed at start."""
    lines = ["placement:"]
    for role, actors in roles.items():
        nodes = [node_of(actor) for actor in actors]
        lines.append(f"  {role:<16} " + ", ".join(f"{i}@{node}" for i, node in enumerate(nodes)))
    return "\n".join(lines)


def rendezvous_address(rank0_options: dict) -> tuple[str, int]:
    """IP and a free port on the node of trainer rank 0 (torch.distributed's MASTER_ADDR/PORT)."""

    import ray

    def probe() -> tuple[str, int]:
        from areal_like.core.net import free_port

        return ray.util.get_node_ip_address(), free_port()

    return ray.get(ray.remote(probe).options(**rank0_options).remote(), timeout=120)
