"""Shared test builders. Tests run on CPU with a local Ray instance."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole test session (2 logical CPUs, no dashboard)."""
    import ray

    if not ray.is_initialized():
        # address="local": always a fresh instance, never a cluster another test left registered
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, log_to_driver=True, configure_logging=False
        )
    yield ray
    ray.shutdown()
