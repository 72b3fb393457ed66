"""Trainer micro-batching: trained tokens/s of padded vs packed micro-batches on a long-tailed mix.

``areal-like bench trainer [--num-seqs 256 --budget 4096 --hidden 128 --layers 2 --repeats 2]``
``areal-like bench trainer --shape 1.5b --grad-ckpt --budget 16384`` (GPU: a Qwen2.5-1.5B-shaped model)

The same sequences (85% short, 15% long responses, as RL rollouts are) go through a forward,
the token log-probs and a backward pass of a fresh Qwen2 model, laid out three ways:
  padded-fixed:  fixed-count micro-batches in arrival order, padded to their longest (the naive way)
  padded-budget: token-budget micro-batches of length-sorted sequences (little padding left)
  packed-budget: token-budget micro-batches packed without padding (position ids restart); with sdpa
                 rows are as long as the longest sequence (a dense block-diagonal mask per row)
  packed-flex:   (GPU) the same micro-batches as one row each (padded to the budget: one shape) under
                 flex-attention, whose block mask skips the blocks between sequences (the kernel
                 compiles during the warm-up)
Tokens/s counts real tokens only; padding is reported as a fraction of the positions computed. It
also prints how evenly the mix splits over 8 data-parallel ranks (Karmarkar-Karp vs dealing).
On a GPU it reports model FLOPs utilisation: useful FLOPs (6 x matmul parameters x real tokens, plus
causal attention 6 x layers x q-width x sum of squared sequence lengths; recomputation under
gradient checkpointing not counted) over seconds x the GPU's dense bf16 peak (H100/H200: 989 TFLOP/s).
The pass is forward, log-probs and backward (no optimizer step, which is O(params), not O(tokens)).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from benchmarks import emit
from trainer.algorithms import token_logprobs
from trainer.batch import MicroBatch, SequenceSample, collate, collate_micro_batch
from trainer.packing import balanced_partition, imbalance, plan_micro_batches


def long_tailed_samples(num: int, vocab: int, seed: int) -> list[SequenceSample]:
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(num):
        prompt_len = int(rng.integers(8, 33))
        long = rng.random() < 0.15
        response_len = int(rng.integers(256, 1025)) if long else int(rng.integers(16, 65))
        samples.append(
            SequenceSample(
                rng.integers(3, vocab, prompt_len),
                rng.integers(3, vocab, response_len),
                np.zeros(response_len, dtype=np.float32),
                np.zeros(response_len, dtype=np.int64),
            )
        )
    return samples


def layouts(
    samples: list[SequenceSample], budget: int, fixed_size: int, attn: str, flex: bool = False
) -> dict[str, list[MicroBatch]]:
    lengths = [s.length for s in samples]
    arrival = list(range(len(samples)))
    packed = [mb for mb in plan_micro_batches(lengths, budget, fixed_size, packed=True) if mb]
    out = {
        "padded-fixed": [
            collate(samples, arrival[i : i + fixed_size]) for i in range(0, len(arrival), fixed_size)
        ],
        "padded-budget": [
            collate(samples, mb) for mb in plan_micro_batches(lengths, budget, fixed_size, packed=False) if mb
        ],
        "packed-budget": [collate_micro_batch(samples, mb, True, attn, 0) for mb in packed],
    }
    if flex:  # one row per micro-batch, every row `budget` wide: one shape, flex compiles once
        out["packed-flex"] = [
            collate_micro_batch(samples, mb, True, "flex_attention", 0, budget) for mb in packed
        ]
    return out


def useful_flops(config, lengths: list[int]) -> float:
    """Model FLOPs of forward + backward over sequences of ``lengths`` (see the module docstring)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv, inter = config.num_attention_heads * hd, config.num_key_value_heads * hd, config.intermediate_size
    matmul_params = layers * (h * q + 2 * h * kv + q * h + 3 * h * inter) + h * config.vocab_size
    return 6.0 * matmul_params * sum(lengths) + 6.0 * layers * q * sum(n * n for n in lengths)


