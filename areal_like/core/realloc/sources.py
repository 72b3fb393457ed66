"""The trainer side's view of its own weights: logical tensor specs and flat sources per parameter.

Called on a DeepSpeed rank with ``engine.module`` (outside any ``GatheredParameters`` context).
Under ZeRO-3 a parameter's ``ds_tensor`` is this rank's flat partition (``ds_shape`` the full
shape); the realloc plan reads straight from it, so no rank ever gathers a full parameter.
Under ZeRO-0/1/2 every rank holds full parameters (DeepSpeed all-gathers them after each step).
"""

from __future__ import annotations

import torch

from areal_like.core.realloc.layout import TensorSpec, zero3_partition_numel
from areal_like.core.realloc.pack import FlatSource


def tensor_specs(module: torch.nn.Module, dtype: str) -> list[TensorSpec]:
    """Logical tensors of ``module`` in ``named_parameters`` order, with ``dtype`` (the engines')
    as wire dtype. Tied parameters appear once, under their first name."""
    return [
        TensorSpec(name, tuple(getattr(p, "ds_shape", None) or p.shape), dtype)
        for name, p in module.named_parameters()
    ]


def flat_sources(module: torch.nn.Module, rank: int, num_ranks: int) -> dict[str, FlatSource]:
    """Every parameter of ``module`` as held by trainer ``rank`` of ``num_ranks``.

    ZeRO-3 partitions are checked against the plan's assumption (DeepSpeed's even, padded split
    over the data-parallel group); hierarchical partitioning (hpZ, MiCS) is not supported.
    """
    out = {}
    for name, p in module.named_parameters():
        part = getattr(p, "ds_tensor", None)
        if part is None:
            out[name] = FlatSource(p.detach().reshape(-1), 0)
            continue
        expected = zero3_partition_numel(p.ds_numel, num_ranks)
        if part.numel() != expected:
            raise ValueError(
                f"realloc: ZeRO-3 partition of {name!r} has {part.numel()} elements on rank {rank}; "
                f"an even split of {p.ds_numel} over {num_ranks} ranks has {expected}. Hierarchical "
                "partitioning (zero_hpz_partition_size, MiCS) is not supported by the realloc plan."
            )
        out[name] = FlatSource(part.detach().reshape(-1), rank * expected)
    return out
