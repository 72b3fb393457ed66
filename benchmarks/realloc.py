"""``areal-like bench realloc``: the realloc plan executor against the floor of the same link.

Processes (spawned, one per member): N trainer ranks holding a Qwen2-shaped synthetic model (whole,
or as ZeRO-3 flat partitions) and M x tp engine ranks receiving it (``--backend gloo`` on CPU or
``nccl``, one GPU per process). In the same run, the same bytes go once more as a plain
single-buffer broadcast from trainer rank 0 to every engine process: the floor on this link.
``--backend ipc``: colocated placement, N trainer ranks each writing into the CUDA IPC staging
arena of an engine process on its GPU; the floor is one device-to-device copy of the same bytes.
Every repetition starts at a store barrier; its time is the slowest member's. Engines check what
they received against the synthetic weights bit for bit. ``--dry-run`` prints the plan only.

Prints a table, then one JSON line whose ``ratio`` is plan seconds / floor seconds (target <= 2).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.multiprocessing as mp

from areal_like.core.net import free_port
from areal_like.core.realloc import ReallocConfig, SourceLayout, hf_destination, make_plan, vllm_destination
from areal_like.core.realloc.ipc import colocated_hosts
from areal_like.core.realloc.plan import Plan
from areal_like.core.realloc.qwen2 import Qwen2Dims, dims_for_bytes
from benchmarks import device_copy_seconds

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


@dataclass
class MemberResult:
    """One spawned process's timings (seconds per repetition) and verification."""

    index: int
    role: str
    plan_s: list[float]
    floor_s: list[float]
    verified: bool | None
    """Engines: received weights equal the synthetic ones bit for bit (None on trainer ranks)."""
    error: str = ""


def main(argv: list[str]) -> int:
    args = _parse(argv)
    dims = dims_for_bytes(int(args.size_mb * 1e6), DTYPE_BYTES[args.dtype])
    plan = _plan(args, dims)
    if args.dry_run:
        print(plan.format())
        print(json.dumps({"bench": "realloc", "dry_run": True, **_plan_json(plan)}))
        return 0
    results = _spawn(args, plan)
    return _report(args, plan, dims, results)


# ---- set-up ----------------------------------------------------------------------------------------
def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="areal-like bench realloc", description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=["gloo", "nccl", "ipc"], default="gloo")
    p.add_argument("--trainers", type=int, default=2, help="trainer ranks (senders)")
    p.add_argument("--engines", type=int, default=2, help="engines (replicas)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per engine (vLLM names when > 1)")
    p.add_argument(
        "--zero", type=int, choices=[0, 1, 2, 3], default=3, help="ZeRO stage of the trainer ranks"
    )
    p.add_argument(
        "--naming", choices=["hf", "vllm"], default=None, help="engine names (default: hf, vllm if tp > 1)"
    )
    p.add_argument("--size-mb", type=float, default=100.0, help="model size in MB (1e6 bytes) in --dtype")
    p.add_argument(
        "--dtype", choices=list(DTYPE_BYTES), default=None, help="wire dtype (float32 CPU, bfloat16 GPU)"
    )
    p.add_argument("--bucket-mb", type=float, default=None, help="bucket MiB (default 16 gloo, 256 GPU)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions after one warm-up")
    p.add_argument("--checksum", action="store_true", help="checksum every bucket")
    p.add_argument("--timeout-s", type=float, default=300.0)
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan (bytes per link, buckets, senders) only"
    )
    args = p.parse_args(argv)
    on_gpu = args.backend != "gloo"
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    args.bucket_mb = args.bucket_mb or (256.0 if on_gpu else 16.0)
    args.naming = args.naming or ("vllm" if args.tp > 1 else "hf")
    if args.naming == "hf" and args.tp > 1:
        p.error("--tp > 1 needs --naming vllm (the HF engine has no tensor parallelism)")
    if args.repeats < 1 or args.trainers < 1 or args.engines < 1:
        p.error("--repeats, --trainers and --engines must be >= 1")
    if args.backend == "ipc" and args.engines * args.tp != args.trainers:
        p.error("--backend ipc (colocated) needs engines x tp == trainers: one engine rank per trainer GPU")
    return args


