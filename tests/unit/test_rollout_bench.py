"""``areal-like bench hf_engine`` runs end to end on a tiny workload and ends with its JSON figures."""

from __future__ import annotations

import json

import pytest
import torch

import benchmarks as bench
from benchmarks.hf_engine import EngineBenchSettings, make_workload


def test_engine_bench_prints_a_table_and_a_json_last_line_with_the_ratio(capsys):
    argv = ["--requests", "6", "--batch-size", "3", "--hidden-size", "64", "--num-layers", "1"]
    argv += ["--vocab-size", "64", "--max-new-tokens", "12", "--median-new-tokens", "4", "--repeats", "1"]
    threads = torch.get_num_threads()
    try:
        assert bench.run("hf_engine", argv) == 0
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.strip().splitlines()
    figures = json.loads(lines[-1])
    assert figures["bench"] == "hf_engine" and figures["requests"] == 6
    for name in ("continuous", "static", "generate"):
        assert figures[f"{name}_tokens_per_s"] > 0
    assert figures["continuous_vs_generate"] > 0
    assert any(line.startswith("continuous batching / model.generate:") for line in lines)


def test_the_workload_is_long_tailed_reproducible_and_within_bounds():
    settings = EngineBenchSettings(requests=400, median_new_tokens=32, max_new_tokens=256)
    prompts, budgets = make_workload(settings)
    assert (prompts, budgets) == make_workload(settings)
    assert min(budgets) >= 1 and max(budgets) <= 256
    assert max(budgets) > 4 * sorted(budgets)[len(budgets) // 2]  # a long tail
    assert all(settings.min_prompt_len <= len(p) <= settings.max_prompt_len for p in prompts)
    with pytest.raises(ValueError, match="--sigma"):
        EngineBenchSettings(sigma=-1)


@pytest.mark.parametrize(
    "argv",
    [["--together", "--stream-intervals", "1,16"], ["--together", "--gpu-mem", "0.85"]],
    ids=["two_intervals", "gpu_share_too_big"],
)
def test_gpu_rollout_together_is_refused_where_two_engines_cannot_share_one_gpu(argv):
    """``--together`` keeps raw vLLM and ours up at once: one stream interval, each engine <= 0.45
    of the GPU. Refused before any model is built or GPU touched."""
    from benchmarks import gpu_rollout

    with pytest.raises(SystemExit, match="--together: one --stream-intervals value and --gpu-mem <= 0.45"):
        gpu_rollout.main(argv)
