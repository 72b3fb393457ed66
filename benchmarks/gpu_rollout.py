"""Rollout overhead: generated tokens/s through our ``VLLMEngine`` vs raw vLLM ``LLM.generate``.

``areal-like bench gpu_rollout [--shape 1.5b --requests 512 --prompt-len 256 --median 1024 --cap 6144]``

Same model (random Qwen2 weights at a realistic shape), same engine settings, same requests: random
prompt token ids and response lengths forced to a lognormal mix (median ``--median``, sigma 1, capped
at ``--cap``) with ``ignore_eos`` and per-request ``max_tokens``. The baseline submits the whole
batch to the offline ``LLM.generate``; ours submits every request through the rollout Protocol
(``submit`` -> streamed token deltas stamped with versions and log-probs -> ``RequestHandle``) on the
AsyncLLM client, as a rollout worker does. Engines run one after the other on the same GPU, each
timed from the first request to the last token (engine start-up excluded and reported apart).
``--stream-intervals 1,16`` runs ours once per ``rollout.vllm.stream_interval`` (tokens per output
delta the client handles), each on a fresh engine; ``ours_over_raw`` is that of the last one.
``--mixes 256:256:1024,1024:1024:8192`` runs several workloads (requests:median:cap) on the same
engines (one start each; ``max_num_seqs`` and ``max_model_len`` fit the largest). ``--repeats N``
runs every workload N times on each engine; ratios are of the median seconds. Every run records the
CPU seconds of the client (raw: the calling thread, which runs ``LLM.generate``'s loop; ours: the
AsyncLLM client's thread plus the submitting thread; the offline engine's output thread is not
counted, so raw's figure is low) and of the engine-core processes, each also as a share of the wall
time: a client near 1.0 is the bottleneck. ``--together`` keeps both engines up at once (each with
``--gpu-mem``) and alternates their runs, so that a machine whose speed drifts between runs (seen:
the same raw batch in 13.9 s and 20.7 s) slows both alike; ``over_raw_each`` pairs the runs.
``--profile`` adds one profiled run of ours per workload (not timed) and reports the client's
heaviest functions (cProfile; Python >= 3.12 profiles every thread of the process, older versions
the client's thread).
GPU only. Last line: JSON with ``ours_over_raw`` per mix and ``ours_over_raw_min`` (target >= 0.97).
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from functools import partial

import numpy as np

from benchmarks import emit


def lognormal_lengths(n: int, median: int, cap: int, seed: int, sigma: float = 1.0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(min(max(round(median * np.exp(sigma * z)), 1), cap)) for z in rng.standard_normal(n)]


def parse_mixes(text: str) -> list[tuple[int, int, int]]:
    """``"256:256:1024,1024:1024:8192"`` -> [(requests, median, cap), ...]."""
    mixes = []
    for part in text.split(","):
        fields = part.strip().split(":")
        if len(fields) != 3 or not all(f.isdigit() and int(f) > 0 for f in fields):
            raise SystemExit(f"--mixes: {part!r} is not requests:median:cap (positive integers)")
        requests, median, cap = (int(f) for f in fields)
        mixes.append((requests, median, cap))
    return mixes


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="areal-like bench gpu_rollout", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1.5b", help="model shape (benchmarks/_models.py)")
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--median", type=int, default=1024, help="median forced response length")
    parser.add_argument("--cap", type=int, default=6144, help="longest response")
    parser.add_argument(
        "--mixes", default=None,
        help="several workloads on the same two engines: requests:median:cap,... (overrides the three above)",
    )  # fmt: skip
    parser.add_argument("--eager", action="store_true", help="enforce_eager (no CUDA graphs) for both")
    parser.add_argument("--stream-intervals", default="16", help="comma-separated; ours runs once per value")
    parser.add_argument("--repeats", type=int, default=1, help="runs of every workload on each engine")
    parser.add_argument("--profile", action="store_true", help="one extra profiled run of ours per workload")
    parser.add_argument(
        "--together", action="store_true",
        help="both engines up at once (each --gpu-mem), runs alternating; the last stream interval only",
    )  # fmt: skip
    parser.add_argument(
        "--gpu-mem", type=float, default=0.85, help="each engine's share (--together: <= 0.45)"
    )
    parser.add_argument("--model-dir", default=None, help="reuse/keep the random model here")
    parser.add_argument("--out", default=None, help="also write the JSON result to this file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    mixes = parse_mixes(args.mixes) if args.mixes else [(args.requests, args.median, args.cap)]
    intervals = [int(v) for v in args.stream_intervals.split(",")]
    if args.repeats < 1:
        raise SystemExit(f"--repeats {args.repeats}: at least 1")
    if args.together and (len(intervals) > 1 or args.gpu_mem > 0.45):
        raise SystemExit(
            "--together: one --stream-intervals value and --gpu-mem <= 0.45 (two engines share the GPU)"
        )

    import cProfile
    import statistics
    import sys

    import torch

    from benchmarks._cpu_usage import RunCPU, measured, top_functions
    from benchmarks._models import random_model, vocab_size
    from rollout import vllm_adapter as adapter
    from rollout.config import VLLMConfig
    from rollout.engine import SamplingParams

    longest = args.prompt_len + max(cap for _, _, cap in mixes) + 8
    model_dir = random_model(args.shape, args.model_dir or tempfile.mkdtemp(), longest)
    vocab = vocab_size(args.shape)
    workloads = []
    for i, (requests, median, cap) in enumerate(mixes):
        rng = np.random.default_rng(args.seed + 100 * i)
        prompts = [rng.integers(0, vocab, args.prompt_len).tolist() for _ in range(requests)]
        lengths = lognormal_lengths(requests, median, cap, args.seed + 100 * i + 1)
        workloads.append((prompts, lengths))
    max_seqs = max(requests for requests, _, _ in mixes)
    config = VLLMConfig(
        enforce_eager=args.eager,
        gpu_memory_utilization=args.gpu_mem,
        max_model_len=longest,
        enable_prefix_caching=False,
    )

    from dataclasses import replace

    from rollout.vllm_engine import VLLMEngine

    def sampled(lengths: list[int]) -> list[SamplingParams]:
        return [SamplingParams(max_new_tokens=n, temperature=1.0) for n in lengths]

    def start_raw() -> tuple[object, float]:
        """Raw vLLM: the offline engine, each whole batch at once."""
        start = time.perf_counter()
        llm = adapter.start_offline_llm(model_dir, config, max_num_seqs=max_seqs, seed=args.seed)
        seconds = time.perf_counter() - start
        raw_limits.update(adapter.batch_limits(llm))
        warm = [
            adapter.sampling_params(SamplingParams(max_new_tokens=8, temperature=1.0), stream=False)
            for _ in range(8)
        ]
        adapter.offline_generate(llm, workloads[0][0][:8], warm)
        return llm, seconds

    def run_raw(llm: object, i: int) -> RunCPU:
        prompts, lengths = workloads[i]
        params = [
            adapter.sampling_params(p, seed=args.seed + j, stream=False)
            for j, p in enumerate(sampled(lengths))
        ]
        raw, run = measured(partial(adapter.offline_generate, llm, prompts, params), time.thread_time)
        assert sum(len(d.token_ids) for d in raw) == sum(lengths)
        rate, busy = sum(lengths) / run.seconds, run.client_cpu_s / run.seconds
        print(f"  raw, {len(prompts)} requests: {rate:.0f} tok/s (client busy {busy:.2f})", flush=True)
        return run

    def start_ours(interval: int) -> VLLMEngine:
        """Ours: the rollout engine (AsyncLLM client, streamed deltas, versions, handles)."""
        start = time.perf_counter()
        engine = VLLMEngine(
            model_dir, replace(config, stream_interval=interval), max_batch_size=max_seqs, seed=args.seed
        )
        ours_start[interval] = dict(
            total_s=round(time.perf_counter() - start, 1),
            engine_s=round(engine.start_seconds, 1),
            warmup_s=round(engine.warmup_seconds, 2),
            **engine.batch_limits,
        )
        engine.generate(workloads[0][0][:8], SamplingParams(max_new_tokens=8, temperature=1.0), timeout_s=600)
        return engine

    def run_ours(engine: VLLMEngine, interval: int, i: int) -> RunCPU:
        prompts, lengths = workloads[i]

        def client_cpu() -> float:
            return engine.on_client_thread(time.thread_time) + time.thread_time()

        outs, run = measured(partial(engine.generate, prompts, sampled(lengths), timeout_s=3600), client_cpu)
        tokens = sum(len(o.response_ids) for o in outs)
        assert tokens == sum(lengths), (tokens, sum(lengths))
        rate, busy = tokens / run.seconds, run.client_cpu_s / run.seconds
        print(
            f"  ours, stream_interval {interval}, {len(prompts)} requests: {rate:.0f} tok/s "
            f"(client busy {busy:.2f})",
            flush=True,
        )
        return run

    def profile_ours(engine: VLLMEngine) -> None:
        for prompts, lengths in workloads:
            profile = cProfile.Profile()
            engine.on_client_thread(profile.enable)
            engine.generate(prompts, sampled(lengths), timeout_s=3600)
            engine.on_client_thread(profile.disable)
            profiles.append(top_functions(profile, 25))

    raw_limits: dict[str, int] = {}
    raw_runs: list[list[RunCPU]] = [[] for _ in workloads]
    ours_runs: dict[int, list[list[RunCPU]]] = {v: [[] for _ in workloads] for v in intervals}
    ours_start: dict[int, dict] = {}
    profiles: list[list[dict]] = []
    if args.together:
        # Both engines up at once, runs alternating (raw first on even repeats, ours first on odd):
        # a machine that drifts slows both alike.
        interval = intervals[-1]
        llm, raw_start_s = start_raw()
        engine = start_ours(interval)
        for rep in range(args.repeats):
            for i in range(len(workloads)):
                if rep % 2 == 0:
                    raw_runs[i].append(run_raw(llm, i))
                    ours_runs[interval][i].append(run_ours(engine, interval, i))
                else:
                    ours_runs[interval][i].append(run_ours(engine, interval, i))
                    raw_runs[i].append(run_raw(llm, i))
        if args.profile:
            profile_ours(engine)
        engine.close()
        adapter.shutdown_offline(llm)
    else:
        llm, raw_start_s = start_raw()
        for _ in range(args.repeats):
            for i in range(len(workloads)):
                raw_runs[i].append(run_raw(llm, i))
        adapter.shutdown_offline(llm)
        del llm
        gc.collect()
        torch.cuda.empty_cache()
        for interval in intervals:
            engine = start_ours(interval)
            for _ in range(args.repeats):
                for i in range(len(workloads)):
                    ours_runs[interval][i].append(run_ours(engine, interval, i))
            if args.profile and interval == intervals[-1]:
                profile_ours(engine)
            engine.close()
            del engine
            gc.collect()

    def median_s(runs: list[RunCPU]) -> float:
        return statistics.median(r.seconds for r in runs)

    results = []
    for i, ((requests, median, cap), (_, lengths)) in enumerate(zip(mixes, workloads, strict=True)):
        total = sum(lengths)
        raw_s = median_s(raw_runs[i])
        by_interval = [
            dict(
                stream_interval=v,
                tokens_per_s=round(total / median_s(ours_runs[v][i]), 1),
                seconds=round(median_s(ours_runs[v][i]), 3),
                over_raw=round(raw_s / median_s(ours_runs[v][i]), 4),
                over_raw_each=[
                    round(r.seconds / o.seconds, 4) for r, o in zip(raw_runs[i], ours_runs[v][i], strict=True)
                ],
                runs=[o.as_dict() for o in ours_runs[v][i]],
            )
            for v in intervals
        ]
        results.append(
            dict(
                requests=requests,
                lengths={"median": median, "sigma": 1.0, "cap": cap, "mean": round(total / requests, 1)},
                generated_tokens=total,
                raw_tokens_per_s=round(total / raw_s, 1),
                raw_s=round(raw_s, 3),
                raw_runs=[r.as_dict() for r in raw_runs[i]],
                ours_by_stream_interval=by_interval,
                ours_over_raw=by_interval[-1]["over_raw"],
                **({"client_profile": profiles[i]} if profiles else {}),
            )
        )
    result = {
        "bench": "gpu_rollout",
        "gpu": torch.cuda.get_device_name(0),
        "shape": args.shape,
        "prompt_len": args.prompt_len,
        "enforce_eager": args.eager,
        "max_num_seqs": max_seqs,
        "repeats": args.repeats,
        "together": args.together,
        "python": sys.version.split()[0],
        "raw_start_s": round(raw_start_s, 1),
        "raw_batch_limits": raw_limits,
        "ours_start": ours_start,
        "mixes": results,
        "ours_over_raw_min": min(r["ours_over_raw"] for r in results),
    }
    mode = "eager" if args.eager else "CUDA graphs"
    print(f"rollout overhead, {args.shape}, prompt {args.prompt_len}, {mode}")
    print(
        f"{'requests':>9}{'median':>8}{'cap':>6}{'tokens':>10}{'raw tok/s':>11}"
        + "".join(f"{'ours@' + str(v):>11}{'ratio':>7}" for v in intervals)
    )
    for r in results:
        row = f"{r['requests']:>9}{r['lengths']['median']:>8}{r['lengths']['cap']:>6}"
        row += f"{r['generated_tokens']:>10}{r['raw_tokens_per_s']:>11.0f}"
        row += "".join(
            f"{o['tokens_per_s']:>11.0f}{o['over_raw']:>7.3f}" for o in r["ours_by_stream_interval"]
        )
        print(row)
    emit(result, args.out)
    return 0
