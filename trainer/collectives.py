"""Collectives over the trainer's process group that every rank of a step (RL or SFT) uses.

The group is gloo on CPU and NCCL on GPU (``deepspeed_engine.init_distributed``); every rank must
make the same calls in the same order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce_floats(values: list[float], op, world_size: int, device: torch.device) -> list[float]:
    """Reduce a short list of scalars over the ranks with ``op`` (a ``dist.ReduceOp``) in float64,
    one call for the whole list; a single rank returns the values as floats without a collective."""
    if world_size == 1:
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()
