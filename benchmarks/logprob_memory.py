"""``areal-like bench logprob_memory``: peak CPU memory of the trainer's log-prob + entropy step at a
real vocabulary, chunked (``trainer.algorithms.token_logprobs_and_entropy``) against the unchunked
path it replaced (one fp32 log-softmax over the whole micro-batch).

Each variant runs in a fresh spawned process, one after another: it fills logits [tokens, V] (the
model's output, bf16 by default as on GPU) a slice at a time, reads its resident set size, then runs
the forward (log-probs of the target tokens, entropy without gradient) and the backward of a
weighted sum, and reads the high-water mark of its resident set (``ru_maxrss``). The figure is
that peak minus the resident size before the step, so the logits themselves are not counted but
their gradient is. Only one process runs at a time; the unchunked path needs several GB (a few
[tokens, V] fp32 tensors). Prints a table and, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

QWEN_VOCAB = 151_936


def unchunked_logprobs_and_entropy(logits, tokens, temperature: float):
    """The previous trainer path: fp32 log-softmax over every position at once (kept for autograd)."""
    import torch

    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    logprobs = torch.log_softmax(z, dim=-1)
    chosen = logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(logprobs.exp() * logprobs).sum(-1)
    return chosen, entropy


def _rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _measure(variant: str, args: argparse.Namespace, out) -> None:
    import resource

    import torch

    from trainer.algorithms import token_logprobs_and_entropy

    torch.set_num_threads(args.threads)
    dtype = dict(bf16=torch.bfloat16, fp32=torch.float32)[args.dtype]
    gen = torch.Generator().manual_seed(0)
    logits = torch.empty(args.tokens, args.vocab, dtype=dtype)
    for start in range(0, args.tokens, 64):  # filled a slice at a time: no full-size temporary
        rows = logits[start : start + 64]
        rows.copy_(torch.randn(rows.shape, generator=gen) * 4)
    logits.requires_grad_()
    tokens = torch.randint(0, args.vocab, (args.tokens,), generator=gen)
    weights = torch.randn(args.tokens, generator=gen)
    before = _rss_bytes()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    if variant == "unchunked":
        logp, entropy = unchunked_logprobs_and_entropy(logits, tokens, args.temperature)
    else:
        chunk = int(variant.removeprefix("chunked-"))
        logp, entropy = token_logprobs_and_entropy(logits, tokens, args.temperature, chunk_tokens=chunk)
    (logp * weights).sum().backward()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert maxrss_before <= before + (64 << 20), "set-up peaked above the step's baseline"
    out.put(
        dict(
            variant=variant,
            peak_extra_mb=round((peak - before) / 2**20, 1),
            logits_mb=round(logits.numel() * logits.element_size() / 2**20, 1),
            seconds=round(seconds, 3),
            logp_sum=float(logp.detach().double().sum()),
            entropy_mean=float(entropy.double().mean()),
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="areal-like bench logprob_memory")
    parser.add_argument("--tokens", type=int, default=2048, help="positions of the micro-batch")
    parser.add_argument("--vocab", type=int, default=QWEN_VOCAB, help="vocabulary size V")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="dtype of the logits")
    parser.add_argument("--chunks", type=int, nargs="+", default=[256, 1024, 2048], help="chunk sizes to run")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--out", default=None, help="also write the JSON result here")
    args = parser.parse_args(argv)

    from benchmarks import emit

    ctx = mp.get_context("spawn")
    rows = []
    for variant in ["unchunked"] + [f"chunked-{c}" for c in args.chunks]:
        queue = ctx.Queue()
        proc = ctx.Process(target=_measure, args=(variant, args, queue))
        proc.start()
        rows.append(queue.get(timeout=1800))
        proc.join(timeout=60)
        row = rows[-1]
        print(
            f"[bench logprob_memory] {variant:>14}: peak +{row['peak_extra_mb']:8.1f} MB over the logits "
            f"({row['logits_mb']:.0f} MB), {row['seconds']:.2f} s",
            flush=True,
        )
    base = rows[0]
    for row in rows[1:]:
        assert abs(row["logp_sum"] - base["logp_sum"]) <= 1e-4 * abs(base["logp_sum"]), row
    fp32_full_mb = args.tokens * args.vocab * 4 / 2**20
    result = dict(
        bench="logprob_memory",
        device="cpu",
        tokens=args.tokens,
        vocab=args.vocab,
        logits_dtype=args.dtype,
        temperature=args.temperature,
        threads=args.threads,
        fp32_tokens_by_vocab_mb=round(fp32_full_mb, 1),
        **{f"{r['variant']}_peak_extra_mb": r["peak_extra_mb"] for r in rows},
        **{f"{r['variant']}_seconds": r["seconds"] for r in rows},
        # peak of each chunked run as a fraction of the unchunked path's
        **{
            f"{r['variant']}_vs_unchunked": round(r["peak_extra_mb"] / base["peak_extra_mb"], 3)
            for r in rows[1:]
        },
    )
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
