"""The layout of trainer/sequence_parallel.py: how rows are split over ranks and which positions
attend to which (the collectives are tested over gloo in tests/integration/test_sequence_parallel.py)."""

from __future__ import annotations

import torch

from trainer.batch import SequenceSample, collate_packed
from trainer.sequence_parallel import segment_causal_mask, shard_length, shard_positions, shard_rows


def test_rows_split_into_equal_shards_padded_at_the_end():
    x = torch.arange(1, 8)[None]  # L = 7 over 2 ranks: 4 + 4 with one pad
    assert shard_length(7, 2) == 4
    assert shard_rows(x, 0, 2).tolist() == [[1, 2, 3, 4]]
    assert shard_rows(x, 1, 2, pad_value=-1).tolist() == [[5, 6, 7, -1]]
    assert torch.equal(torch.cat([shard_rows(x, r, 3) for r in range(3)], dim=1)[:, :7], x)


def test_position_padding_is_a_segment_of_its_own():
    pos = torch.tensor([[0, 1, 2, 0, 1]])
    shards = [shard_positions(pos, r, 4) for r in range(4)]  # padded to 8
    assert torch.cat(shards, dim=1).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    mask = segment_causal_mask(torch.cat(shards, dim=1))[0, 0]
    assert not mask[5:, :5].any()  # the padding never attends to a real token


def test_segment_mask_is_block_diagonal_causal_over_packed_sequences():
    mask = segment_causal_mask(torch.tensor([[0, 1, 2, 0, 1]]))[0, 0].int()
    assert mask.tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]


def test_segment_mask_matches_what_transformers_builds_for_a_packed_row():
    from transformers import Qwen2Config
    from transformers.masking_utils import create_causal_mask

    samples = [
        SequenceSample(
            torch.arange(3, 3 + p).numpy(),
            torch.arange(5, 5 + r).numpy(),
            torch.zeros(r).numpy(),
            torch.zeros(r).numpy(),
        )
        for p, r in ((3, 4), (2, 2), (4, 1))
    ]
    micro = collate_packed(samples, [0, 1, 2], row_tokens=None)
    config = Qwen2Config(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1)
    config._attn_implementation = "eager"  # always materialises the 4D mask
    embeds = torch.zeros(1, micro.input_ids.shape[1], 16)
    hf = create_causal_mask(
        config=config, inputs_embeds=embeds, attention_mask=None, past_key_values=None,
        position_ids=micro.position_ids,
    )  # fmt: skip
    assert torch.equal(hf == 0, segment_causal_mask(micro.position_ids))  # eager: 0 attend, -inf not
