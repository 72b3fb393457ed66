"""Weight transfer over gloo between real processes: 2 trainer ranks -> 1 or 2 HFEngine processes.

One spawn of 4 processes (trainer ranks 0-1, engine processes 0-1) runs every scenario in turn,
each on its own realloc port, and reports per process; the tests below assert on the reports.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass

import pytest
import torch
import torch.multiprocessing as mp

from areal_like.core.net import free_port
from areal_like.core.realloc.qwen2 import Qwen2Dims

NUM_TRAINERS, NUM_ENGINE_PROCS = 2, 2
# The shapes of areal_like.core.models.ModelBuildConfig() (checked in the engine processes).
DIMS = Qwen2Dims(
    vocab_size=21, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2
)


@dataclass(frozen=True)
class Scenario:
    name: str
    zero_stage: int
    num_engines: int
    bucket_kib: float = 64
    checksum: bool = False
    versions: tuple[int, ...] = (1, 2)
    absent: tuple[str, ...] = ()
    """Processes that sit a version out: 'trainer1@2' skips version 2; 'engine1' never connects."""
    timeout_s: float = 20.0
    connect_timeout_s: float = 60.0


SCENARIOS = (
    Scenario("zero2_one_engine", 2, 1),
    Scenario("zero2_two_engines", 2, 2, checksum=True),
    Scenario("zero3_one_engine", 3, 1, bucket_kib=16),
    Scenario("zero3_two_engines", 3, 2, checksum=True),
    Scenario("absent_engine", 3, 2, versions=(1,), absent=("engine1",), connect_timeout_s=3.0),
    Scenario("trainer_stops_answering", 3, 2, absent=("trainer1@2",), timeout_s=3.0),
)


@dataclass
class Report:
    """What one process saw in one scenario."""

    scenario: str
    process: str
    ok: bool
    error: str = ""
    unresponsive: tuple[str, ...] = ()
    version: int | None = None
    """Engine processes: the engine's version after the scenario."""
    weights_equal: dict | None = None
    """Engine processes: version -> engine weights equal the trainer's bit for bit."""
    final_weights_version: int | None = None
    """Engine processes: the version whose weights the engine holds at the end."""
    seconds: float = 0.0


def _weights(base: dict[str, torch.Tensor], version: int) -> dict[str, torch.Tensor]:
    """The trainer's weights at ``version``: distinct per version, identical on every process."""
    return {n: t + 0.25 * version for n, t in base.items()}


def _worker(index: int, ports: dict[str, int], queue) -> None:
    torch.set_num_threads(1)
    from areal_like.core.realloc import ReallocConfig, SourceLayout, hf_destination, make_plan
    from areal_like.core.realloc.executor import ReallocExecutor
    from areal_like.core.realloc.group import ReallocError
    from areal_like.core.realloc.pack import allocate_staging
    from areal_like.core.realloc.synthetic import layout_sources, random_weights

    is_trainer = index < NUM_TRAINERS
    who = f"trainer{index}" if is_trainer else f"engine{index - NUM_TRAINERS}"
    specs = DIMS.specs("float32")
    base = random_weights(specs, seed=11)
    initial = None
    if not is_trainer:  # only engine processes pay for transformers
        from areal_like.core.models import ModelBuildConfig, make_model
        from rollout.hf_engine import HFEngine

        initial = make_model(ModelBuildConfig(seed=0))[0].state_dict()
        assert {n: tuple(t.shape) for n, t in initial.items() if n != "lm_head.weight"} == {
            s.name: s.shape for s in specs
        }, "DIMS must match ModelBuildConfig's defaults"

    for sc in SCENARIOS:
        if not is_trainer and index - NUM_TRAINERS >= sc.num_engines or who in sc.absent:
            continue
        report = Report(sc.name, who, ok=True)
        t0 = time.perf_counter()
        layout = SourceLayout.for_zero_stage(specs, NUM_TRAINERS, sc.zero_stage)
        dest = hf_destination(DIMS, "float32", sc.num_engines)
        plan = make_plan(layout, dest, int(sc.bucket_kib * 1024), checksum=sc.checksum)
        config = ReallocConfig(
            bucket_mb=sc.bucket_kib / 1024,
            timeout_s=sc.timeout_s,
            connect_timeout_s=sc.connect_timeout_s,
            checksum=sc.checksum,
        )
        # Trainer ranks are members 0..1; engine e is member 2 + e, i.e. its process index.
        executor = ReallocExecutor(plan, index, config, "127.0.0.1", ports[sc.name])
        engine = staging = None
        if not is_trainer:
            engine = HFEngine(make_model(ModelBuildConfig(seed=0))[0], engine_id=index - NUM_TRAINERS)
            staging = {index - NUM_TRAINERS: allocate_staging(plan, index - NUM_TRAINERS)}
            report.weights_equal = {}
        try:
            for version in sc.versions:
                if f"{who}@{version}" in sc.absent:
                    continue
                if is_trainer:
                    executor.run(version, sources=layout_sources(layout, _weights(base, version), index))
                    continue
                executor.run(version, staging=staging)
                engine.update_weights(staging[index - NUM_TRAINERS], version)
                state = engine.model.state_dict()
                expected = _weights(base, version)
                report.weights_equal[version] = all(torch.equal(state[n], expected[n]) for n in expected)
        except ReallocError as e:
            report.ok, report.error, report.unresponsive = False, str(e), tuple(e.unresponsive)
        except Exception:
            report.ok, report.error = False, traceback.format_exc()
        if engine is not None:
            report.version = engine.version
            state = engine.model.state_dict()
            for v in (0, *sc.versions):
                weights = _weights(base, v) if v else initial
                if all(torch.equal(state[n], weights[n]) for n in base):
                    report.final_weights_version = v
        executor.close()
        report.seconds = time.perf_counter() - t0
        queue.put(report)