def _plan(args: argparse.Namespace, dims: Qwen2Dims) -> Plan:
    specs = dims.specs(args.dtype)
    source = SourceLayout.for_zero_stage(specs, args.trainers, args.zero)
    if args.naming == "vllm":
        dest = vllm_destination(dims, args.dtype, args.engines, args.tp)
    else:
        dest = hf_destination(dims, args.dtype, args.engines)
    hosts = colocated_hosts(args.trainers, dest.num_ranks) if args.backend == "ipc" else None
    return make_plan(source, dest, int(args.bucket_mb * (1 << 20)), hosts=hosts, checksum=args.checksum)


def _plan_json(plan: Plan) -> dict:
    s = plan.summary()
    return {
        "wire_bytes": s.wire_bytes,
        "local_bytes": s.local_bytes,
        "delivered_bytes": s.delivered_bytes,
        "buckets": s.num_buckets,
        "groups": s.num_groups,
        "senders": len(s.sender_bytes),
    }


def _num_procs(args: argparse.Namespace) -> int:
    return args.trainers + args.engines * args.tp


def _spawn(args: argparse.Namespace, plan: Plan) -> list[MemberResult]:
    nprocs = _num_procs(args)
    if args.backend != "gloo" and torch.cuda.device_count() < (
        args.trainers if args.backend == "ipc" else nprocs
    ):
        raise SystemExit(
            f"--backend {args.backend} with {nprocs} processes needs "
            f"{args.trainers if args.backend == 'ipc' else nprocs} GPUs; {torch.cuda.device_count()} visible"
        )
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory(prefix="realloc-bench-") as tmp:
        mp.start_processes(
            _member, args=(args, free_port("127.0.0.1"), tmp, queue), nprocs=nprocs, start_method="spawn"
        )
        results = []
        while not queue.empty():
            results.append(queue.get())
    return sorted(results, key=lambda r: r.index)


# ---- one spawned process -----------------------------------------------------------------------------
def _member(index: int, args: argparse.Namespace, port: int, tmp: str, queue) -> None:
    import traceback

    torch.set_num_threads(1)
    role = "trainer" if index < args.trainers else "engine"
    try:
        if args.backend == "ipc":
            result = _ipc_member(index, args, port, tmp)
        else:
            result = _split_member(index, args, port)
    except Exception:
        result = MemberResult(index, role, [], [], False, traceback.format_exc())
    queue.put(result)


def _setup(index: int, args: argparse.Namespace):
    from areal_like.core.realloc.synthetic import random_weights

    device = torch.device("cpu")
    if args.backend != "gloo":
        gpu = index % args.trainers if args.backend == "ipc" else index
        torch.cuda.set_device(gpu)
        device = torch.device("cuda", gpu)
    dims = dims_for_bytes(int(args.size_mb * 1e6), DTYPE_BYTES[args.dtype])
    plan = _plan(args, dims)
    weights = random_weights(
        list(plan.source.specs), seed=17, dtype=getattr(torch, args.dtype), device=device
    )
    return device, plan, weights


