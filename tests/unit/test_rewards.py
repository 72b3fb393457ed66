from __future__ import annotations

import time

import pytest

from areal_like.tasks import get_task
from rollout.rewards import RewardPool, RewardResult, resolve_reward_fn

FIXTURES = "tests.unit.reward_fixtures"


def test_pool_scores_a_task_batch_in_order():
    task = get_task("addition")
    prompts = task.make_prompts("train", 64, seed=0)
    items = [(p.answer if i % 2 else "wrong", p.answer) for i, p in enumerate(prompts)]
    with RewardPool(task.reward_fn_path, num_workers=2) as pool:
        results = pool.score(items)
        assert pool.score([]) == []
    assert [r.value for r in results] == [float(i % 2) for i in range(64)]
    assert all(r.status == "ok" and r.error is None for r in results)
    assert pool.counters == {"ok": 64, "error": 0, "timeout": 0, "worker_restarts": 0, "retries": 0}


def test_raising_function_scores_zero_and_counts_an_error():
    with RewardPool(f"{FIXTURES}:raise_on_boom") as pool:
        results = pool.score([("ok", ""), ("boom", ""), ("ok", "")])
    assert [r.status for r in results] == ["ok", "error", "ok"]
    assert results[1].value == 0.0 and "RuntimeError: boom requested" in results[1].error
    assert pool.counters["error"] == 1 and pool.counters["ok"] == 2


def test_non_finite_or_non_numeric_returns_are_errors():
    with RewardPool(f"{FIXTURES}:odd_returns") as pool:
        results = pool.score([(key, "") for key in ("nan", "inf", "str", "none", "int")])
    assert [r.status for r in results] == ["error"] * 4 + ["ok"]
    assert results[-1] == RewardResult(2.0, "ok") and isinstance(results[-1].value, float)
    assert all(r.value == 0.0 for r in results[:4])


def test_sleeping_call_times_out_in_its_worker_and_the_pool_keeps_working():
    with RewardPool(f"{FIXTURES}:sleep_on_slow", timeout_s=0.3) as pool:
        pool.score([("warm-up", "")])
        started = time.perf_counter()
        results = pool.score([("a", ""), ("slow", ""), ("b", "")])
        elapsed_s = time.perf_counter() - started
        assert [r.status for r in results] == ["ok", "timeout", "ok"]
        assert results[1].value == 0.0
        assert elapsed_s < 10.0  # the in-worker timer fired at 0.3 s (no kill: see worker_restarts below)
        assert pool.score([("c", "")])[0].status == "ok"
    assert pool.counters == {"ok": 4, "error": 0, "timeout": 1, "worker_restarts": 0, "retries": 0}


def test_call_the_timer_cannot_stop_gets_its_worker_killed_and_replaced():
    # 12 items on one worker make chunks of 3: ("a", "slow", "b") share a chunk, so "a" (finished,
    # result lost with the worker) and "b" (not started) are requeued to the replacement.
    items = [("a", ""), ("slow", ""), ("b", "")] + [(str(i), "") for i in range(9)]
    with RewardPool(f"{FIXTURES}:hang_on_slow", timeout_s=0.3) as pool:
        started = time.perf_counter()
        results = pool.score(items)
        elapsed_s = time.perf_counter() - started
        assert [r.status for r in results] == ["ok", "timeout"] + ["ok"] * 10
        assert "worker killed" in results[1].error
        assert elapsed_s < 10.0  # killed at ~1.3-1.6 s (timeout + grace), not after the 30 s sleep
        assert pool.score([("d", "")])[0].status == "ok"
    assert pool.counters == {"ok": 12, "error": 0, "timeout": 1, "worker_restarts": 1, "retries": 0}


def test_worker_that_dies_mid_call_is_replaced_and_the_item_retried_then_scored_an_error():
    with RewardPool(f"{FIXTURES}:exit_on_die", num_workers=2, max_retries=1) as pool:
        results = pool.score([("a", ""), ("die", ""), ("b", ""), ("die", ""), ("c", "")])
    assert [r.status for r in results] == ["ok", "error", "ok", "error", "ok"]
    assert "exit code 3" in results[1].error
    # Each "die" item ran twice (first try + one retry), each time killing its worker.
    assert pool.counters["retries"] == 2 and pool.counters["worker_restarts"] == 4


def test_a_crash_that_does_not_repeat_is_retried_to_success_and_counted(tmp_path):
    marker = str(tmp_path / "crashed-once")
    with RewardPool(f"{FIXTURES}:exit_first_time", max_retries=1) as pool:
        results = pool.score([("x", marker)])
    assert results == [RewardResult(1.0, "ok")]
    assert pool.counters == {"ok": 1, "error": 0, "timeout": 0, "worker_restarts": 1, "retries": 1}


def test_with_no_retries_a_crash_scores_an_error_at_once():
    with RewardPool(f"{FIXTURES}:exit_on_die", max_retries=0) as pool:
        assert pool.score([("die", "")])[0].status == "error"
    assert pool.counters["retries"] == 0 and pool.counters["worker_restarts"] == 1


def test_workers_do_not_import_torch_even_when_the_caller_has_it():
    import torch  # noqa: F401

    with RewardPool(f"{FIXTURES}:torch_imported") as pool:
        assert pool.score([("", "")])[0].value == 0.0


def test_closed_pool_refuses_to_score():
    pool = RewardPool(f"{FIXTURES}:exact")
    assert pool.score([("1", "1")]) == [RewardResult(1.0, "ok")]
    pool.close()
    pool.close()
    with pytest.raises(RuntimeError, match="after close"):
        pool.score([("1", "1")])


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("no_colon", "malformed"),
        ("a:b:c", "malformed"),
        (":exact", "malformed"),
        (f"{FIXTURES}:", "malformed"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        (f"{FIXTURES}:missing", "no attribute 'missing'"),
        (f"{FIXTURES}:NOT_CALLABLE", "names a int, not a callable"),
    ],
)
def test_malformed_reward_paths_are_clear_errors(path, message):
    with pytest.raises(ValueError, match=message):
        resolve_reward_fn(path)
    with pytest.raises(ValueError, match=message):
        RewardPool(path)


def test_dotted_attribute_paths_resolve():
    assert resolve_reward_fn("os.path:join")("a", "b") == "a/b"
