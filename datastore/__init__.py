"""The streaming store between rollout workers and trainer ranks.

A controller actor holds per-sample metadata (ready columns, versions, which task took it), N
storage-unit actors spread over the Ray nodes hold the arrays, and ``DataStoreClient`` talks to both
(see ``controller`` for the dataflow, ``index`` for the metadata and its costs, ``policies`` for the
sampling policies). Build one with ``make_datastore(config)``; pass the client to
any actor that needs it.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names below load on first use (PEP 562): ``datastore.config`` stays Ray-free
    from datastore.client import DataStoreClient
    from datastore.config import DataStoreConfig
    from datastore.policies import SAMPLING_POLICIES, make_sampling_policy
    from datastore.types import (
        BatchMeta,
        DataStoreSamplesLost,
        DataStoreTimeout,
        SampleMeta,
        SampleWrite,
        StoreStats,
    )

_LAZY = {
    "DataStoreClient": "datastore.client",
    "DataStoreConfig": "datastore.config",
    "SAMPLING_POLICIES": "datastore.policies",
    "make_sampling_policy": "datastore.policies",
    "BatchMeta": "datastore.types",
    "DataStoreSamplesLost": "datastore.types",
    "DataStoreTimeout": "datastore.types",
    "SampleMeta": "datastore.types",
    "SampleWrite": "datastore.types",
    "StoreStats": "datastore.types",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'datastore' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = [
    "BatchMeta",
    "DataStoreClient",
    "DataStoreConfig",
    "DataStoreSamplesLost",
    "DataStoreTimeout",
    "SAMPLING_POLICIES",
    "SampleMeta",
    "SampleWrite",
    "StoreStats",
    "make_datastore",
    "make_sampling_policy",
]

logger = logging.getLogger(__name__)

# How long make_datastore waits for its actors to come up before it fails naming them.
_STARTUP_TIMEOUT_S = 120.0


def make_datastore(config: DataStoreConfig) -> DataStoreClient:
    """Start ``config.num_storage_units`` units placed per ``config.placement`` and the controller
    on this node (all num_cpus=0 actors); return a client."""
    import ray

    from datastore.client import DataStoreClient
    from datastore.controller import DataStoreController
    from datastore.placement import on_this_node, start_units, use_loopback
    from datastore.types import DataStoreTimeout, StoreHandles

    secret = os.urandom(32)
    loopback = use_loopback(config.bind)
    units = start_units(config.num_storage_units, config.placement, secret, config.max_connections)
    controller_actor = ray.remote(num_cpus=0)(DataStoreController).options(scheduling_strategy=on_this_node())
    controller = controller_actor.remote(config, secret)  # starts while the units do
    try:
        unit_endpoints = ray.get([u.start_wire.remote(loopback) for u in units], timeout=_STARTUP_TIMEOUT_S)
        unit_nodes = ray.get([unit.node_id.remote() for unit in units], timeout=_STARTUP_TIMEOUT_S)
        controller_endpoint = ray.get(
            controller.start.remote(units, unit_nodes, unit_endpoints, loopback), timeout=_STARTUP_TIMEOUT_S
        )
    except Exception as err:
        for actor in (controller, *units):  # nothing half-started outlives the failure
            ray.kill(actor, no_restart=True)
        if isinstance(err, ray.exceptions.GetTimeoutError):
            raise DataStoreTimeout(
                f"datastore: controller and {config.num_storage_units} storage units did not start within "
                f"{_STARTUP_TIMEOUT_S:.0f}s (is the Ray cluster out of resources or memory?)"
            ) from err
        raise
    logger.info(
        "datastore: %d storage units on %d nodes (%s placement), listening on %s",
        len(units),
        len(set(unit_nodes)),
        config.placement,
        controller_endpoint.host,
    )
    handles = StoreHandles(controller, units, unit_nodes, controller_endpoint, unit_endpoints, secret)
    return DataStoreClient(config, handles)
