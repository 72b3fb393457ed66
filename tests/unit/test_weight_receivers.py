"""Weights through the reallocation plan, with no Ray: two plan members in two threads over gloo.

A trainer member sends; the other member receives into staging tensors (or an ``HFEngine``, which
hosts its own receiver). Rebuilding the group (a new port) leaves the old one first.
"""

from __future__ import annotations

import socket
import threading
import time

import torch

from areal_like.core.net import free_port
from areal_like.core.realloc import ReallocConfig, SourceLayout, hf_destination, make_plan
from areal_like.core.realloc.executor import ReallocExecutor
from areal_like.core.realloc.pack import allocate_staging
from areal_like.core.realloc.qwen2 import Qwen2Dims
from areal_like.core.realloc.synthetic import layout_sources, random_weights

HOST = "127.0.0.1"
DIMS = Qwen2Dims(
    vocab_size=21, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1
)
CONFIG = ReallocConfig(bucket_mb=16 / 1024, timeout_s=20, connect_timeout_s=20)


def _weights(version: int) -> dict[str, torch.Tensor]:
    return {n: t + 0.25 * version for n, t in random_weights(DIMS.specs("float32"), seed=3).items()}


class TrainerThread(threading.Thread):
    """Plan member 0: joins the group on each port in turn (rejoining) and sends one version on it."""

    def __init__(self, plan, ports: list[int]) -> None:
        super().__init__(daemon=True)
        self.plan, self.ports = plan, ports
        self.rejoin_s: list[float] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            executor = None
            for version, port in enumerate(self.ports, start=1):
                start = time.perf_counter()
                executor = ReallocExecutor.rejoin(executor, self.plan, 0, CONFIG, HOST, port)
                self.rejoin_s.append(time.perf_counter() - start)
                executor.run(version, sources=layout_sources(self.plan.source, _weights(version), 0))
            executor.close()
        except BaseException as e:  # noqa: BLE001 - reported to the test thread
            self.error = e


def _plan():
    return make_plan(
        SourceLayout.for_zero_stage(DIMS.specs("float32"), 1, 2), hf_destination(DIMS, "float32", 1), 16 << 10
    )


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def test_rejoining_leaves_the_old_group_and_the_next_transfer_runs_on_the_new_one():
    plan = _plan()
    ports = [free_port(HOST), free_port(HOST)]
    trainer = TrainerThread(plan, ports)
    trainer.start()
    staging = {0: allocate_staging(plan, 0)}
    first = ReallocExecutor.rejoin(None, plan, 1, CONFIG, HOST, ports[0])
    first.run(1, staging=staging)
    assert all(torch.equal(staging[0][n], t) for n, t in _weights(1).items())
    second = ReallocExecutor.rejoin(first, plan, 1, CONFIG, HOST, ports[1])
    second.run(2, staging=staging)
    second.close()
    trainer.join(60)
    assert trainer.error is None, trainer.error
    assert all(torch.equal(staging[0][n], t) for n, t in _weights(2).items())
    # Member 0 closes its old store once every member has left it (else it waits the full 2 s).
    assert trainer.rejoin_s[1] < 1.5, trainer.rejoin_s
    assert _port_is_free(ports[0])
