"""Turn trajectories into padded training tensors, and a batch into minibatches and micro-batches.

Shapes: N sequences in a micro-batch, T = longest (prompt + response - 1) in it. Position t of
``input_ids`` predicts ``targets[t]``; response token j of a sample with prompt length P sits at
target position P - 1 + j.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class SequenceSample:
    """One trajectory as the trainer needs it (numpy, from the datastore columns)."""

    prompt_ids: np.ndarray
    """int64 [P]"""
    response_ids: np.ndarray
    """int64 [R]"""
    behav_logprobs: np.ndarray
    """float32 [R]"""
    versions: np.ndarray
    """int64 [R]"""
    advantage: float

    @property
    def num_response_tokens(self) -> int:
        return len(self.response_ids)


@dataclass
class MicroBatch:
    input_ids: torch.Tensor
    """int64 [N, T]"""
    attention_mask: torch.Tensor
    """int64 [N, T]"""
    targets: torch.Tensor
    """int64 [N, T] next-token ids (0 where padded)"""
    loss_mask: torch.Tensor
    """float32 [N, T] 1 on response tokens"""
    behav_logp: torch.Tensor
    """float32 [N, T] engine log-probs at response positions"""
    versions: torch.Tensor
    """int64 [N, T] policy version at response positions, -1 elsewhere"""
    advantages: torch.Tensor
    """float32 [N]"""

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    def to(self, device: torch.device) -> MicroBatch:
        return MicroBatch(**{k: v.to(device) for k, v in self.__dict__.items()})


def collate(samples: list[SequenceSample], pad_id: int = 0) -> MicroBatch:
    """Right-pad samples into one micro-batch."""
    assert samples, "collate needs at least one sample"
    lengths = [len(s.prompt_ids) + len(s.response_ids) - 1 for s in samples]
    n, t = len(samples), max(lengths)
    input_ids = torch.full((n, t), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, t), dtype=torch.long)
    targets = torch.zeros((n, t), dtype=torch.long)
    loss_mask = torch.zeros((n, t), dtype=torch.float32)
    behav_logp = torch.zeros((n, t), dtype=torch.float32)
    versions = torch.full((n, t), -1, dtype=torch.long)
    for i, s in enumerate(samples):
        seq = torch.from_numpy(np.concatenate([s.prompt_ids, s.response_ids]).astype(np.int64))
        length = lengths[i]
        input_ids[i, :length] = seq[:-1]
        attention_mask[i, :length] = 1
        targets[i, :length] = seq[1:]
        start, end = len(s.prompt_ids) - 1, length
        loss_mask[i, start:end] = 1.0
        behav_logp[i, start:end] = torch.from_numpy(s.behav_logprobs.astype(np.float32))
        versions[i, start:end] = torch.from_numpy(s.versions.astype(np.int64))
    advantages = torch.tensor([s.advantage for s in samples], dtype=torch.float32)
    return MicroBatch(input_ids, attention_mask, targets, loss_mask, behav_logp, versions, advantages)


def split_even(items: list, num_parts: int) -> list[list]:
    """Split into ``num_parts`` contiguous chunks whose sizes differ by at most one."""
    base, extra = divmod(len(items), num_parts)
    parts, start = [], 0
    for i in range(num_parts):
        size = base + (1 if i < extra else 0)
        parts.append(items[start : start + size])
        start += size
    return parts


def num_micro_batches(samples_per_minibatch: int, micro_batch_size: int) -> int:
    return -(-samples_per_minibatch // micro_batch_size)