def _split_member(index: int, args: argparse.Namespace, port: int) -> MemberResult:
    from areal_like.core.realloc.executor import ReallocExecutor
    from areal_like.core.realloc.pack import allocate_staging
    from areal_like.core.realloc.synthetic import expected_engine_tensors, layout_sources

    device, plan, weights = _setup(index, args)
    config = ReallocConfig(
        backend="nccl" if args.backend == "nccl" else "gloo",
        bucket_mb=args.bucket_mb,
        timeout_s=args.timeout_s,
        checksum=args.checksum,
    )
    executor = ReallocExecutor(plan, index, config, "127.0.0.1", port)
    floor_group = (0, *range(plan.source.num_ranks, plan.num_members))
    executor.group.connect([*plan.groups(), floor_group])
    is_trainer = index < plan.source.num_ranks
    sources = layout_sources(plan.source, weights, index) if is_trainer else None
    hosted = plan.hosted_by(index)
    staging = {e: allocate_staging(plan, e, device) for e in hosted}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    plan_s = []
    for rep in range(args.repeats + 1):
        _barrier(executor.group, f"plan{rep}", plan.num_members)
        start = time.perf_counter()
        executor.run(rep + 1, sources=sources, staging=staging)
        sync()
        plan_s.append(time.perf_counter() - start)
    verified = None
    if hosted:
        verified = all(
            torch.equal(staging[e][name], tensor)
            for e in hosted
            for name, tensor in expected_engine_tensors(plan, weights, e).items()
        )

    floor_s = []
    flat = torch.zeros(plan.summary().wire_bytes, dtype=torch.uint8, device=device)
    for rep in range(args.repeats + 1):
        _barrier(executor.group, f"floor{rep}", plan.num_members)
        start = time.perf_counter()
        if index in floor_group:
            executor.group.pg(floor_group).broadcast(flat, 0).wait()
            sync()
        floor_s.append(time.perf_counter() - start if index in floor_group else 0.0)
    _barrier(executor.group, "end", plan.num_members)
    executor.close()
    return MemberResult(index, "trainer" if is_trainer else "engine", plan_s[1:], floor_s[1:], verified)


def _ipc_member(index: int, args: argparse.Namespace, port: int, tmp: str) -> MemberResult:
    from areal_like.core.realloc.executor import ReallocExecutor
    from areal_like.core.realloc.ipc import IpcArena, open_ipc_staging
    from areal_like.core.realloc.synthetic import expected_engine_tensors, layout_sources

    device, plan, weights = _setup(index, args)
    num_trainers = plan.source.num_ranks
    if index >= num_trainers:  # the engine process: owns the arena, checks it at the end
        engine_rank = index - num_trainers
        arena = IpcArena(plan, engine_rank, device)
        _write(os.path.join(tmp, f"handle{engine_rank}.pkl"), arena.handle())
        _wait_file(os.path.join(tmp, "done"), args.timeout_s)
        expected = expected_engine_tensors(plan, weights, engine_rank)
        verified = all(torch.equal(arena.views[n], t) for n, t in expected.items())
        return MemberResult(index, "engine", [], [], verified)

    hosted = plan.hosted_by(index)
    staging = {}
    for e in hosted:
        handle = _wait_file(os.path.join(tmp, f"handle{e}.pkl"), args.timeout_s)
        staging[e] = open_ipc_staging(plan, handle)
    config = ReallocConfig(
        backend="nccl", placement="colocated", bucket_mb=args.bucket_mb, timeout_s=args.timeout_s
    )
    executor = ReallocExecutor(plan, index, config, "127.0.0.1", port)
    sources = layout_sources(plan.source, weights, index)
    plan_s = []
    for rep in range(args.repeats + 1):
        _barrier(executor.group, f"plan{rep}", num_trainers)
        start = time.perf_counter()
        executor.run(rep + 1, sources=sources, staging=staging)
        plan_s.append(time.perf_counter() - start)
    # Floor: one device-to-device copy of the bytes an engine rank receives.
    nbytes = sum(
        t.numel() * t.element_size() for t in {id(v): v for v in staging[hosted[0]].values()}.values()
    )
    floor_s = device_copy_seconds(nbytes, args.repeats, device)  # warm-up copy already left out
    # Unmap the engines' arenas before they may exit (CUDA IPC: the producer outlives consumers);
    # close() drops the executor's views and returns on member 0 once every trainer has closed.
    del staging
    torch.cuda.synchronize()
    executor.close()
    if index == 0:
        open(os.path.join(tmp, "done"), "w").close()
    return MemberResult(index, "trainer", plan_s[1:], floor_s, None)