def peak_flops(device) -> float | None:
    """Dense bf16 peak of the GPU (None on CPU or an unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return 989e12 if ("H100" in name or "H200" in name) else None


def full_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The path the chunked one replaced: one fp32 log-softmax over the whole micro-batch [N, T, V]."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


LOGPROB_PATHS = {"chunked": token_logprobs, "full": full_logprobs}


class LayerCalls:
    """Counts forward calls of every decoder layer of ``module``, recomputes included (a pre-hook:
    torch's checkpoint stops a recompute once it has the saved tensors, before forward hooks run).
    Under gradient checkpointing the backward runs each layer's forward again: 2 calls per layer and
    micro-batch instead of 1."""

    def __init__(self, module) -> None:
        from transformers.modeling_layers import GradientCheckpointingLayer

        self.count = 0
        self.layers = [m for m in module.modules() if isinstance(m, GradientCheckpointingLayer)]
        for layer in self.layers:
            layer.register_forward_pre_hook(self._hook)

    def _hook(self, *_) -> None:
        self.count += 1


def time_pass(model, micro_batches: list[MicroBatch], device, logprobs=token_logprobs) -> float:
    start = time.perf_counter()
    for micro in micro_batches:
        micro = micro.to(device)
        logp = logprobs(model(**micro.model_inputs()).logits, micro.targets)
        (-(logp * micro.loss_mask).sum() / max(micro.num_loss_tokens, 1)).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def summarise(context: dict, results: dict[str, dict], samples: list[SequenceSample]) -> dict:
    """The JSON line: per-layout figures, the best packed layout against both padded ones (when
    measured), and how evenly the mix splits over 8 ranks (dealt vs Karmarkar-Karp)."""
    lengths = [s.length for s in samples]
    dealt = [sum(lengths[r::8]) for r in range(8)]
    kk = [sum(lengths[i] for i in p) for p in balanced_partition(lengths, 8, "kk")]
    summary = dict(context)
    summary.update({f"{name}_tokens_per_s": round(r["tokens_per_s"], 1) for name, r in results.items()})
    summary.update({f"{name}_pad_frac": round(r["pad_frac"], 4) for name, r in results.items()})
    summary.update({f"{name}_mfu": round(r["mfu"], 4) for name, r in results.items() if r["mfu"] is not None})
    summary.update(
        {
            f"{name}_peak_gib": round(r["peak_gib"], 2)
            for name, r in results.items()
            if r["peak_gib"] is not None
        }
    )
    summary["layer_forwards_per_micro_batch"] = sorted(
        {r["layer_forwards_per_micro_batch"] for r in results.values()}
    )
    packed = [n for n in results if n.startswith("packed") and "+" not in n]
    if packed:
        best = max(packed, key=lambda n: results[n]["tokens_per_s"])
        summary["best_packed"] = best
        for padded in ("padded-fixed", "padded-budget"):
            if padded in results:
                ratio = results[best]["tokens_per_s"] / results[padded]["tokens_per_s"]
                summary[f"packed_vs_{padded.replace('-', '_')}"] = round(ratio, 3)
    summary["rank_imbalance_8_dealt"] = round(imbalance(dealt), 4)
    summary["rank_imbalance_8_kk"] = round(imbalance(kk), 4)
    return summary


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="areal-like bench trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--num-seqs", type=int, default=256, help="sequences in the batch")
    parser.add_argument("--budget", type=int, default=4096, help="max_tokens_per_micro_batch")
    parser.add_argument("--fixed-size", type=int, default=32, help="sequences per padded-fixed micro-batch")
    parser.add_argument("--hidden", type=int, default=128, help="model hidden size")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per layout (best is kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", default=None, help="benchmarks/_models.py, e.g. 1.5b")
    parser.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    parser.add_argument("--no-flex", action="store_true", help="skip the flex-attention layout (GPU)")
    parser.add_argument(
        "--logprobs", default="chunked",
        help="comma-separated log-prob paths, each timed on every layout: chunked (the trainer's) and full "
        "(one fp32 log-softmax over the micro-batch, the path it replaced)",
    )  # fmt: skip
    parser.add_argument("--out", default=None, help="also write the JSON line to this file")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from areal_like.core.models import ModelBuildConfig, build_model

    torch.set_num_threads(args.threads)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    attn = "sdpa"
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            attn = "flash_attention_2"
        except ImportError:
            pass
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        if args.shape:
            from benchmarks._models import random_model

            path = random_model(args.shape, f"{tmp}/model", 2048)
        else:
            build = ModelBuildConfig(
                hidden_size=args.hidden,
                intermediate_size=2 * args.hidden,
                num_layers=args.layers,
                num_heads=4,
                num_kv_heads=2,
                max_position_embeddings=2048,
            )
            path = build_model(build, f"{tmp}/model")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn).to(device)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable()
    model.train()
    layer_calls = LayerCalls(model)
    paths = [p.strip() for p in args.logprobs.split(",")]
    unknown = [p for p in paths if p not in LOGPROB_PATHS]
    if unknown:
        raise SystemExit(f"--logprobs: unknown path(s) {unknown}; known: {sorted(LOGPROB_PATHS)}")
    samples = long_tailed_samples(args.num_seqs, vocab=model.config.vocab_size, seed=args.seed)
    real_tokens = sum(s.length for s in samples)
    peak = peak_flops(device)
    results: dict[str, dict] = {}
    flex = device.type == "cuda" and not args.no_flex
    context = dict(
        bench="trainer",
        device=device.type,
        attn=attn,
        num_seqs=args.num_seqs,
        real_tokens=real_tokens,
        budget=args.budget,
        shape=args.shape,
        grad_ckpt=args.grad_ckpt,
        gpu=torch.cuda.get_device_name(0) if device.type == "cuda" else None,
    )
    for layout, micro_batches in layouts(samples, args.budget, args.fixed_size, attn, flex).items():
        model.set_attn_implementation("flex_attention" if layout == "packed-flex" else attn)
        for path in paths:
            name = layout if path == paths[0] else f"{layout}+{path}"
            logprobs = LOGPROB_PATHS[path]
            time_pass(model, micro_batches[:2], device, logprobs)  # warm-up (and compile, for flex)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            calls_before = layer_calls.count
            seconds = min(time_pass(model, micro_batches, device, logprobs) for _ in range(args.repeats))
            passes = args.repeats * len(micro_batches) * len(layer_calls.layers)
            layer_forwards = (layer_calls.count - calls_before) / passes
            peak_gb = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            print(f"[bench trainer] {name}: {seconds:.2f}s per pass, peak {peak_gb} GiB", flush=True)
            slots = sum(m.num_slots for m in micro_batches)
            results[name] = dict(
                tokens_per_s=real_tokens / seconds,
                seconds=seconds,
                micro_batches=len(micro_batches),
                pad_frac=1.0 - real_tokens / slots,
                mfu=useful_flops(model.config, [s.length for s in samples]) / seconds / peak
                if peak
                else None,
                peak_gib=peak_gb,
                layer_forwards_per_micro_batch=layer_forwards,
            )
            if args.out:  # what is measured so far survives a run cut short (a slow compile, a timeout)
                emit(summarise(context, results, samples), args.out, quiet=True)

    lengths = [s.length for s in samples]
    summary = summarise(context, results, samples)
    print(
        f"trainer micro-batching on {device.type} ({attn}), {args.num_seqs} sequences, {real_tokens} tokens, "
        f"lengths {min(lengths)}-{max(lengths)} (median {int(np.median(lengths))}), budget {args.budget}"
    )
    print(
        f"{'layout':<20}{'tokens/s':>12}{'seconds':>10}{'micro':>8}{'padding':>10}{'MFU':>8}{'peak GiB':>10}"
    )
    for name, r in results.items():
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        peak_gib = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        print(
            f"{name:<20}{r['tokens_per_s']:>12.0f}{r['seconds']:>10.2f}{r['micro_batches']:>8d}"
            f"{r['pad_frac']:>10.1%}{mfu:>8}{peak_gib:>10}"
        )
    calls = summary["layer_forwards_per_micro_batch"]
    print(f"forwards per decoder layer and micro-batch: {calls} (2 = gradient checkpointing recomputes)")
    print(
        f"{summary['best_packed']} / padded-fixed = {summary['packed_vs_padded_fixed']:.2f}x, "
        f"{summary['best_packed']} / padded-budget = {summary['packed_vs_padded_budget']:.2f}x; "
        f"8-rank token imbalance (max/mean): dealt {summary['rank_imbalance_8_dealt']:.3f}, "
        f"KK {summary['rank_imbalance_8_kk']:.4f}"
    )
    emit(summary, args.out)
    return 0
