"""Tensor mechanics of continuous batching on a transformers causal LM: a left-padded batch of
sequences with its KV cache that rows can join (``prefill`` then ``concat``) and leave (``select``),
advanced one token per row per ``decode`` step. No threads, no scheduling: ``HFEngine`` decides who
joins and leaves; this module only keeps the cache, the attention mask and the positions consistent.

Layout: row r's real tokens sit right-aligned in columns [L - n_r, L) of the cache, where n_r is
its length; columns on the left are padding, masked out. Positions are explicit (0..n_r-1 for the
real tokens), so rotary embeddings never see the padding, and a row's keys do not depend on how
much padding it has: rows can be moved between batches of different widths (``concat`` pads on the
left). Columns that are padding in every row are cut off after rows leave, so the batch is only as
wide as its longest live row.

Shape legend: B = rows, L = cache columns (left padding included), V = vocabulary,
H = key/value heads, D = head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel


@dataclass
class PaddedBatch:
    """Rows being decoded together: their KV cache, attention mask and lengths."""

    cache: DynamicCache
    """Per layer keys and values [B, H, L, D], left-padded."""
    mask: torch.Tensor
    """long [B, L]: 1 where the column holds a real token of the row."""
    lengths: torch.Tensor
    """long [B]: real tokens per row (the position the row's next token goes to)."""

    @property
    def num_rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def num_cols(self) -> int:
        return int(self.mask.shape[1])


@torch.no_grad()
def prefill(
    model: PreTrainedModel, sequences: list[list[int]], pad_token_id: int
) -> tuple[torch.Tensor, PaddedBatch]:
    """Encode ``sequences`` into a fresh batch; returns the next-token logits [B, V] and the batch."""
    lengths = torch.tensor([len(seq) for seq in sequences], dtype=torch.long)  # [B]
    num_cols = int(lengths.max())
    input_ids = torch.full((len(sequences), num_cols), pad_token_id, dtype=torch.long)  # [B, L]
    mask = torch.zeros_like(input_ids)  # [B, L]
    for row, seq in enumerate(sequences):
        input_ids[row, num_cols - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, num_cols - len(seq) :] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, L]
    cache = DynamicCache(config=model.config)
    output = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return output.logits[:, -1, :].float(), PaddedBatch(cache, mask, lengths)


@torch.no_grad()
def decode(model: PreTrainedModel, batch: PaddedBatch, tokens: torch.Tensor) -> torch.Tensor:
    """Feed one token per row (long [B]) and append it to the batch; returns next-token logits [B, V]."""
    batch.mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], dim=1)  # [B, L + 1]
    output = model(
        input_ids=tokens[:, None],
        attention_mask=batch.mask,
        position_ids=batch.lengths[:, None],
        past_key_values=batch.cache,
        use_cache=True,
    )
    batch.lengths = batch.lengths + 1
    return output.logits[:, -1, :].float()


def select(batch: PaddedBatch, keep: torch.Tensor) -> None:
    """Keep only rows ``keep`` (long [B']) in order, then cut columns that are padding in every row."""
    batch.cache.batch_select_indices(keep)
    batch.mask, batch.lengths = batch.mask[keep], batch.lengths[keep]
    used = batch.mask.any(dim=0)  # [L]
    first = int(used.to(torch.int8).argmax()) if bool(used.any()) else batch.num_cols
    if first > 0:
        for layer in batch.cache.layers:
            layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
        batch.mask = batch.mask[:, first:]


def concat(first: PaddedBatch, second: PaddedBatch) -> PaddedBatch:
    """Rows of ``first`` then rows of ``second`` in one batch (the narrower one padded on the left)."""
    width = max(first.num_cols, second.num_cols)
    for layer_a, layer_b in zip(first.cache.layers, second.cache.layers, strict=True):
        layer_a.keys = torch.cat([_pad_cols(layer_a.keys, width), _pad_cols(layer_b.keys, width)])
        layer_a.values = torch.cat([_pad_cols(layer_a.values, width), _pad_cols(layer_b.values, width)])
    first.mask = torch.cat([_pad_mask(first.mask, width), _pad_mask(second.mask, width)])
    first.lengths = torch.cat([first.lengths, second.lengths])
    return first


def _pad_cols(states: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad keys or values [B, H, L, D] with zeros to ``width`` columns."""
    return F.pad(states, (0, 0, width - states.shape[-2], 0))


def _pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(mask, (width - mask.shape[1], 0))
