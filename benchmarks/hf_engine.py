"""``areal-like bench hf_engine``: HFEngine continuous batching vs plain ``model.generate`` on CPU.

Workload: ``--requests`` prompts of random token ids (lengths uniform in [min, max]), each with its
own response budget drawn from a lognormal (median ``--median-new-tokens``, shape ``--sigma``,
clipped to [1, ``--max-new-tokens``]): a long-tailed mix where a few requests run much longer than
the rest. Every request generates exactly its budget (eos ignored), by sampling at temperature 1.

Contenders, each on the same requests in the same order, with at most ``--batch-size`` sequences
decoded together:
- ``continuous``: all requests submitted to one ``HFEngine``; a finished row leaves the batch and the
  next waiting request joins it between decode steps.
- ``static``: the same engine fed one chunk of ``--batch-size`` requests at a time (the chunk ends
  when its longest request does): isolates what continuous batching buys over our own decode loop.
- ``generate``: transformers ``model.generate`` on the same chunks, left-padded, with the chunk's
  largest budget as ``max_new_tokens`` (one budget per call, so short requests are padded out);
  the naive batching a user writes first.
Throughput counts only requested tokens (sum of budgets) over wall time, so the padding-out that
``generate`` does is cost, not output. Each contender runs ``--repeats`` times, interleaved with
the others, and its fastest run counts (the CPU machine is shared; the best run is the one least
disturbed). The model is a random Qwen2 built in memory (no download). It prints a table and, as
its last line, one JSON object with the figures and the ratio.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class EngineBenchSettings:
    """The model, the workload and the batch limit of one benchmark run."""

    requests: int = 96
    batch_size: int = 16
    """Most sequences decoded together, for every contender."""
    min_prompt_len: int = 16
    max_prompt_len: int = 64
    median_new_tokens: int = 32
    sigma: float = 1.0
    """Shape of the lognormal budget distribution: 1.0 gives a p90/median of about 3.6."""
    max_new_tokens: int = 512
    hidden_size: int = 256
    num_layers: int = 4
    vocab_size: int = 2048
    threads: int = 1
    """torch intra-op threads (the same for every contender)."""
    repeats: int = 3
    """Runs per contender, interleaved; the fastest counts."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "requests",
            "batch_size",
            "min_prompt_len",
            "median_new_tokens",
            "max_new_tokens",
            "repeats",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)}: must be >= 1")
        if self.max_prompt_len < self.min_prompt_len:
            raise ValueError(
                f"--max-prompt-len={self.max_prompt_len} is below --min-prompt-len={self.min_prompt_len}"
            )
        if self.sigma < 0:
            raise ValueError(f"--sigma={self.sigma}: must be >= 0 (0 gives every request the median)")


@dataclass
class ContenderResult:
    name: str
    seconds: float
    useful_tokens: int
    """Sum of the requested budgets (what the caller asked for)."""
    generated_tokens: int
    """Tokens actually decoded, padding-out included."""

    @property
    def tokens_per_s(self) -> float:
        return self.useful_tokens / self.seconds


def make_workload(s: EngineBenchSettings) -> tuple[list[list[int]], list[int]]:
    """Prompts (token ids) and per-request budgets, reproducible from ``s.seed``."""
    rng = np.random.default_rng(s.seed)
    lengths = rng.integers(s.min_prompt_len, s.max_prompt_len + 1, size=s.requests)
    prompts = [rng.integers(3, s.vocab_size, size=int(n)).tolist() for n in lengths]
    budgets = np.exp(rng.normal(np.log(s.median_new_tokens), s.sigma, size=s.requests))
    return prompts, np.clip(np.rint(budgets), 1, s.max_new_tokens).astype(int).tolist()


