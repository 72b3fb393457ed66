"""Weight sync into a live vLLM engine: trainer weights -> engine, against the floor of the same link.

``areal-like bench gpu_sync --shape 1.5b|7b --placement colocated|split [--repeats 5]``

The trainer side holds a random bf16 Qwen2 of the given shape (HF names, as a ZeRO-2 rank does); the
engine is our ``VLLMEngine`` on the same weights, kept busy with long requests while it syncs, as in
a run. One repetition is what the training loop waits for:
- colocated (1 GPU): the trainer's ``ReallocExecutor`` writes every tensor into the engine's staging
  arena (CUDA IPC, vLLM's fused layout), then the engine pauses, copies the arena into its
  parameters, resets its prefix cache / preempts running requests, and resumes.
  Floor: one device-to-device copy of the same bytes.
- split (2 GPUs, one process each): the engine core joins the plan's NCCL group; per repetition the
  trainer broadcasts 256 MiB buckets while the engine pauses, receives them into staging, loads and
  resumes. Floor: a plain NCCL broadcast of the same bytes in 256 MiB buckets between two fresh
  processes on the same two GPUs.
Prints a table; last line JSON with ``ratio`` = median sync seconds / median floor seconds (target <= 2)
and, with ``--verify``, whether the engine's weights hash equal to the trainer's (sha256).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import traceback

from areal_like.core.net import free_port
from benchmarks import device_copy_seconds, emit

BUCKET_MB = 256


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="areal-like bench gpu_sync", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1.5b", help="see benchmarks/_models.py, e.g. 7b")
    parser.add_argument("--placement", choices=["colocated", "split"], default="colocated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gpu-mem", type=float, default=0.45, help="vLLM gpu_memory_utilization")
    parser.add_argument("--busy", type=int, default=32, help="long requests generating during the syncs")
    parser.add_argument("--verify", action="store_true", help="sha256 of engine vs trainer weights")
    parser.add_argument("--eager", action="store_true", help="vLLM enforce_eager (no CUDA graphs)")
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    from benchmarks._models import random_model

    model_dir = random_model(args.shape, args.model_dir or tempfile.mkdtemp(), 4096)
    if args.placement == "colocated":
        result = _colocated(args, model_dir)
    else:
        result = _split(args, model_dir)
    sync, floor = statistics.median(result["sync_s"]), statistics.median(result["floor_s"])
    stopped = [p["engine_stopped"] for p in result.get("engine_swap_phases_s", []) if "engine_stopped" in p]
    if stopped:
        result["engine_stopped_median_ms"] = round(1e3 * statistics.median(stopped), 2)
    result.update(
        bench="gpu_sync",
        shape=args.shape,
        placement=args.placement,
        vllm_enforce_eager=args.eager,
        sync_median_s=round(sync, 5),
        floor_median_s=round(floor, 5),
        ratio=round(sync / floor, 3),
        gbytes=round(result["nbytes"] / 1e9, 3),
    )
    print(f"weight sync, {args.shape} ({result['gbytes']} GB bf16), {args.placement}, {args.repeats} repeats")
    print(f"  trainer -> vLLM engine (paused, loaded, resumed)  median {sync:.4f}s  all {result['sync_s']}")
    print(f"  floor ({result['floor']})  median {floor:.4f}s  all {result['floor_s']}")
    print(f"  sync / floor = {result['ratio']:.2f}x; weights verified: {result.get('verified')}")
    emit(result, args.out)
    return 0


def _plan(model_dir: str, hosts):
    from transformers import AutoConfig

    from areal_like.core.realloc import Qwen2Dims, SourceLayout, make_plan, vllm_destination

    dims = Qwen2Dims.from_config(AutoConfig.from_pretrained(model_dir, local_files_only=True))
    return make_plan(
        SourceLayout.replicated(dims.specs("bfloat16"), 1),
        vllm_destination(dims, "bfloat16", 1, 1),
        BUCKET_MB << 20,
        hosts=hosts,
    )


def _engine(args, model_dir: str):
    from rollout.config import VLLMConfig
    from rollout.vllm_engine import VLLMEngine

    config = VLLMConfig(enforce_eager=args.eager, gpu_memory_utilization=args.gpu_mem, max_model_len=4096)
    engine = VLLMEngine(model_dir, config, max_batch_size=max(args.busy, 1), seed=0)
    _keep_busy(engine, args.busy)
    return engine


def _keep_busy(engine, busy: int) -> int:
    """Top the engine up to ``busy`` long requests decoding (with CUDA graphs a 4000-token request
    ends within ~15 s, before the syncs would); returns how many run now."""
    from rollout.engine import SamplingParams

    running = engine.load().running_requests
    for i in range(running, busy):
        engine.submit([(7 * i + j) % 1000 for j in range(64)], SamplingParams(max_new_tokens=4000))
    return max(running, busy)


def _trainer_model(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, local_files_only=True)
    return model.to("cuda")


def _digest(model) -> str:
    from areal_like.core.digest import state_dict_digest

    return state_dict_digest(model.state_dict())


# ---- colocated: one process, one GPU ---------------------------------------------------------------
def _colocated(args, model_dir: str) -> dict:
    import torch

    from areal_like.core.realloc import ReallocConfig
    from areal_like.core.realloc.executor import ReallocExecutor
    from areal_like.core.realloc.ipc import open_ipc_staging
    from areal_like.core.realloc.sources import flat_sources

    trainer = _trainer_model(model_dir)
    plan = _plan(model_dir, hosts=(0,))
    engine = _engine(args, model_dir)
    arena = open_ipc_staging(plan, engine.make_arena(plan, 0))
    config = ReallocConfig(enabled=True, backend="nccl", placement="colocated", bucket_mb=BUCKET_MB)
    executor = ReallocExecutor(plan, 0, config, "127.0.0.1", free_port("127.0.0.1"))
    sources = flat_sources(trainer, 0, 1)
    sync_s, write_s, phases, running = [], [], [], []
    for rep in range(args.repeats + 1):
        running_now = _keep_busy(engine, args.busy)
        time.sleep(0.5)  # the new requests' prefill done: the swap lands on decoding requests
        torch.cuda.synchronize()
        start = time.perf_counter()
        executor.run(rep + 1, sources=sources, staging={0: arena})
        written = time.perf_counter()
        engine.load_staged(rep + 1)  # one engine-core call: the engine schedules on by itself
        if rep:  # the first one sets up the copy lists
            sync_s.append(round(time.perf_counter() - start, 5))
            write_s.append(round(written - start, 5))
            phases.append({k: round(v, 5) for k, v in engine.last_swap_s.items()})
            running.append(running_now)
    nbytes = sum(t.numel() * t.element_size() for t in arena.values())
    verified = engine.weights_digest() == _digest(trainer) if args.verify else None
    busy = engine.load()
    engine.close()  # frees the engine's memory (and its arena) before the floor's two buffers
    executor.close()
    del arena, sources
    floor_s = [round(t, 5) for t in device_copy_seconds(nbytes, args.repeats, "cuda")]
    return dict(
        gpu=torch.cuda.get_device_name(0),
        nbytes=nbytes,
        sync_s=sync_s,
        arena_write_s=write_s,
        engine_swap_phases_s=phases,
        floor_s=floor_s,
        floor="device-to-device copy",
        verified=verified,
        busy_requests_running=busy.running_requests,
        requests_running_at_each_swap=running,
    )


# ---- split: trainer on GPU 0, engine on GPU 1, floor peers on both ---------------------------------
def _split(args, model_dir: str) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    port, floor_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    to_trainer, to_engine, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    procs = []
    for gpu, target, queue in (
        (1, _engine_proc, to_engine),
        (0, _trainer_proc, to_trainer),
        (1, _floor_proc, None),
    ):
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
        proc = ctx.Process(target=target, args=(args, model_dir, port, floor_port, queue, results))
        proc.start()
        procs.append(proc)
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    got: dict = {}

    def expect(key: str, timeout_s: float = 1800.0):
        deadline = time.monotonic() + timeout_s
        while key not in got:
            role, name, value = results.get(timeout=max(1.0, deadline - time.monotonic()))
            if name == "error":
                raise RuntimeError(f"gpu_sync {role} process failed:\n{value}")
            got[name] = value
        return got[key]

    expect("engine_ready")
    expect("trainer_ready")
    sync_s, phases = [], []
    for rep in range(args.repeats + 1):
        to_engine.put(rep + 1)
        to_trainer.put(rep + 1)
        engine_s = expect(f"engine_{rep + 1}")
        trainer_s = expect(f"trainer_{rep + 1}")
        if rep:
            sync_s.append(round(max(engine_s, trainer_s), 5))
            phases.append({k: round(v, 5) for k, v in expect(f"phases_{rep + 1}").items()})
    to_engine.put(0)  # digest and close
    to_trainer.put(0)  # floor
    result = dict(
        gpu=expect("gpu"),
        nbytes=expect("nbytes"),
        sync_s=sync_s,
        floor_s=expect("floor_s"),
        floor=f"NCCL broadcast in {BUCKET_MB} MiB buckets, GPU 0 -> GPU 1",
        engine_swap_phases_s=phases,
    )
    if args.verify:
        result["verified"] = expect("engine_digest") == expect("trainer_digest")
    for proc in procs:
        proc.join(120)
    return result


def _engine_proc(args, model_dir, port, floor_port, commands, results) -> None:
    try:
        from areal_like.core.realloc import ReallocConfig

        engine = _engine(args, model_dir)
        plan = _plan(model_dir, hosts=None)
        config = ReallocConfig(enabled=True, backend="nccl", placement="split", bucket_mb=BUCKET_MB)
        engine.setup_realloc(plan, config, "127.0.0.1", port, 1, 0)
        results.put(("engine", "engine_ready", True))
        while (version := commands.get()) != 0:
            start = time.perf_counter()
            engine.receive_weights(version, timeout_s=600)
            results.put(("engine", f"engine_{version}", time.perf_counter() - start))
            results.put(("engine", f"phases_{version}", dict(engine.last_swap_s)))
        if args.verify:
            results.put(("engine", "engine_digest", engine.weights_digest()))
        engine.close()
    except Exception:
        results.put(("engine", "error", traceback.format_exc()))


def _trainer_proc(args, model_dir, port, floor_port, commands, results) -> None:
    try:
        import torch
        import torch.distributed as dist

        from areal_like.core.realloc import ReallocConfig
        from areal_like.core.realloc.executor import ReallocExecutor
        from areal_like.core.realloc.sources import flat_sources

        trainer = _trainer_model(model_dir)
        plan = _plan(model_dir, hosts=None)
        config = ReallocConfig(enabled=True, backend="nccl", placement="split", bucket_mb=BUCKET_MB)
        executor = ReallocExecutor(plan, 0, config, "127.0.0.1", port)
        sources = flat_sources(trainer, 0, 1)
        nbytes = sum(s.nbytes for s in plan.source.specs)
        results.put(("trainer", "gpu", torch.cuda.get_device_name(0)))
        results.put(("trainer", "nbytes", nbytes))
        results.put(("trainer", "trainer_ready", True))
        while (version := commands.get()) != 0:
            start = time.perf_counter()
            executor.run(version, sources=sources)
            results.put(("trainer", f"trainer_{version}", time.perf_counter() - start))
        if args.verify:
            results.put(("trainer", "trainer_digest", _digest(trainer)))
        _floor_group(floor_port, 0)
        results.put(("trainer", "floor_s", _floor_rounds(args.repeats, nbytes)))
        dist.destroy_process_group()
    except Exception:
        results.put(("trainer", "error", traceback.format_exc()))


def _floor_proc(args, model_dir, port, floor_port, commands, results) -> None:
    try:
        import torch.distributed as dist
        from transformers import AutoConfig

        from areal_like.core.realloc import Qwen2Dims

        dims = Qwen2Dims.from_config(AutoConfig.from_pretrained(model_dir, local_files_only=True))
        nbytes = sum(s.nbytes for s in dims.specs("bfloat16"))
        _floor_group(floor_port, 1)
        _floor_rounds(args.repeats, nbytes)
        dist.destroy_process_group()
    except Exception:
        results.put(("floor", "error", traceback.format_exc()))


def _floor_group(port: int, rank: int) -> None:
    import datetime

    import torch.distributed as dist

    dist.init_process_group(
        "nccl",
        init_method=f"tcp://127.0.0.1:{port}",
        world_size=2,
        rank=rank,
        timeout=datetime.timedelta(minutes=30),
    )


def _floor_rounds(repeats: int, nbytes: int) -> list[float]:
    """Broadcast ``nbytes`` from rank 0 in 256 MiB buckets; seconds per round (first one dropped)."""
    import torch
    import torch.distributed as dist

    flat = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    step = BUCKET_MB << 20
    times = []
    for rep in range(repeats + 1):
        dist.barrier()
        torch.cuda.synchronize()
        start = time.perf_counter()
        works = [dist.broadcast(flat[i : i + step], 0, async_op=True) for i in range(0, nbytes, step)]
        for work in works:
            work.wait()
        torch.cuda.synchronize()
        if rep:
            times.append(round(time.perf_counter() - start, 5))
    return times
