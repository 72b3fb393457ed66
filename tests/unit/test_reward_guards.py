"""The reward pool's guards: hanging calls time out together, a batch budget, the failure warning and
rate, the stop on an all-error batch, and cancel (how a stopping rollout worker leaves a batch)."""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time

import pytest

from rollout.rewards import RewardFunctionBroken, RewardPool, RewardPoolConfig, RewardsCancelled

FIXTURES = "tests.unit.reward_fixtures"


def test_a_batch_of_sleeping_rewards_takes_about_two_timeouts_not_one_per_item():
    timeout_s = 1.0
    with RewardPool(f"{FIXTURES}:sleep_unless_fast", timeout_s=timeout_s) as pool:
        pool.score([("fast", "")])  # workers started outside the timing
        started = time.monotonic()
        results = pool.score([(str(i), "") for i in range(32)] + [("fast", "")])
        elapsed_s = time.monotonic() - started
        assert [r.status for r in results] == ["timeout"] * 32 + ["ok"]
        # the first call times out alone, the other 31 together: ~2 s (sequentially: 32 s)
        assert elapsed_s < 2 * timeout_s + 1.0, elapsed_s
        assert pool.score([("fast", "")])[0].status == "ok"  # the next batch starts concurrent
    assert pool.counters["worker_restarts"] == 0


def test_step_sized_batches_of_sleeping_rewards_take_under_two_timeouts_then_about_one():
    # 512 = 32 groups x 16 samples. In the first batch the first call is found waiting (not
    # computing) at a quarter of its timeout and runs again with all the others, concurrently
    # (task.reward_pool.concurrency covers the batch; at 256 it took a third timeout), ramped up
    # within a few ticks. The next batch starts concurrent, all at once (its calls were seen waiting).
    timeout_s = 4.0
    with RewardPool(f"{FIXTURES}:sleep_unless_fast", timeout_s=timeout_s) as pool:
        pool.score([("fast", "")])
        seconds = []
        for _ in range(2):
            started = time.monotonic()
            results = pool.score([(str(i), "") for i in range(512)])
            seconds.append(time.monotonic() - started)
            assert {r.status for r in results} == {"timeout"}
    # measured at 4 s: 5.80-5.82 s then 4.37-4.38 s; with the second batch starting sequential as the
    # first: 5.82 then 5.39 (at 3 s: 4.8-4.9 then 3.6-3.8; before: 6.8 s, the first call timing out
    # alone). The second batch skips the quarter-timeout wait before it goes concurrent: compared with
    # the first, so that a slower machine (forking 512 calls on 2 cores) slows both alike.
    assert seconds[0] < 2 * timeout_s, seconds
    assert seconds[1] < seconds[0] - timeout_s / 5 and seconds[1] < 2 * timeout_s, seconds


def test_a_call_that_computes_is_not_taken_for_a_waiting_one(tmp_path):
    # A call that computes past a quarter of its timeout keeps running in the worker and the batch
    # stays sequential: nothing is run twice.
    starts = tmp_path / "starts"
    with RewardPool(f"{FIXTURES}:spin_logging_starts", timeout_s=2.0) as pool:
        results = pool.score([("1.0", str(starts)), ("0", str(starts))])
    assert [r.status for r in results] == ["ok", "ok"]
    assert starts.read_text().count("start") == 2  # each call started once


def test_items_ready_while_a_batch_hangs_join_it_and_a_cheap_batch_never_asks():
    timeout_s = 1.0
    asked = []

    def more():
        asked.append(time.monotonic())
        return [(f"late{len(asked)}", ""), ("fast", "")] if len(asked) <= 2 else []

    with RewardPool(f"{FIXTURES}:sleep_unless_fast", timeout_s=timeout_s) as pool:
        assert [r.status for r in pool.score([("fast", "")] * 3, more)] == ["ok"] * 3
        assert asked == []  # nothing hung: the caller is not asked for more
        started = time.monotonic()
        results = pool.score([("a", ""), ("b", "")], more)
        elapsed_s = time.monotonic() - started
    # the two given, then the two pairs added once the batch went concurrent, in that order
    assert [r.status for r in results] == ["timeout", "timeout", "timeout", "ok", "timeout", "ok"]
    assert elapsed_s < 2 * timeout_s, elapsed_s  # the late items ran alongside, not a timeout later


def test_a_batch_starts_concurrent_only_after_a_batch_that_hung():
    with RewardPool(f"{FIXTURES}:pid_unless_slow", timeout_s=0.5, num_workers=1) as pool:
        worker_pid = pool.score([("a", "")])[0].value
        assert [r.value for r in pool.score([("a", "")] * 3)] == [worker_pid] * 3  # sequential
        first = pool.score([("slow", ""), ("a", ""), ("a", "")])
        assert first[0].status == "timeout" and worker_pid not in {r.value for r in first[1:]}
        after_hang = pool.score([("a", "")] * 3)  # forked calls: the last batch hung
        assert worker_pid not in {r.value for r in after_hang} and len({r.value for r in after_hang}) == 3
        assert [r.value for r in pool.score([("a", "")] * 3)] == [worker_pid] * 3  # no hang: cheap again


