"""Where storage units run and which unit a writer puts to.

- ``start_units``: 'spread' deals the units round robin over the alive nodes (the starting node
  first), each pinned with a hard NodeAffinitySchedulingStrategy (a soft one lets Ray move a unit
  off a head node that has no CPUs, which defeats the spread); a node lost in between fails
  ``make_datastore`` loudly. 'ray_default' leaves placement to Ray. Units report their node.
- ``candidate_units``: a writer puts to a live unit on its own node when there is one (the bytes then
  never cross the network), else to any live unit. Among the candidates the client's home slot (a
  random number fixed per process) picks, so every put of one writer lands on one unit (a group it
  writes stays together, and one put is one unit call) and the node's writers spread over its
  units; a restore, which has no home node, spreads by group id.
- ``use_loopback`` / ``listen_host``: where the actors' wire servers listen. With every actor on one
  node (a local Ray, or a one-node cluster under ``datastore.bind: auto``) they listen on the
  loopback address only, so nothing on the machine's network reaches them.
"""

from __future__ import annotations

import logging

from datastore.config import BINDS

logger = logging.getLogger(__name__)


def alive_node_ids() -> list[str]:
    """Alive Ray nodes, this process's node first, the rest by id (stable across calls)."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    others = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != here)
    return [here, *others]


LOOPBACK = "127.0.0.1"


def use_loopback(bind: str) -> bool:
    """Whether the store's actors listen on the loopback address (``bind`` is ``datastore.bind``)."""
    assert bind in BINDS, bind
    if bind != "auto":
        return bind == "loopback"
    import ray

    return sum(1 for n in ray.nodes() if n["Alive"]) == 1


def listen_host(loopback: bool) -> str:
    """The address an actor's wire server binds: loopback, or its node's address."""
    if loopback:
        return LOOPBACK
    import ray

    return ray.util.get_node_ip_address()


def on_this_node():
    """A scheduling strategy that pins an actor to the calling process's node: the controller goes
    where ``make_datastore`` runs (the RL controller's node), not wherever Ray finds room; an
    unpinned zero-CPU actor can land on any node and die with it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def start_units(num_units: int, placement: str, secret: bytes, max_connections: int) -> list:
    """Start ``num_units`` StorageUnit actors (num_cpus=0) placed per ``placement``."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from datastore.storage_unit import StorageUnit

    unit_actor = ray.remote(num_cpus=0)(StorageUnit)
    if placement == "ray_default":
        return [unit_actor.remote(i, secret, max_connections) for i in range(num_units)]
    assert placement == "spread", placement
    nodes = alive_node_ids()
    return [
        unit_actor.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[i % len(nodes)], soft=False)
        ).remote(i, secret, max_connections)
        for i in range(num_units)
    ]


def candidate_units(unit_nodes: list[str], dead: set[int], node_id: str | None) -> list[int]:
    """Units a writer on ``node_id`` may put to (its node's live units, else all live ones; None:
    all live ones). A sample goes to ``candidates[group_id % len(candidates)]``."""
    local = [u for u, node in enumerate(unit_nodes) if node == node_id and u not in dead]
    pool = local or [u for u in range(len(unit_nodes)) if u not in dead]
    if not pool:
        raise RuntimeError(
            f"datastore: all {len(unit_nodes)} storage units are dead; the store cannot take samples "
            "(restart the run from its last checkpoint)"
        )
    return pool
