"""Metric sinks (JSONL always, TensorBoard optional) and the one-line progress report.

Keys are slash-namespaced where they are computed: ``reward/``, ``train/``, ``staleness/``,
``timing/``, ``perf/``, ``rollout/``, ``eval/``. One record per train step.

Counters (keys ending in ``_total``) count over the whole run, across resumes: a counter whose
source restarts at zero with a resumed run (a fresh rollout worker, datastore, supervisor)
continues from the value the run had reached (``MetricsLogger.continue_totals``); one whose source
is restored from the checkpoint (the gate's, the trainer's) already does.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Collection
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


def is_counter(key: str, value) -> bool:
    return key.endswith("_total") and isinstance(value, (int, float)) and not isinstance(value, bool)


class MetricsLogger:
    """Fans one step's metrics out to every sink; keeps counters running across resumes."""

    def __init__(self, sinks: list[MetricsSink]) -> None:
        self._sinks = sinks
        self._offsets: dict[str, float] = {}
        self.last_totals: dict[str, float] = {}
        """Every counter as last logged (saved in checkpoints: the fallback baseline of a resume)."""

    def continue_totals(self, baseline: dict[str, float], restored: Collection[str]) -> None:
        """After a resume: every counter in ``baseline`` (the values the run had reached) continues
        from there, except the ``restored`` ones, whose sources come back from the checkpoint."""
        self._offsets = {k: float(v) for k, v in baseline.items() if is_counter(k, v) and k not in restored}
        self.last_totals = {k: float(v) for k, v in baseline.items() if is_counter(k, v)}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        offsets = self._offsets
        metrics = {k: v + offsets[k] if k in offsets and is_counter(k, v) else v for k, v in metrics.items()}
        self.last_totals.update({k: float(v) for k, v in metrics.items() if is_counter(k, v)})
        for sink in self._sinks:
            sink.write(step, metrics)

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSONL file; a line that does not parse (torn by a crash mid-write) is
    skipped with a warning naming it."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s line %d is not JSON (torn by a crash mid-write?): skipped", path, number)
    return records


def truncate_after_step(path: str, last_step: int) -> int:
    """Rewrite ``path`` as one record per step up to ``last_step``, in step order, so a resumed run
    continues it without repeated steps: records after the checkpoint a run resumes from are
    dropped, of repeated steps the last written is kept, torn lines go. Returns how many records
    were dropped."""
    records = read_jsonl(path)
    by_step = {r.get("step", 0): r for r in records if r.get("step", 0) <= last_step}
    kept = [by_step[s] for s in sorted(by_step)]
    if kept != records or _has_torn_lines(path, len(records)):
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return len(records) - len(kept)


def _has_torn_lines(path: str, num_records: int) -> bool:
    if not os.path.exists(path):
        return False
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip()) != num_records


def totals_at_step(path: str, step: int) -> dict[str, float] | None:
    """The counters of ``step``'s record in a metrics file, or None when it has no such record."""
    record = next((r for r in reversed(read_jsonl(path)) if r.get("step") == step), None)
    return None if record is None else {k: v for k, v in record.items() if is_counter(k, v)}


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
