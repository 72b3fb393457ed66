"""Trajectories as training tensors: the response layout for advantages, micro-batches for the model.

Shape legend: N = samples on this rank, R = longest response among them; a micro-batch has B rows
of L tokens. Position t of a row's ``input_ids`` predicts ``targets[t]``; a sample with prompt
length P and response length Rs placed at row offset o has its response targets at
o + P - 1 ... o + P + Rs - 2 (its "span").

- Padded micro-batch: one sample per row, right-padded, with an attention mask.
- Loss mask: 1 on the response tokens the policy sampled; a multi-turn response also holds
  environment tokens (tool results, chat glue) that are inputs and targets like any other token
  but get 0, so they are never trained. Advantages still run over the whole response span.
- Packed micro-batch: several samples per row back to back, position ids restarting at 0 for each
  and no attention mask; transformers then builds a block-diagonal causal mask (sdpa/eager) or
  variable-length kernels (flash-attention), so no token attends across samples. Rows are padded
  at the end with a separate dummy segment.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trainer.algorithms import token_logprobs_and_entropy


@dataclass
class SequenceSample:
    """One trajectory as the trainer needs it (numpy, from the datastore columns)."""

    prompt_ids: np.ndarray
    """int64 [P]"""
    response_ids: np.ndarray
    """int64 [Rs]"""
    behav_logprobs: np.ndarray
    """float32 [Rs] engine log-probs of the response tokens."""
    versions: np.ndarray
    """int64 [Rs] policy version per response token."""
    loss_mask: np.ndarray | None = None
    """[Rs] 1 on model-sampled tokens, 0 on environment tokens; None = all sampled (single-turn)."""

    @property
    def num_response_tokens(self) -> int:
        return len(self.response_ids)

    def response_loss_mask(self) -> torch.Tensor:
        """float32 [Rs] the loss mask (all ones when the sample has none)."""
        if self.loss_mask is None:
            return torch.ones(self.num_response_tokens)
        assert len(self.loss_mask) == self.num_response_tokens, (
            len(self.loss_mask),
            self.num_response_tokens,
        )
        return torch.from_numpy(np.asarray(self.loss_mask, dtype=np.float32))

    @property
    def length(self) -> int:
        """Model input tokens: prompt + response - 1 (the last token is only a target)."""
        return len(self.prompt_ids) + len(self.response_ids) - 1


@dataclass
class ResponseLayout:
    """All samples of a rank as one response-only rectangle, for per-token advantage math."""

    mask: torch.Tensor
    """float32 [N, R] 1 on response tokens (the span advantages run over)."""
    loss_mask: torch.Tensor
    """float32 [N, R] 1 on model-sampled response tokens (what the loss trains); equals ``mask``
    for single-turn samples."""
    behav_logp: torch.Tensor
    """float32 [N, R]"""
    versions: torch.Tensor
    """int64 [N, R], -1 off the response."""
    lengths: list[int]
    """Response length of each sample."""

    @classmethod
    def of(cls, samples: list[SequenceSample]) -> ResponseLayout:
        lengths = [s.num_response_tokens for s in samples]
        n, r = len(samples), max(lengths, default=0)
        mask = torch.zeros(n, max(r, 1))
        loss_mask = torch.zeros(n, max(r, 1))
        behav = torch.zeros(n, max(r, 1))
        versions = torch.full((n, max(r, 1)), -1, dtype=torch.long)
        for i, s in enumerate(samples):
            k = lengths[i]
            mask[i, :k] = 1.0
            loss_mask[i, :k] = s.response_loss_mask()
            behav[i, :k] = torch.from_numpy(np.asarray(s.behav_logprobs, dtype=np.float32))
            versions[i, :k] = torch.from_numpy(np.asarray(s.versions, dtype=np.int64))
        return cls(mask, loss_mask, behav, versions, lengths)

    def zeros(self) -> torch.Tensor:
        return torch.zeros_like(self.mask)


@dataclass
class MicroBatch:
    """Model inputs of one forward/backward pass and where each sample's response sits in them."""

    input_ids: torch.Tensor
    """int64 [B, L]"""
    position_ids: torch.Tensor
    """int64 [B, L], restarting at 0 for every packed sample."""
    attention_mask: torch.Tensor | None
    """int64 [B, L] for padded micro-batches; None when packed (position ids delimit samples)."""
    targets: torch.Tensor
    """int64 [B, L] next-token ids (0 where padded)."""
    loss_mask: torch.Tensor
    """float32 [B, L] 1 on model-sampled response targets (0 on environment tokens and padding)."""
    sample_index: list[int]
    """Rank-local index of each sample in the micro-batch (row of the ResponseLayout)."""
    rows: list[int]
    """Row of each sample's span."""
    starts: list[int]
    """First target position of each sample's span."""
    lengths: list[int]
    """Response tokens of each sample (span length)."""
    num_real_tokens: int
    """Input tokens of real samples (B x L minus padding)."""

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    @property
    def num_slots(self) -> int:
        """Token positions the model computes (B x L), padding included."""
        return int(self.input_ids.numel())

    def to(self, device: torch.device) -> MicroBatch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return MicroBatch(**moved)

    def model_inputs(self) -> dict[str, torch.Tensor | None | bool]:
        return dict(
            input_ids=self.input_ids,
            attention_mask=self.attention_mask,
            position_ids=self.position_ids,
            use_cache=False,  # a cache disables packed-sequence detection and is useless in training
        )

    def scored_positions(self) -> torch.Tensor:
        """Sorted columns of [B, L] that hold some sample's response targets: the only positions
        whose logits a loss reads (at least one, so an empty micro-batch still runs the head)."""
        columns = {
            p for start, k in zip(self.starts, self.lengths, strict=True) for p in range(start, start + k)
        }
        return torch.tensor(sorted(columns) or [0], dtype=torch.long, device=self.targets.device)

    def scatter(self, source: torch.Tensor) -> torch.Tensor:
        """Response-layout values [N, R] -> this micro-batch's layout [B, L] (0 off the spans)."""
        out = torch.zeros(self.targets.shape, dtype=source.dtype, device=self.targets.device)
        for i, row, start, k in zip(self.sample_index, self.rows, self.starts, self.lengths, strict=True):
            out[row, start : start + k] = source[i, :k].to(out.device)
        return out

    def gather_into(self, values: torch.Tensor, dest: torch.Tensor) -> None:
        """This micro-batch's values [B, L] -> rows of the response layout ``dest`` [N, R]."""
        values = values.detach().to(dest.device, dest.dtype)
        for i, row, start, k in zip(self.sample_index, self.rows, self.starts, self.lengths, strict=True):
            dest[i, :k] = values[row, start : start + k]


