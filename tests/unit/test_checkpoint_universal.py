"""Which trainer layout changes a resume makes through a universal checkpoint, and which it refuses."""

from __future__ import annotations

import pytest

from areal_like.checkpoint_universal import TrainerLayout, needs_conversion
from areal_like.config import ConfigError


def test_the_same_layout_or_an_older_checkpoint_loads_directly():
    assert not needs_conversion(TrainerLayout(2, 2), TrainerLayout(2, 2), step=4)
    assert not needs_conversion(None, TrainerLayout(4, 3), step=4)
    assert not needs_conversion(TrainerLayout(2, 0), TrainerLayout(1, 0), step=4)  # no ZeRO: replicated


@pytest.mark.parametrize(("saved", "now"), [((2, 2), (1, 3)), ((1, 3), (2, 2)), ((2, 1), (4, 1))])
def test_another_rank_count_or_zero_stage_goes_through_a_universal_checkpoint(saved, now):
    assert needs_conversion(TrainerLayout(*saved), TrainerLayout(*now), step=4)


def test_a_change_to_or_from_zero_stage_0_is_refused_with_what_works():
    with pytest.raises(ConfigError) as err:
        needs_conversion(TrainerLayout(2, 0), TrainerLayout(2, 2), step=4)
    message = str(err.value)
    assert "checkpoint step 4 was saved with train.num_ranks=2 train.zero_stage=0" in message
    assert "cannot resume as train.num_ranks=2 train.zero_stage=2" in message
    assert "Resume with train.zero_stage=0" in message and "run.resume=false" in message