def build_model(s: EngineBenchSettings):
    import torch
    import transformers

    torch.manual_seed(s.seed)
    config = transformers.Qwen2Config(
        vocab_size=s.vocab_size,
        hidden_size=s.hidden_size,
        num_hidden_layers=s.num_layers,
        num_attention_heads=max(1, s.hidden_size // 64),
        num_key_value_heads=max(1, s.hidden_size // 128),
        intermediate_size=4 * s.hidden_size,
        max_position_embeddings=s.max_prompt_len + s.max_new_tokens + 8,
        pad_token_id=0,
        eos_token_id=None,
        bos_token_id=None,
    )
    model = transformers.Qwen2ForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def run_continuous(model, prompts, budgets, s: EngineBenchSettings) -> ContenderResult:
    from rollout.engine import SamplingParams
    from rollout.hf_engine import HFEngine

    engine = HFEngine(model, max_batch_size=s.batch_size, seed=s.seed)
    params = [SamplingParams(max_new_tokens=n, temperature=1.0) for n in budgets]
    start = time.perf_counter()
    outputs = engine.generate(prompts, params, timeout_s=3600)
    seconds = time.perf_counter() - start
    engine.close()
    assert [len(o.response_ids) for o in outputs] == budgets
    return ContenderResult("continuous", seconds, sum(budgets), sum(budgets))


def run_static(model, prompts, budgets, s: EngineBenchSettings) -> ContenderResult:
    from rollout.engine import SamplingParams
    from rollout.hf_engine import HFEngine

    engine = HFEngine(model, max_batch_size=s.batch_size, seed=s.seed)
    start = time.perf_counter()
    for i in range(0, len(prompts), s.batch_size):
        chunk = budgets[i : i + s.batch_size]
        params = [SamplingParams(max_new_tokens=n, temperature=1.0) for n in chunk]
        engine.generate(prompts[i : i + s.batch_size], params, timeout_s=3600)
    seconds = time.perf_counter() - start
    engine.close()
    return ContenderResult("static", seconds, sum(budgets), sum(budgets))


def run_generate(model, prompts, budgets, s: EngineBenchSettings) -> ContenderResult:
    import torch

    generated = 0
    start = time.perf_counter()
    for i in range(0, len(prompts), s.batch_size):
        chunk, chunk_budgets = prompts[i : i + s.batch_size], budgets[i : i + s.batch_size]
        width = max(len(p) for p in chunk)
        input_ids = torch.zeros((len(chunk), width), dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(chunk):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1
        max_new = max(chunk_budgets)
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new,
                min_new_tokens=max_new,
                do_sample=True,
                temperature=1.0,
                top_k=None,
                top_p=None,
                pad_token_id=0,
            )
        assert out.shape[1] == width + max_new
        generated += len(chunk) * max_new
    seconds = time.perf_counter() - start
    return ContenderResult("generate", seconds, sum(budgets), generated)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="areal-like bench hf_engine", description=__doc__.split("\n")[0])
    for name, default in asdict(EngineBenchSettings()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    settings = EngineBenchSettings(**vars(parser.parse_args(argv)))

    import torch

    torch.set_num_threads(settings.threads)
    model = build_model(settings)
    prompts, budgets = make_workload(settings)
    # Warm-up on a few requests, so no contender pays first-call allocation costs.
    warm = EngineBenchSettings(**{**asdict(settings), "requests": 4})
    for run in (run_continuous, run_generate):
        run(model, prompts[:4], [min(b, 8) for b in budgets[:4]], warm)

    best: dict[str, ContenderResult] = {}
    for _ in range(settings.repeats):
        for run in (run_continuous, run_static, run_generate):
            result = run(model, prompts, budgets, settings)
            if result.name not in best or result.seconds < best[result.name].seconds:
                best[result.name] = result
    results = list(best.values())
    by_name = best
    ratio = by_name["continuous"].tokens_per_s / by_name["generate"].tokens_per_s
    budgets_arr = np.asarray(budgets)
    print(
        f"workload: {settings.requests} requests, batch {settings.batch_size}, budgets median "
        f"{int(np.median(budgets_arr))} p90 {int(np.percentile(budgets_arr, 90))} max {budgets_arr.max()}, "
        f"model hidden {settings.hidden_size} x {settings.num_layers} layers, {settings.threads} thread(s), "
        f"best of {settings.repeats}"
    )
    print(f"{'contender':<12}{'seconds':>10}{'tokens/s':>12}{'decoded':>10}{'useful':>10}")
    for r in results:
        print(
            f"{r.name:<12}{r.seconds:>10.2f}{r.tokens_per_s:>12.1f}{r.generated_tokens:>10}{r.useful_tokens:>10}"
        )
    print(f"continuous batching / model.generate: {ratio:.2f}x")
    figures = {
        "bench": "hf_engine",
        **asdict(settings),
        **{f"{r.name}_tokens_per_s": round(r.tokens_per_s, 1) for r in results},
        **{f"{r.name}_s": round(r.seconds, 3) for r in results},
        "continuous_vs_generate": round(ratio, 3),
        "continuous_vs_static": round(by_name["continuous"].tokens_per_s / by_name["static"].tokens_per_s, 3),
    }
    print(json.dumps(figures))
    return 0
