"""Real DeepSpeed ranks (ZeRO-2 and ZeRO-3 on gloo, one optimiser step taken) send their weights
through the realloc plan to an HFEngine process; the engine must equal the gathered weights."""

from __future__ import annotations

import datetime
import os
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from areal_like.core.net import free_port

NUM_RANKS = 2
STAGES = (2, 3)


def _trainer(rank: int, ds_port: int, ports: dict[int, int], tmp: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(ds_port),
        RANK=str(rank),
        WORLD_SIZE=str(NUM_RANKS),
        LOCAL_RANK="0",
    )
    import deepspeed

    from areal_like.core.models import ModelBuildConfig, make_model
    from areal_like.core.realloc import ReallocConfig, SourceLayout, hf_destination, make_plan
    from areal_like.core.realloc.executor import ReallocExecutor
    from areal_like.core.realloc.qwen2 import Qwen2Dims
    from areal_like.core.realloc.sources import flat_sources, tensor_specs

    deepspeed.init_distributed(
        "gloo", auto_mpi_discovery=False, verbose=False, timeout=datetime.timedelta(seconds=120)
    )
    for stage in STAGES:
        model, _ = make_model(ModelBuildConfig(seed=3))
        ds_config = {
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 1,
            "train_batch_size": 2 * NUM_RANKS,
            "zero_optimization": {"stage": stage},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
            "steps_per_print": 10**9,
        }
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
        ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(rank))
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        module = engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=stage == 3):
            expected = {n: p.detach().clone() for n, p in module.state_dict().items()}
        if rank == 0:
            torch.save(expected, os.path.join(tmp, f"expected_{stage}.pt"))
        specs = tensor_specs(module, "float32")
        assert specs == Qwen2Dims.from_config(module.config).specs("float32")
        plan = make_plan(
            SourceLayout.for_zero_stage(specs, NUM_RANKS, stage),
            hf_destination(Qwen2Dims.from_config(module.config), "float32", 1),
            32 * 1024,
        )
        executor = ReallocExecutor(
            plan, rank, ReallocConfig(bucket_mb=1 / 32, timeout_s=60), "127.0.0.1", ports[stage]
        )
        executor.run(stage, sources=flat_sources(module, rank, NUM_RANKS))
        executor.close()


def _engine(ports: dict[int, int], tmp: str, queue) -> None:
    from areal_like.core.models import ModelBuildConfig, make_model
    from areal_like.core.realloc import ReallocConfig, SourceLayout, hf_destination, make_plan
    from areal_like.core.realloc.executor import ReallocExecutor
    from areal_like.core.realloc.pack import allocate_staging
    from areal_like.core.realloc.qwen2 import Qwen2Dims
    from rollout.hf_engine import HFEngine

    engine = HFEngine(make_model(ModelBuildConfig(seed=0))[0])
    dims = Qwen2Dims.from_config(engine.model.config)
    for stage in STAGES:
        try:
            specs = dims.specs("float32")
            layout = SourceLayout.for_zero_stage(specs, NUM_RANKS, stage)
            plan = make_plan(layout, hf_destination(dims, "float32", 1), 32 * 1024)
            executor = ReallocExecutor(
                plan, NUM_RANKS, ReallocConfig(bucket_mb=1 / 32, timeout_s=60), "127.0.0.1", ports[stage]
            )
            staging = {0: allocate_staging(plan, 0)}
            stats = executor.run(stage, staging=staging)
            engine.update_weights(staging[0], stage)
            executor.close()
            expected = torch.load(os.path.join(tmp, f"expected_{stage}.pt"))
            state = engine.model.state_dict()
            queue.put(
                (stage, all(torch.equal(state[n], expected[n]) for n in expected), stats.received_bytes, "")
            )
        except Exception:
            queue.put((stage, False, 0, traceback.format_exc()))


def _main(index: int, ds_port: int, ports: dict[int, int], tmp: str, queue) -> None:
    torch.set_num_threads(1)
    if index < NUM_RANKS:
        _trainer(index, ds_port, ports, tmp)
    else:
        _engine(ports, tmp, queue)


@pytest.mark.slow
def test_deepspeed_zero2_and_zero3_ranks_fill_an_hf_engine_bit_for_bit(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    ports = {stage: free_port("127.0.0.1") for stage in STAGES}
    mp.start_processes(
        _main,
        args=(free_port("127.0.0.1"), ports, str(tmp_path), queue),
        nprocs=NUM_RANKS + 1,
        start_method="spawn",
    )
    results = {}
    while not queue.empty():
        stage, equal, received, error = queue.get()
        results[stage] = (equal, received, error)
    assert set(results) == set(STAGES)
    for stage, (equal, received, error) in results.items():
        assert not error, error
        assert equal, f"ZeRO-{stage}: engine weights differ from the gathered trainer weights"
        assert received > 0
