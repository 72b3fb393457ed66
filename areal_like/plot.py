"""Learning curves of a run directory as one PNG (reward, eval, staleness, throughput, timings)."""

from __future__ import annotations

import os

from areal_like.metrics import read_jsonl


def plot_run(run_dir: str, out_path: str | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    evals = read_jsonl(os.path.join(run_dir, "eval.jsonl"))
    if not steps:
        raise ValueError(f"no metrics in {run_dir!r}/metrics.jsonl: nothing to plot")
    out_path = out_path or os.path.join(run_dir, "curves.png")

    def series(records, key):
        pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0][0]
    ax.plot(*series(steps, "reward/mean"), label="train reward (batch mean)")
    if evals:
        ax.plot(*series(evals, "eval/accuracy"), "o-", label="held-out accuracy (greedy)")
    top = 1.02
    if any("rollout/tool_calls_per_episode" in r for r in steps):  # multi-turn runs
        calls = series(steps, "rollout/tool_calls_per_episode")
        ax.plot(*calls, alpha=0.6, label="tool calls per episode")
        top = max(top, max(calls[1], default=0.0) + 0.05)
    ax.set_title("reward")
    ax.set_ylim(-0.02, top)
    ax.legend()
    ax = axes[0][1]
    ax.plot(*series(steps, "staleness/max"), label="max")
    ax.plot(*series(steps, "staleness/mean"), label="mean")
    ax.set_title("staleness (policy versions)")
    ax.legend()
    ax = axes[1][0]
    ax.plot(*series(steps, "perf/trained_tokens_per_s"), label="trained tokens/s")
    ax.set_title("throughput")
    ax.legend()
    ax = axes[1][1]
    for key in ("timing/step_s", "timing/wait_batch_s", "timing/train_s", "timing/weight_sync_s"):
        ax.plot(*series(steps, key), label=key.split("/")[1])
    ax.set_title("seconds per step")
    ax.legend()
    for a in axes.flat:
        a.set_xlabel("step")
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path
