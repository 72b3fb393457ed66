"""Datastore configuration (no torch/ray imports: configs are data)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataStoreConfig:
    """The streaming store between rollout workers and trainer ranks."""

    num_storage_units: int = 2
    """Storage-unit actors holding the sample data; a group's samples live on one unit
    (chosen by group id). More units spread memory and read bandwidth (>= 2 x nodes on a cluster)."""
    capacity_samples: int = 100_000
    """Most samples held at once (written and not yet released or evicted). A put that would
    exceed it blocks (back-pressure on the writers) until a release or an eviction makes room."""
    put_timeout_s: float = 300.0
    """How long a put may block on a full store before it raises DataStoreTimeout."""
    get_timeout_s: float = 600.0
    """Default wait of a blocking get_batch_meta (timeout_s=None) before it raises DataStoreTimeout."""

    def __post_init__(self) -> None:
        if self.num_storage_units < 1:
            raise ValueError(f"datastore.num_storage_units={self.num_storage_units}: must be >= 1")
        if self.capacity_samples < 1:
            raise ValueError(
                f"datastore.capacity_samples={self.capacity_samples}: must be >= 1 "
                "(size it to a few training batches of samples)"
            )
        if self.put_timeout_s <= 0:
            raise ValueError(f"datastore.put_timeout_s={self.put_timeout_s}: must be > 0 seconds")
        if self.get_timeout_s <= 0:
            raise ValueError(f"datastore.get_timeout_s={self.get_timeout_s}: must be > 0 seconds")
