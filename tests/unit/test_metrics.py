from __future__ import annotations

import json
import math

from areal_like.metrics import JsonlSink, MetricsLogger, TensorBoardSink, progress_line, truncate_after_step


def test_jsonl_sink_writes_one_object_per_step_and_nan_as_null(tmp_path):
    path = tmp_path / "metrics.jsonl"
    logger = MetricsLogger([JsonlSink(str(path))])
    logger.log(1, {"reward/mean": 0.5, "train/loss": math.nan})
    logger.log(2, {"reward/mean": 0.75})
    logger.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records == [{"step": 1, "reward/mean": 0.5, "train/loss": None}, {"step": 2, "reward/mean": 0.75}]


def test_truncate_drops_steps_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)))
    assert truncate_after_step(str(path), 3) == 2
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_tensorboard_sink_writes_event_files(tmp_path):
    sink = TensorBoardSink(str(tmp_path / "tb"))
    sink.write(1, {"reward/mean": 0.25, "note": "text is skipped"})
    sink.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.value for e in events.Scalars("reward/mean")] == [0.25]


def test_progress_line_shows_step_reward_staleness_and_throughput():
    line = progress_line(
        3,
        10,
        {
            "version": 3,
            "reward/mean": 0.5,
            "staleness/max": 1,
            "staleness/mean": 0.5,
            "perf/trained_tokens_per_s": 1234.0,
            "timing/step_s": 0.25,
        },
    )
    assert line.startswith("step 3/10 | v3 | reward 0.500 | staleness max 1")
    assert "1234 tok/s" in line


def test_step_metrics_take_train_keys_once_from_the_trainer_and_sum_tokens_over_ranks():
    from areal_like.staleness import GateState
    from areal_like.step_metrics import step_metrics
    from rollout.worker import WorkerHealth
    from trainer.stats import TrainStats

    global_metrics = {"train/loss": 0.25, "train/grad_norm": 1.5, "train/entropy": 2.0}
    global_metrics["perf/train_tokens_per_s"] = 7.0

    def rank(num_tokens: int) -> TrainStats:
        # The record's own fields disagree with its global metrics on purpose: only the latter count.
        return TrainStats(
            loss=9.0, num_samples=4, num_tokens=num_tokens, clip_frac=0.9, imp_weight_mean=9.0,
            imp_weight_max=9.0, capped_frac=0.9, behav_prox_logp_diff=9.0, grad_norm=9.0, lr=9.0,
            reward_mean=0.5, adv_abs_mean=9.0, fetch_s=0.1 * num_tokens, prox_s=0.2, update_s=0.3,
            metrics=global_metrics,
        )  # fmt: skip

    health = WorkerHealth(0, 1, 2, 8, 30, 1.0, 0.5, 1, 0, 0.0, finish_reasons={"length": 3})
    seconds = {"wait_batch": 1.0, "train": 2.0, "weight_sync": 0.5, "checkpoint": 0.5}
    gate = GateState(version=1, accepted=4)
    metrics = step_metrics(1, [0, 1], gate, [rank(10), rank(20)], [health], 6, seconds)
    assert {k: v for k, v in metrics.items() if k.startswith("train/")} == {
        "train/loss": 0.25,
        "train/grad_norm": 1.5,
        "train/entropy": 2.0,
        "train/num_tokens": 30,
    }
    assert metrics["perf/train_tokens_per_s"] == 7.0 and metrics["perf/trained_tokens_per_s"] == 30 / 4.0
    assert metrics["timing/train_fetch_s"] == 2.0 and metrics["rollout/finish_length_total"] == 3
    assert metrics["staleness/max"] == 1 and metrics["staleness/gate_accepted"] == 4