def _barrier(group, name: str, num_members: int) -> None:
    """All members meet on the realloc store (no process group needed)."""
    store = group.store
    store.add(f"bench/{name}", 1)
    deadline = time.monotonic() + group.timeout.total_seconds()
    while int(store.add(f"bench/{name}", 0)) < num_members:
        if time.monotonic() > deadline:
            raise TimeoutError(f"bench barrier {name!r}: not every member arrived")
        time.sleep(0.001)


def _write(path: str, obj) -> None:
    with open(path + ".tmp", "wb") as f:
        pickle.dump(obj, f)
    os.replace(path + ".tmp", path)


def _wait_file(path: str, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"bench: {path} did not appear within {timeout_s}s")
        time.sleep(0.01)
    if path.endswith(".pkl"):
        with open(path, "rb") as f:
            return pickle.load(f)
    return None


# ---- report ------------------------------------------------------------------------------------------
def _report(args: argparse.Namespace, plan: Plan, dims: Qwen2Dims, results: list[MemberResult]) -> int:
    errors = [r for r in results if r.error]
    if errors or len(results) != _num_procs(args):
        for r in errors:
            print(f"process {r.index} ({r.role}) failed:\n{r.error}")
        print(json.dumps({"bench": "realloc", "error": f"{len(errors)} process(es) failed", "ok": False}))
        return 1
    timed = [r for r in results if r.plan_s]
    plan_reps = [max(r.plan_s[i] for r in timed) for i in range(args.repeats)]
    floor_reps = [max(r.floor_s[i] for r in timed) for i in range(args.repeats)]
    plan_s, floor_s = statistics.median(plan_reps), statistics.median(floor_reps)
    summary = plan.summary()
    if args.backend == "ipc":
        nbytes = summary.delivered_bytes // plan.dest.num_ranks
        floor_name = "device copy, 1 buffer (floor)"
    else:
        nbytes = summary.wire_bytes
        floor_name = "flat broadcast, 1 buffer (floor)"
    verified = all(r.verified for r in results if r.verified is not None)
    model_bytes = sum(s.nbytes for s in plan.source.specs)
    print(
        f"realloc bench ({args.backend}): {args.trainers} trainer rank(s) ZeRO-{args.zero} -> "
        f"{args.engines} engine(s) x tp {args.tp} ({args.naming} names); Qwen2-shaped "
        f"{model_bytes / 1e6:.1f} MB {args.dtype} (hidden {dims.hidden_size}, {dims.num_layers} layers, "
        f"{len(plan.source.specs)} tensors); buckets {args.bucket_mb:g} MiB; median of {args.repeats} "
        "after 1 warm-up"
    )
    plan_name = f"plan executor ({summary.num_buckets} buckets, {len(summary.sender_bytes) or 1} senders)"
    rows = [(plan_name, plan_s, min(plan_reps)), (floor_name, floor_s, min(floor_reps))]
    print(f"{'path':<46} {'bytes':>14} {'seconds':>9} {'GB/s':>8} {'best s':>9}")
    for name, seconds, best in rows:
        print(f"{name:<46} {nbytes:>14,} {seconds:>9.4f} {nbytes / seconds / 1e9:>8.3f} {best:>9.4f}")
    verdict = "yes" if verified else "NO"
    print(f"plan / floor: {plan_s / floor_s:.2f}x the seconds; engines verified bit for bit: {verdict}")
    record = {
        "bench": "realloc",
        "backend": args.backend,
        "device": torch.cuda.get_device_name(0) if args.backend != "gloo" else "cpu",
        "trainers": args.trainers,
        "zero": args.zero,
        "engines": args.engines,
        "tp": args.tp,
        "naming": args.naming,
        "dtype": args.dtype,
        "bucket_mb": args.bucket_mb,
        "bytes": nbytes,
        "plan_s": round(plan_s, 6),
        "plan_gbps": round(nbytes / plan_s / 1e9, 4),
        "floor_s": round(floor_s, 6),
        "floor_gbps": round(nbytes / floor_s / 1e9, 4),
        "verified": verified,
        **_plan_json(plan),
        "ratio": round(plan_s / floor_s, 4),
    }
    print(json.dumps(record))
    return 0 if verified else 1
