"""metrics.jsonl across a resume: counters continue, steps appear once, torn lines do not stop it."""

from __future__ import annotations

import json

from areal_like.checkpoint import RESTORED_TOTALS
from areal_like.metrics import JsonlSink, MetricsLogger, read_jsonl, totals_at_step, truncate_after_step


def write_lines(path, records, torn_tail: str = ""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + torn_tail)


def step(lost_samples, lost_groups, reward):
    return {"datastore/lost_samples_total": lost_samples, "datastore/lost_groups_total": lost_groups,
            "reward/mean": reward}  # fmt: skip


def test_counters_whose_source_restarted_continue_from_the_value_reached(tmp_path):
    path = tmp_path / "metrics.jsonl"
    first = MetricsLogger([JsonlSink(str(path))])
    first.log(1, step(3.0, 1, 0.5))
    first.log(2, step(7.0, 2, 0.6))
    first.close()

    # The resumed run: a fresh datastore counts lost samples from 0 again, while the gate's
    # lost_groups_total comes back from the checkpoint (2) and goes on by itself.
    resumed = MetricsLogger([JsonlSink(str(path))])
    resumed.continue_totals(totals_at_step(str(path), 2), RESTORED_TOTALS)
    resumed.log(3, step(0.0, 2, 0.7))
    resumed.log(4, step(4.0, 3, 0.8))
    resumed.close()
    records = read_jsonl(str(path))
    assert [r["datastore/lost_samples_total"] for r in records] == [3.0, 7.0, 7.0, 11.0]
    assert [r["datastore/lost_groups_total"] for r in records] == [1, 2, 2, 3]
    assert [r["reward/mean"] for r in records] == [0.5, 0.6, 0.7, 0.8]  # not a counter: untouched
    assert resumed.last_totals == {"datastore/lost_samples_total": 11.0, "datastore/lost_groups_total": 3.0}


def test_every_counter_but_the_restored_ones_is_carried():
    logger = MetricsLogger([])
    logger.continue_totals(
        {"rollout/samples_total": 640, "train/skipped_steps_total": 1, "version": 9, "flag_total": True},
        RESTORED_TOTALS,
    )
    logger.log(10, {"rollout/samples_total": 64, "train/skipped_steps_total": 1, "version": 10})
    assert logger.last_totals == {"rollout/samples_total": 704.0, "train/skipped_steps_total": 1.0}


def test_truncate_keeps_one_record_per_step_in_order_and_drops_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    # Steps 1-3 written twice (two runs on one directory before the lock), then a torn line.
    records = [{"step": s, "run": "a"} for s in (1, 2, 3)] + [{"step": s, "run": "b"} for s in (1, 2, 3)]
    write_lines(path, records, torn_tail='{"step": 4, "rew')
    assert truncate_after_step(str(path), 2) == 4
    assert read_jsonl(str(path)) == [{"step": 1, "run": "b"}, {"step": 2, "run": "b"}]
    assert path.read_text().endswith("}\n")


def test_a_torn_last_line_alone_is_removed_and_reported(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    write_lines(path, [{"step": 1}, {"step": 2}], torn_tail='{"step": 3')
    assert read_jsonl(str(path)) == [{"step": 1}, {"step": 2}]
    assert "line 3 is not JSON" in caplog.text
    assert truncate_after_step(str(path), 2) == 0
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_totals_at_step_reads_the_counters_of_that_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_lines(path, [{"step": 1, "a_total": 1}, {"step": 2, "a_total": 5, "loss": 0.1}])
    assert totals_at_step(str(path), 2) == {"a_total": 5}
    assert totals_at_step(str(path), 3) is None