def response_logprobs(
    model, micro: MicroBatch, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropy) [B, L] of ``micro``'s targets under ``model``, 0 off the scored
    positions. The output head runs only at ``micro.scored_positions()`` (transformers'
    ``logits_to_keep``): with a 152k-token vocabulary the head over the prompt positions is most of
    a small model's forward and backward, and no loss reads it."""
    keep = micro.scored_positions()
    logits = model(**micro.model_inputs(), logits_to_keep=keep).logits  # [B, K, V]
    logp, entropy = token_logprobs_and_entropy(logits, micro.targets[:, keep], temperature, with_entropy)
    shape = micro.targets.shape
    full_logp = logp.new_zeros(shape).index_copy(1, keep, logp)
    full_entropy = None if entropy is None else entropy.new_zeros(shape).index_copy(1, keep, entropy)
    return full_logp, full_entropy


def _sequence(sample: SequenceSample) -> torch.Tensor:
    ids = np.concatenate([np.asarray(sample.prompt_ids), np.asarray(sample.response_ids)])
    return torch.from_numpy(ids.astype(np.int64))


def collate(samples: list[SequenceSample], indices: list[int], pad_id: int = 0) -> MicroBatch:
    """Right-pad ``samples[i] for i in indices`` into one padded micro-batch, a row each."""
    assert indices, "collate needs at least one sample"
    lengths = [samples[i].length for i in indices]
    n, t = len(indices), max(lengths)
    input_ids = torch.full((n, t), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, t), dtype=torch.long)
    targets = torch.zeros((n, t), dtype=torch.long)
    loss_mask = torch.zeros((n, t), dtype=torch.float32)
    starts, spans = [], []
    for row, i in enumerate(indices):
        s = samples[i]
        seq = _sequence(s)
        input_ids[row, : lengths[row]] = seq[:-1]
        attention_mask[row, : lengths[row]] = 1
        targets[row, : lengths[row]] = seq[1:]
        start = len(s.prompt_ids) - 1
        loss_mask[row, start : start + s.num_response_tokens] = s.response_loss_mask()
        starts.append(start)
        spans.append(s.num_response_tokens)
    position_ids = torch.arange(t).expand(n, t).clone()
    return MicroBatch(
        input_ids,
        position_ids,
        attention_mask,
        targets,
        loss_mask,
        list(indices),
        list(range(n)),
        starts,
        spans,
        sum(lengths),
    )


