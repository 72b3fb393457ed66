"""Colocated placement: an engine rank's staging arena shared with its trainer rank by CUDA IPC.

Once, at setup: the engine process allocates one persistent arena holding all of its staging
tensors (``IpcArena``) and hands its ``IpcHandle`` to the controller, which passes it to the
trainer rank on the same GPU; that rank opens it (``open_ipc_staging``) and keeps the mapping.
Every step: the trainer rank's ``ReallocExecutor.run(version, sources, staging={e: opened})``
writes straight into the arena (local pieces by a cast-and-copy on the GPU, pieces held by other
trainer ranks by NCCL broadcast into its receive buffers, then unpacked into the arena); after every
trainer rank returned, the controller tells the engine to load ``arena.views`` as ``version``.
No handle is created, no buffer allocated, and no tensor serialised per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from areal_like.core.realloc.pack import arena_layout, arena_views
from areal_like.core.realloc.plan import Plan

_DEVICE_ARG = 6
"""Index of the device ordinal in the argument tuple of ``reduce_tensor`` for a CUDA tensor
(``torch/multiprocessing/reductions.py``); rewritten to the opener's ordinal of the same GPU."""


@dataclass(frozen=True)
class IpcHandle:
    """How a colocated trainer rank maps an engine rank's staging arena. Made by ``IpcArena.handle``
    in the engine process, consumed once by ``open_ipc_staging`` in the trainer process."""

    engine_rank: int
    device_uuid: str
    """UUID of the GPU holding the arena (device ordinals differ between processes)."""
    nbytes: int
    rebuild: tuple
    """``torch.multiprocessing.reductions.reduce_tensor(arena)``: (function, args)."""


class IpcArena:
    """The engine side: a persistent uint8 arena on ``device`` with the rank's staging tensors as views."""

    def __init__(self, plan: Plan, engine_rank: int, device: torch.device) -> None:
        self.engine_rank = engine_rank
        tensors = plan.dest.ranks[engine_rank]
        _, total = arena_layout(tensors)
        self.arena = torch.zeros(total, dtype=torch.uint8, device=device)
        self.views = arena_views(self.arena, tensors)
        """Engine tensor name -> staging view; hand to ``update_weights`` after a transfer."""

    def handle(self) -> IpcHandle:
        from torch.multiprocessing.reductions import reduce_tensor

        uuid = str(torch.cuda.get_device_properties(self.arena.device).uuid)
        return IpcHandle(self.engine_rank, uuid, self.arena.numel(), reduce_tensor(self.arena))


def open_ipc_staging(plan: Plan, handle: IpcHandle) -> dict[str, torch.Tensor]:
    """The trainer side: map the arena of ``handle`` and return its staging views (call once)."""
    arena = _rebuild(handle.rebuild, handle.device_uuid, f"engine rank {handle.engine_rank}'s GPU")
    assert arena.numel() == handle.nbytes and arena.dtype == torch.uint8, (arena.shape, arena.dtype)
    return arena_views(arena, plan.dest.ranks[handle.engine_rank])


def share_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[str, tuple]]:
    """CUDA tensors as picklable IPC handles (name -> (GPU uuid, rebuild)); keep the tensors alive
    until the other process has opened and used them (``open_shared_tensors``)."""
    from torch.multiprocessing.reductions import reduce_tensor

    out = {}
    for name, tensor in tensors.items():
        if tensor.device.type != "cuda":
            raise ValueError(
                f"share_tensors: {name!r} is on {tensor.device}; only CUDA tensors can be shared"
            )
        out[name] = (str(torch.cuda.get_device_properties(tensor.device).uuid), reduce_tensor(tensor))
    return out


def open_shared_tensors(handles: dict[str, tuple[str, tuple]]) -> dict[str, torch.Tensor]:
    """The receiving side of ``share_tensors`` (same GPU, another process): views, no copy."""
    return {name: _rebuild(rebuild, uuid, f"tensor {name!r}") for name, (uuid, rebuild) in handles.items()}


def _rebuild(rebuild: tuple, device_uuid: str, what: str) -> torch.Tensor:
    """Open a ``reduce_tensor`` handle made in another process, on the local ordinal of its GPU."""
    ordinal = next(
        (
            i
            for i in range(torch.cuda.device_count())
            if str(torch.cuda.get_device_properties(i).uuid) == device_uuid
        ),
        None,
    )
    if ordinal is None:
        raise ValueError(
            f"CUDA IPC: {what} ({device_uuid}) is not visible in this process; colocated processes must "
            "share the GPU (place the engine on the GPU of the process that writes into it)"
        )
    fn, args = rebuild
    args = list(args)
    args[_DEVICE_ARG] = ordinal
    return fn(*args)


def colocated_hosts(num_trainer_ranks: int, num_engine_ranks: int) -> tuple[int, ...]:
    """Colocated placement with one engine rank per trainer GPU: engine rank e on trainer rank e."""
    if num_engine_ranks != num_trainer_ranks:
        raise ValueError(
            f"colocated placement: {num_engine_ranks} engine ranks on {num_trainer_ranks} trainer GPUs; "
            "give every trainer GPU exactly one engine rank (engines x tp == trainer ranks)"
        )
    return tuple(range(num_engine_ranks))
