"""``areal-like bench checkpoint`` runs end to end on a tiny model and ends with its JSON figures."""

from __future__ import annotations

import json

import pytest

import benchmarks as bench

pytestmark = pytest.mark.slow


def test_checkpoint_bench_reports_blocked_seconds_of_both_modes(capsys):
    assert bench.run("checkpoint", ["--hidden", "64", "--layers", "1", "--steps", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    figures = json.loads(lines[-1])
    assert figures["bench"] == "checkpoint"
    for mode in ("sync", "async"):
        assert figures[mode]["mode"] == mode and len(figures[mode]["blocked_s_per_checkpoint"]) == 1
        assert figures[mode]["blocked_s_median"] > 0 and figures[mode]["checkpoint_bytes"] > 0
    assert figures["blocked_ratio_sync_over_async"] > 0
    for mode in ("sync ", "async "):
        assert any(line.startswith(mode) for line in lines)


def test_checkpoint_bench_needs_a_step_before_and_after_the_counted_ones():
    with pytest.raises(SystemExit):
        bench.run("checkpoint", ["--steps", "2"])
