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