def test_concurrent_calls_that_compute_run_about_one_per_core(tmp_path):
    # After the first call times out the rest run in forked children. Those that compute must not
    # all start at once: 12 calls sharing 2 cores would each take 6x longer and could time out.
    with RewardPool(f"{FIXTURES}:sleep_spin_or_die", timeout_s=3.0) as pool:
        results = pool.score([("slow", "")] + [("spin", f"0.1:{tmp_path}")] * 12)
    assert [r.status for r in results] == ["timeout"] + ["ok"] * 12
    spans = [tuple(map(float, path.read_text().split())) for path in tmp_path.iterdir()]
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    most_at_once = max(itertools.accumulate(delta for _, delta in events))
    assert most_at_once <= 2 * (os.cpu_count() or 1), spans


def test_a_call_process_that_dies_in_concurrent_mode_is_retried_then_scored_an_error():
    with RewardPool(f"{FIXTURES}:sleep_spin_or_die", timeout_s=0.5, max_retries=1) as pool:
        results = pool.score([("slow", ""), ("die", ""), ("ok", "")])
    assert [r.status for r in results] == ["timeout", "error", "ok"]
    assert "exit code 3" in results[1].error
    assert pool.counters["retries"] == 1 and pool.counters["worker_restarts"] == 0


def test_the_batch_budget_cuts_a_slow_batch_and_the_pool_goes_on():
    config = RewardPoolConfig(concurrency=1, batch_budget_s=1.5, stop_if_all_error=False)
    with RewardPool(f"{FIXTURES}:sleep_unless_fast", timeout_s=1.0, config=config) as pool:
        pool.score([("fast", "")])
        started = time.monotonic()
        results = pool.score([(str(i), "") for i in range(8)])  # one at a time: 8 s without a budget
        elapsed_s = time.monotonic() - started
        assert elapsed_s < 1.5 + 1.0, elapsed_s
        assert all(r.status == "timeout" for r in results)
        assert "batch_budget_s" in results[-1].error
        assert pool.score([("fast", "")])[0].status == "ok"  # a fresh worker replaced the killed one


def test_a_batch_with_many_failures_logs_a_warning_and_raises_the_failure_rate(caplog):
    with RewardPool(f"{FIXTURES}:raise_on_boom") as pool:
        with caplog.at_level(logging.WARNING, logger="rollout.rewards"):
            pool.score([("ok", "")] * 4)
            assert pool.recent_failure_rate == 0.0 and not caplog.records
            pool.score([("boom", "")] * 3 + [("ok", "")])
        assert pool.recent_failure_rate == pytest.approx(3 / 8)
        assert pool.warned_batches == 1
    [record] = [r for r in caplog.records if "rewards of a batch failed" in r.getMessage()]
    message = record.getMessage()
    assert f"{FIXTURES}:raise_on_boom" in message and "3 of 4" in message and "boom requested" in message


def test_an_all_error_batch_stops_when_asked_but_one_bad_group_does_not():
    config = RewardPoolConfig(stop_if_all_error=True)
    with RewardPool(f"{FIXTURES}:raise_on_boom", config=config) as pool:
        assert all(r.status == "error" for r in pool.score([("boom", "")] * 16))  # one group: 16 in a row
        pool.score([("ok", "")])
        with pytest.raises(RewardFunctionBroken, match="raise_on_boom.*stop_if_all_error=false"):
            pool.score([("boom", "")] * 64)
        assert pool.counters["error"] == 80  # the batch was counted before the stop
    with RewardPool(f"{FIXTURES}:raise_on_boom") as pool:  # a bare pool scores, never raises
        assert len(pool.score([("boom", "")] * 64)) == 64


def test_cancel_ends_a_batch_in_progress_and_the_pool_scores_the_next_one():
    with RewardPool(f"{FIXTURES}:sleep_unless_fast", timeout_s=20.0) as pool:
        pool.score([("fast", "")])
        threading.Timer(0.5, pool.cancel).start()
        started = time.monotonic()
        with pytest.raises(RewardsCancelled):
            pool.score([("hang", "")])
        assert time.monotonic() - started < 2.0
        pool.cancel()  # nothing in progress: no effect on the next batch
        assert pool.score([("fast", "")])[0].status == "ok"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("concurrency", 0, "concurrency=0"),
        ("batch_budget_s", 0.0, "batch_budget_s=0.0"),
        ("warn_failure_rate", 1.5, "warn_failure_rate=1.5"),
    ],
)
def test_reward_pool_config_names_the_bad_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        RewardPoolConfig(**{field: value})


def test_the_reward_hang_bench_times_each_batch_and_ends_with_json(capsys):
    import json

    import benchmarks as bench

    assert bench.run("reward_hang", ["--items", "6", "--timeout", "0.4", "--batches", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    figures = json.loads(lines[-1])
    assert figures["bench"] == "reward_hang" and len(figures["seconds"]) == 2
    assert all(0.4 <= s < 2 * 0.4 + 1.0 for s in figures["seconds"]), figures
    assert lines[0].startswith("batch 1: 6 calls (6 timed out)")
