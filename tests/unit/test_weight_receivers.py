"""Weights through the reallocation plan, with no Ray: two plan members in two threads over gloo.

A trainer member sends; the other member receives into staging tensors (or an ``HFEngine``, which
hosts its own receiver). Rebuilding the group (a new port) leaves the old one first.
"""

from __future__ import annotations

import copy
import socket
import threading
import time

import pytest
import torch

from areal_like.core.models import ModelBuildConfig, make_model
from areal_like.core.net import free_port
from areal_like.core.realloc import ReallocConfig, SourceLayout, make_plan
from areal_like.core.realloc.executor import ReallocExecutor
from areal_like.core.realloc.group import ReallocError
from areal_like.core.realloc.pack import allocate_staging
from areal_like.core.realloc.qwen2 import Qwen2Dims
from areal_like.core.realloc.synthetic import layout_sources, random_weights
from rollout.engine import EngineConfig, SamplingParams, make_engine, plan_destination

HOST = "127.0.0.1"
MODEL = ModelBuildConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1)
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
            executor.close(wait_s=0.5)  # an engine holds its last group until it is killed
        except BaseException as e:  # noqa: BLE001 - reported to the test thread
            self.error = e


def _plan():
    """Trainer rank 0 (ZeRO-2) -> one HF engine, in the layout the HF engine kind reports."""
    engine = EngineConfig(type="hf")
    source = SourceLayout.for_zero_stage(DIMS.specs(engine.weights_dtype), 1, 2)
    return make_plan(source, plan_destination(engine, DIMS, 1), 16 << 10)


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        # SO_REUSEADDR: closed connections left in TIME_WAIT do not count, a listening store does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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


@pytest.fixture(scope="module")
def tiny_model():
    model, _ = make_model(MODEL)
    assert Qwen2Dims.from_config(model.config) == DIMS
    return model


def test_the_hf_engine_receives_through_the_plan_and_again_after_a_rebuild(tiny_model):
    engine = make_engine(EngineConfig(type="hf"), model=copy.deepcopy(tiny_model))
    plan = _plan()
    ports = [free_port(HOST), free_port(HOST)]
    trainer = TrainerThread(plan, ports)
    trainer.start()
    try:
        for version, port in enumerate(ports, start=1):  # the second join rebuilds on a new port
            engine.setup_realloc(plan, CONFIG, HOST, port, member=1, engine_rank=0)
            stats = engine.receive_weights(version, timeout_s=30)
            assert engine.version == version and stats["version"] == version
            state = engine.model.state_dict()
            assert all(torch.equal(state[n], t) for n, t in _weights(version).items())
            assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
        trainer.join(60)
        assert trainer.error is None, trainer.error
        out = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=2, stop_token_ids=()), timeout_s=60)
        assert out[0].versions == [2, 2]
    finally:
        engine.close()


def test_a_failed_transfer_leaves_the_hf_engine_on_its_weights(tiny_model):
    engine = make_engine(EngineConfig(type="hf"), model=copy.deepcopy(tiny_model))
    before = {n: t.clone() for n, t in engine.model.state_dict().items()}
    config = ReallocConfig(bucket_mb=16 / 1024, timeout_s=1, connect_timeout_s=1)
    engine.setup_realloc(_plan(), config, HOST, free_port(HOST), member=1, engine_rank=0)  # no trainer
    with pytest.raises(ReallocError, match="did not arrive|could not reach"):
        engine.receive_weights(1, timeout_s=5)
    assert engine.version == 0
    assert all(torch.equal(t, before[n]) for n, t in engine.model.state_dict().items())
    engine.close()
