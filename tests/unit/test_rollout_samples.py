"""From finished requests to datastore writes: training columns, per-sample metadata, dynamic sampling."""

from __future__ import annotations

import numpy as np

from areal_like.core.types import GenerationOutput, PromptGroup, PromptRecord
from rollout.rewards import RewardResult
from rollout.samples import META_COLUMN, SampleMetadata, build_group_writes, rewards_all_equal


def make_group(num_samples: int = 2) -> PromptGroup:
    return PromptGroup(
        group_id=7,
        prompt=PromptRecord("p", "1+1=", "2"),
        prompt_ids=(4, 5, 6, 7),
        num_samples=num_samples,
        admitted_version=3,
    )


def test_writes_carry_training_columns_and_metadata_of_engine_versions_lengths_and_finish_reason():
    outputs = [
        GenerationOutput([9, 1], [-0.5, -0.1], [3, 4], "stop"),
        GenerationOutput([9, 9, 9], [-0.2, -0.3, -0.4], [4, 4, 4], "length"),
    ]
    scores = [RewardResult(1.0, "ok"), RewardResult(0.0, "timeout", "slow")]
    writes = build_group_writes(make_group(), outputs, scores, [0.5, 0.25], engine_id=2)
    assert [w.sample_id for w in writes] == ["7:0", "7:1"]
    assert [(w.min_version, w.max_version, w.length) for w in writes] == [(3, 4, 6), (4, 4, 7)]
    np.testing.assert_array_equal(writes[0].columns["versions"], [3, 4])
    np.testing.assert_array_equal(writes[1].columns["reward"], [0.0])
    first = SampleMetadata.from_column(writes[0].columns[META_COLUMN])
    assert first == SampleMetadata(
        engine_id=2,
        group_id=7,
        index=0,
        prompt_len=4,
        response_len=2,
        version_min=3,
        version_max=4,
        num_versions=2,
        admitted_version=3,
        finish_reason="stop",
        reward_status="ok",
        latency_s=0.5,
    )
    second = SampleMetadata.from_column(writes[1].columns[META_COLUMN])
    assert (second.num_versions, second.finish_reason, second.reward_status) == (1, "length", "timeout")


def test_metadata_column_survives_a_pickle_round_trip_as_a_structured_array():
    import pickle

    meta = SampleMetadata(1, 2, 0, 3, 4, 5, 6, 2, 5, "abort", "error", 0.125)
    column = pickle.loads(pickle.dumps(meta.column()))
    assert column.shape == (1,) and SampleMetadata.from_column(column) == meta


def test_dynamic_sampling_rule_drops_only_groups_whose_rewards_are_all_equal():
    assert rewards_all_equal([RewardResult(1.0, "ok")] * 4)
    assert rewards_all_equal([RewardResult(0.0, "ok"), RewardResult(0.0, "error", "x")])
    assert not rewards_all_equal([RewardResult(0.0, "ok"), RewardResult(1.0, "ok")])