def collate_packed(
    samples: list[SequenceSample],
    indices: list[int],
    row_tokens: int | None,
    pad_id: int = 0,
    width: int | None = None,
) -> MicroBatch:
    """Pack ``samples[i] for i in indices`` into rows of at most ``row_tokens`` tokens (first fit,
    longest first; None = a single row), padding rows to the longest, or to ``width`` when that is
    longer (one shape for every micro-batch, so a compiled kernel is not recompiled per length)."""
    assert indices, "collate_packed needs at least one sample"
    order = sorted(indices, key=lambda i: -samples[i].length)
    capacity = row_tokens if row_tokens is not None else sum(samples[i].length for i in indices)
    capacity = max(capacity, samples[order[0]].length)
    row_members: list[list[int]] = []
    row_fill: list[int] = []
    for i in order:
        n = samples[i].length
        for r, fill in enumerate(row_fill):
            if fill + n <= capacity:
                row_members[r].append(i)
                row_fill[r] += n
                break
        else:
            row_members.append([i])
            row_fill.append(n)
    num_rows, width = len(row_members), max(max(row_fill), width or 0)
    input_ids = torch.full((num_rows, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((num_rows, width), dtype=torch.long)
    targets = torch.zeros((num_rows, width), dtype=torch.long)
    loss_mask = torch.zeros((num_rows, width), dtype=torch.float32)
    sample_index, rows, starts, spans = [], [], [], []
    for r, members in enumerate(row_members):
        offset = 0
        for i in members:
            s = samples[i]
            seq, n = _sequence(s), s.length
            input_ids[r, offset : offset + n] = seq[:-1]
            targets[r, offset : offset + n] = seq[1:]
            position_ids[r, offset : offset + n] = torch.arange(n)
            start = offset + len(s.prompt_ids) - 1
            loss_mask[r, start : start + s.num_response_tokens] = s.response_loss_mask()
            sample_index.append(i)
            rows.append(r)
            starts.append(start)
            spans.append(s.num_response_tokens)
            offset += n
        # The tail is its own dummy segment (positions restart), so it never joins a real sample.
        position_ids[r, offset:] = torch.arange(width - offset)
    return MicroBatch(
        input_ids, position_ids, None, targets, loss_mask, sample_index, rows, starts, spans, sum(row_fill)
    )


def collate_micro_batch(
    samples: list[SequenceSample],
    indices: list[int],
    packing: bool,
    attn_implementation: str,
    pad_id: int,
    budget: int | None = None,
) -> MicroBatch:
    """The layout the config asks for. Varlen flash-attention and flex-attention (whose block mask
    skips the blocks between sequences) pack a whole micro-batch into one row; sdpa/eager build a
    dense block-diagonal mask per row, so their rows stay as long as the longest sequence
    (attention cost ~ tokens x longest, not tokens^2). Flex rows are padded to the token ``budget``
    (or the next power of two without one): its compiled kernel is specialised to the row length,
    and a new length per micro-batch recompiles every time (measured: > 8 min for 3 micro-batches)."""
    if not packing:
        return collate(samples, indices, pad_id)
    if attn_implementation == "flex_attention":
        total = sum(samples[i].length for i in indices)
        width = budget if budget is not None and budget >= total else 1 << max(total - 1, 1).bit_length()
        return collate_packed(samples, indices, None, pad_id, width=width)
    varlen = attn_implementation.startswith("flash")
    row_tokens = None if varlen else max(samples[i].length for i in indices)
    return collate_packed(samples, indices, row_tokens, pad_id)


def dummy_micro_batch(pad_id: int = 0) -> MicroBatch:
    """A one-token micro-batch with no loss tokens: a rank with fewer micro-batches than its peers
    runs these so every rank issues the same collectives (ZeRO reductions and gathers)."""
    ids = torch.full((1, 1), pad_id, dtype=torch.long)
    return MicroBatch(
        ids,
        torch.zeros_like(ids),
        torch.ones_like(ids),
        torch.zeros_like(ids),
        torch.zeros(1, 1),
        [],
        [],
        [],
        [],
        0,
    )


def split_even(items: list, num_parts: int) -> list[list]:
    """Split into ``num_parts`` contiguous chunks whose sizes differ by at most one."""
    base, extra = divmod(len(items), num_parts)
    parts, start = [], 0
    for i in range(num_parts):
        size = base + (1 if i < extra else 0)
        parts.append(items[start : start + size])
        start += size
    return parts
