"""Datastore configuration (no torch/ray imports: configs are data)."""

from __future__ import annotations

from dataclasses import dataclass

PLACEMENTS = ("spread", "ray_default")
BINDS = ("auto", "loopback", "node")


@dataclass
class DataStoreConfig:
    """The streaming store between rollout workers and trainer ranks."""

    num_storage_units: int = 2
    """Storage-unit actors holding the sample data. A writer puts to a unit on its own node when
    there is one (else any live unit), choosing among them by group id, so a group written by one
    worker lives on one unit. More units spread memory and read bandwidth (>= 2 x nodes on a cluster)."""
    placement: str = "spread"
    """Where units start: 'spread' deals them round robin over the cluster's alive nodes (pinned
    with node affinity), 'ray_default' lets Ray's default scheduler choose."""
    sampling_policy: str = "oldest_first"
    """Which ready groups a get_batch_meta call takes when it names no policy: 'oldest_first'
    (FIFO) or 'freshest_first' (newest policy version first); see datastore.policies."""
    capacity_samples: int = 100_000
    """Most samples held at once (written and not yet released or evicted). A put that would
    exceed it blocks (back-pressure on the writers) until a release or an eviction makes room."""
    put_timeout_s: float = 300.0
    """How long a put may block on a full store before it raises DataStoreTimeout."""
    get_timeout_s: float = 600.0
    """Default wait of a blocking get_batch_meta (timeout_s=None) before it raises DataStoreTimeout."""
    health_check_interval_s: float = 5.0
    """How often the controller pings every unit; a dead one has its samples marked lost within
    about this long even when no client touches it."""
    bind: str = "auto"
    """Where the store's actors listen: 'auto' (the loopback address when the Ray cluster has one node
    at start, else the node's address), 'loopback', or 'node' (for a cluster that grows later)."""
    max_connections: int = 1024
    """Most connections one store actor holds (each writer or reader thread keeps one per actor); one
    more is closed at once. Connections that do not authenticate within 5 s are closed."""

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
        if self.health_check_interval_s <= 0:
            raise ValueError(
                f"datastore.health_check_interval_s={self.health_check_interval_s}: must be > 0 seconds"
            )
        if self.bind not in BINDS:
            raise ValueError(f"datastore.bind={self.bind!r}: choose one of {list(BINDS)}")
        if self.max_connections < 1:
            raise ValueError(f"datastore.max_connections={self.max_connections}: must be >= 1")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"datastore.placement={self.placement!r}: choose one of {list(PLACEMENTS)}")
        from datastore.policies import SAMPLING_POLICIES

        if self.sampling_policy not in SAMPLING_POLICIES:
            raise ValueError(
                f"datastore.sampling_policy={self.sampling_policy!r}: "
                f"choose one of {sorted(SAMPLING_POLICIES)}"
            )
