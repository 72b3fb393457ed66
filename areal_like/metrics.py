"""Metric sinks (JSONL always, TensorBoard optional) and the one-line progress report.

Keys are slash-namespaced where they are computed: ``reward/``, ``train/``, ``staleness/``,
``timing/``, ``perf/``, ``rollout/``, ``eval/``. One record per train step.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Protocol

logger = logging.getLogger(__name__)


class MetricsSink(Protocol):
    def write(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """Appends one JSON object per call to ``path``, flushed at once (safe to tail)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run

    def write(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardSink:
    def __init__(self, log_dir: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=log_dir)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    """Weights & Biases, when ``run.wandb_project`` is set; needs ``pip install wandb``."""

    def __init__(self, project: str, run_dir: str, config: dict) -> None:
        try:
            import wandb
        except ImportError:
            raise ImportError(
                "run.wandb_project is set but wandb is not installed: pip install wandb"
            ) from None
        self._run = wandb.init(
            project=project,
            dir=run_dir,
            name=os.path.basename(run_dir),
            config=config,
            resume="allow",
            id=os.path.basename(os.path.abspath(run_dir)),
        )

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self._run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        self._run.finish()


class MetricsLogger:
    """Fans one step's metrics out to every sink."""

    def __init__(self, sinks: list[MetricsSink]) -> None:
        self._sinks = sinks

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for sink in self._sinks:
            sink.write(step, metrics)

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_after_step(path: str, last_step: int) -> int:
    """Drop records with ``step > last_step`` (written after the checkpoint a run resumes from), so
    a resumed run continues the file without repeated steps. Returns how many were dropped."""
    records = read_jsonl(path)
    kept = [r for r in records if r.get("step", 0) <= last_step]
    if len(kept) != len(records):
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, path)
    return len(records) - len(kept)


def progress_line(step: int, max_steps: int, metrics: dict[str, float]) -> str:
    def get(key: str, fmt: str) -> str:
        value = metrics.get(key)
        return format(value, fmt) if isinstance(value, (int, float)) else "-"

    return (
        f"step {step}/{max_steps} | v{int(metrics.get('version', 0))} | reward {get('reward/mean', '.3f')} "
        f"| staleness max {get('staleness/max', '.0f')} mean {get('staleness/mean', '.2f')} "
        f"| {get('perf/trained_tokens_per_s', '.0f')} tok/s | step {get('timing/step_s', '.2f')}s "
        f"(wait {get('timing/wait_batch_s', '.2f')}s, train {get('timing/train_s', '.2f')}s, "
        f"sync {get('timing/weight_sync_s', '.2f')}s)"
    )


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
