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
GPU only. Last line: JSON with ``ours_over_raw`` (target >= 0.97).
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time

import numpy as np

from benchmarks import emit


def lognormal_lengths(n: int, median: int, cap: int, seed: int, sigma: float = 1.0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(min(max(round(median * np.exp(sigma * z)), 1), cap)) for z in rng.standard_normal(n)]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="areal-like bench gpu_rollout", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1.5b", help="model shape (benchmarks/_models.py)")
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--median", type=int, default=1024, help="median forced response length")
    parser.add_argument("--cap", type=int, default=6144, help="longest response")
    parser.add_argument("--eager", action="store_true", help="enforce_eager (no CUDA graphs) for both")
    parser.add_argument("--stream-intervals", default="16", help="comma-separated; ours runs once per value")
    parser.add_argument("--gpu-mem", type=float, default=0.85)
    parser.add_argument("--model-dir", default=None, help="reuse/keep the random model here")
    parser.add_argument("--out", default=None, help="also write the JSON result to this file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    from benchmarks._models import SHAPES, random_qwen2
    from rollout import vllm_adapter as adapter
    from rollout.config import VLLMConfig
    from rollout.engine import SamplingParams

    model_dir = random_qwen2(args.shape, args.model_dir or tempfile.mkdtemp(), args.prompt_len + args.cap + 8)
    vocab = SHAPES[args.shape]["vocab_size"]
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(0, vocab, args.prompt_len).tolist() for _ in range(args.requests)]
    lengths = lognormal_lengths(args.requests, args.median, args.cap, args.seed + 1)
    total = sum(lengths)
    config = VLLMConfig(
        enforce_eager=args.eager,
        gpu_memory_utilization=args.gpu_mem,
        max_model_len=args.prompt_len + args.cap + 8,
        enable_prefix_caching=False,
    )
    ours_params = [SamplingParams(max_new_tokens=n, temperature=1.0) for n in lengths]

    # Raw vLLM: the offline engine, whole batch at once.
    start = time.perf_counter()
    llm = adapter.start_offline_llm(model_dir, config, max_num_seqs=args.requests, seed=args.seed)
    raw_start_s = time.perf_counter() - start
    raw_params = [
        adapter.sampling_params(p, seed=args.seed + i, stream=False) for i, p in enumerate(ours_params)
    ]
    adapter.offline_generate(llm, prompts[:8], raw_params[:8])  # warm-up
    start = time.perf_counter()
    raw = adapter.offline_generate(llm, prompts, raw_params)
    raw_s = time.perf_counter() - start
    raw_tokens = sum(len(d.token_ids) for d in raw)
    adapter.shutdown_offline(llm)
    del llm
    gc.collect()
    torch.cuda.empty_cache()

    # Ours: the rollout engine (AsyncLLM client, streamed deltas, versions, handles).
    from dataclasses import replace

    from rollout.vllm_engine import VLLMEngine

    ours = []
    for interval in [int(v) for v in args.stream_intervals.split(",")]:
        start = time.perf_counter()
        engine = VLLMEngine(
            model_dir, replace(config, stream_interval=interval), max_batch_size=args.requests, seed=args.seed
        )
        start_s = time.perf_counter() - start
        engine.generate(prompts[:8], ours_params[:8], timeout_s=600)  # warm-up
        start = time.perf_counter()
        outs = engine.generate(prompts, ours_params, timeout_s=3600)
        ours_s = time.perf_counter() - start
        engine.close()
        del engine
        gc.collect()
        tokens = sum(len(o.response_ids) for o in outs)
        assert tokens == total, (tokens, total)
        ours.append(
            dict(
                stream_interval=interval,
                tokens_per_s=round(total / ours_s, 1),
                seconds=round(ours_s, 3),
                start_s=round(start_s, 1),
                over_raw=round(raw_s / ours_s, 4),
            )
        )
        print(f"  ours, stream_interval {interval}: {total / ours_s:.0f} tok/s = {raw_s / ours_s:.3f} x raw")
    ours_s = ours[-1]["seconds"]
    ours_start_s = ours[-1]["start_s"]

    assert raw_tokens == total, (raw_tokens, total)
    result = {
        "bench": "gpu_rollout",
        "gpu": torch.cuda.get_device_name(0),
        "shape": args.shape,
        "requests": args.requests,
        "prompt_len": args.prompt_len,
        "lengths": {"median": args.median, "sigma": 1.0, "cap": args.cap, "mean": total / args.requests},
        "enforce_eager": args.eager,
        "generated_tokens": total,
        "raw_tokens_per_s": round(total / raw_s, 1),
        "ours_tokens_per_s": round(total / ours_s, 1),
        "raw_s": round(raw_s, 3),
        "ours_s": round(ours_s, 3),
        "raw_start_s": round(raw_start_s, 1),
        "ours_start_s": round(ours_start_s, 1),
        "ours_over_raw": round(raw_s / ours_s, 4),
        "ours_by_stream_interval": ours,
    }
    print(
        f"rollout overhead, {args.shape}, {args.requests} requests, {total} tokens "
        f"(median {args.median}, cap {args.cap})"
    )
    print(f"  raw LLM.generate   {result['raw_tokens_per_s']:>10.0f} tok/s  ({raw_s:.1f}s)")
    print(f"  ours (VLLMEngine)  {result['ours_tokens_per_s']:>10.0f} tok/s  ({ours_s:.1f}s)")
    print(f"  ours / raw = {result['ours_over_raw']:.3f}")
    emit(result, args.out)
    return 0
