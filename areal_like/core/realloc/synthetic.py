"""Synthetic trainer weights for benchmarks and tests: seeded full tensors, and each trainer rank's
flat sources under a ``SourceLayout`` exactly as DeepSpeed would hold them (ZeRO-3 partitions
padded to equal length, the padding filled with garbage so a plan that reads it is caught)."""

from __future__ import annotations

import torch

from areal_like.core.realloc.layout import SourceLayout, TensorSpec, view2d, zero3_partition_numel
from areal_like.core.realloc.pack import TORCH_DTYPES, FlatSource
from areal_like.core.realloc.plan import Plan


def random_weights(
    specs: list[TensorSpec], seed: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Full logical tensors with seeded normal values (the trainer's copy, ``dtype``), generated on
    ``device`` so that every process of a run makes the same values without a transfer."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return {s.name: torch.randn(s.shape, generator=gen, dtype=dtype, device=device) for s in specs}


def layout_sources(
    layout: SourceLayout, weights: dict[str, torch.Tensor], rank: int
) -> dict[str, FlatSource]:
    """What trainer ``rank`` holds of ``weights`` under ``layout``."""
    out = {}
    for spec in layout.specs:
        flat = weights[spec.name].reshape(-1)
        if layout.kind == "replicated":
            out[spec.name] = FlatSource(flat, 0)
            continue
        part = zero3_partition_numel(spec.numel, layout.num_ranks)
        shard = torch.full((part,), float("nan"), dtype=flat.dtype, device=flat.device)
        start = rank * part
        mine = flat[start : start + part]
        shard[: mine.numel()] = mine
        out[spec.name] = FlatSource(shard, start)
    return out


def wire_cast(weights: dict[str, torch.Tensor], specs: list[TensorSpec]) -> dict[str, torch.Tensor]:
    """``weights`` cast to each spec's wire dtype: what the engines must end up holding."""
    return {s.name: weights[s.name].to(TORCH_DTYPES[s.dtype]) for s in specs}


def expected_engine_tensors(
    plan: Plan, weights: dict[str, torch.Tensor], engine_rank: int
) -> dict[str, torch.Tensor]:
    """What engine rank ``engine_rank`` must hold, built from the destination placements directly
    (not through buckets), so it checks the plan's packing and the executors' transport."""
    out: dict[str, torch.Tensor] = {}
    tensors = plan.dest.ranks[engine_rank]
    for t in tensors:
        if t.alias_of is not None:
            continue
        dst = torch.zeros(t.shape, dtype=TORCH_DTYPES[t.dtype], device=next(iter(weights.values())).device)
        rows, cols = view2d(t.shape)
        for p in t.placements:
            src = weights[p.src].reshape(view2d(tuple(weights[p.src].shape)))
            region = src[p.rect.row0 : p.rect.row1, p.rect.col0 : p.rect.col1]
            dst.view(rows, cols)[p.dst_row : p.dst_row + p.rect.rows, p.dst_col : p.dst_col + p.rect.cols] = (
                region
            )
        out[t.name] = dst
    for t in tensors:
        if t.alias_of is not None:
            out[t.name] = out[t.alias_of]
    return out
