"""The streaming store between rollout workers and trainer ranks.

A controller actor holds per-sample metadata (ready columns, versions, which task took it), N
storage-unit actors hold the arrays, and ``DataStoreClient`` talks to both (see ``controller`` for
the dataflow). Build one with ``make_datastore(config)``; pass the client to any actor that needs it.
"""

from __future__ import annotations

from datastore.client import DataStoreClient
from datastore.config import DataStoreConfig
from datastore.types import BatchMeta, DataStoreTimeout, SampleMeta, SampleWrite, StoreStats

__all__ = [
    "BatchMeta",
    "DataStoreClient",
    "DataStoreConfig",
    "DataStoreTimeout",
    "SampleMeta",
    "SampleWrite",
    "StoreStats",
    "make_datastore",
]

# How long make_datastore waits for its actors to come up before it fails naming them.
_STARTUP_TIMEOUT_S = 120.0


def make_datastore(config: DataStoreConfig) -> DataStoreClient:
    """Start the controller and ``config.num_storage_units`` units (num_cpus=0 actors); return a client.

    Units land wherever Ray puts them for now; spreading them over nodes (and writing to the
    writer's node-local unit) comes with the multi-node placement.
    """
    import ray

    from datastore.controller import DataStoreController
    from datastore.storage_unit import StorageUnit

    unit_actor = ray.remote(num_cpus=0)(StorageUnit)
    units = [unit_actor.remote(i) for i in range(config.num_storage_units)]
    controller = ray.remote(num_cpus=0)(DataStoreController).remote(config, units)
    try:
        pings = [unit.num_samples.remote() for unit in units] + [controller.stats.remote()]
        ray.get(pings, timeout=_STARTUP_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError as err:
        raise DataStoreTimeout(
            f"datastore: controller and {config.num_storage_units} storage units did not start within "
            f"{_STARTUP_TIMEOUT_S:.0f}s (is the Ray cluster out of resources or memory?)"
        ) from err
    return DataStoreClient(config, controller, units)