@pytest.fixture(scope="module")
def reports() -> dict[tuple[str, str], Report]:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    ports = {sc.name: free_port("127.0.0.1") for sc in SCENARIOS}
    started = time.perf_counter()
    mp.start_processes(
        _worker, args=(ports, queue), nprocs=NUM_TRAINERS + NUM_ENGINE_PROCS, start_method="spawn"
    )
    out = {}
    while not queue.empty():
        r = queue.get()
        out[(r.scenario, r.process)] = r
    print(f"realloc gloo scenarios: {time.perf_counter() - started:.1f}s, {len(out)} reports")
    for key, r in sorted(out.items()):
        print(key, f"{r.seconds:.2f}s")
    return out


def _engines(reports, scenario: str) -> list[Report]:
    return [r for (s, _), r in sorted(reports.items()) if s == scenario and r.process.startswith("engine")]


@pytest.mark.parametrize(
    "scenario", ["zero2_one_engine", "zero2_two_engines", "zero3_one_engine", "zero3_two_engines"]
)
def test_engines_hold_the_trainers_weights_bit_for_bit_after_each_version(reports, scenario):
    sc = next(s for s in SCENARIOS if s.name == scenario)
    every = [r for (s, _), r in reports.items() if s == scenario]
    assert len(every) == NUM_TRAINERS + sc.num_engines
    assert all(r.ok for r in every), [r.error for r in every if not r.ok]
    engines = _engines(reports, scenario)
    assert [r.weights_equal for r in engines] == [{1: True, 2: True}] * sc.num_engines
    assert all(r.version == 2 for r in engines)


def test_a_member_that_never_connects_is_named_by_everyone_waiting_for_it(reports):
    waiting = [r for (s, _), r in reports.items() if s == "absent_engine"]
    assert {r.process for r in waiting} == {"trainer0", "trainer1", "engine0"}
    for r in waiting:
        assert not r.ok
        assert "did not arrive" in r.error and "engine 1" in r.error, r.error
        assert r.unresponsive == ("member 3 (engine 1 tp 0)",)
    engine0 = reports[("absent_engine", "engine0")]
    assert engine0.version == 0 and engine0.final_weights_version == 0


def test_a_trainer_that_stops_answering_leaves_engines_on_the_previous_version(reports):
    engines = _engines(reports, "trainer_stops_answering")
    assert len(engines) == 2
    for r in engines:
        assert not r.ok
        assert "version 2" in r.error and "trainer rank 1: not arrived for version 2" in r.error, r.error
        assert "trainer rank 1" in r.unresponsive
        assert r.weights_equal == {1: True}
        assert r.version == 1 and r.final_weights_version == 1  # old weights, not half-loaded
