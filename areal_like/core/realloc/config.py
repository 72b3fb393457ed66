"""Configuration of the weight-sync path (trainer ranks -> generation engines)."""

from __future__ import annotations

from dataclasses import dataclass

_BACKENDS = ("gloo", "nccl")
_PLACEMENTS = ("split", "colocated")


@dataclass
class ReallocConfig:
    """How new weights travel from the trainer ranks to the engines after each train step."""

    enabled: bool = False
    """Sync weights after every step with the plan executor (bucketed, several senders, its own
    process group). False: trainer rank 0's full state dict goes through the Ray object store."""
    backend: str = "gloo"
    """'gloo' (CPU tensors over TCP; the CPU machine and tests) or 'nccl' (GPU buffers)."""
    placement: str = "split"
    """'split': engines run in their own processes and receive over the wire. 'colocated': each
    engine rank shares a GPU with a trainer rank, which writes into the engine's staging arena
    through CUDA IPC (needs backend 'nccl' for pieces that other trainer ranks hold)."""
    bucket_mb: float = 256.0
    """Bucket size in MiB. >= 256 reaches ~97% of NCCL's peak (16 MiB loses ~25%); on gloo and in
    tests smaller buckets are fine."""
    timeout_s: float = 120.0
    """Timeout of every collective of a transfer; the error names the members that did not answer."""
    connect_timeout_s: float = 600.0
    """Timeout for the members to meet the first time (actors start at different speeds)."""
    checksum: bool = False
    """Append an int64 checksum to every bucket and verify it on receipt."""
    send_buffers: int = 2
    """Bucket buffers per sender: 2 = double buffering (pack the next while this one is sent)."""
    max_receive_buffers: int = 4
    """Bucket buffers per receiving process (it hears several senders at once, two each at most)."""

    def __post_init__(self) -> None:
        if self.backend not in _BACKENDS:
            raise ValueError(f"realloc.backend={self.backend!r}: use one of {list(_BACKENDS)}")
        if self.placement not in _PLACEMENTS:
            raise ValueError(f"realloc.placement={self.placement!r}: use one of {list(_PLACEMENTS)}")
        if self.placement == "colocated" and self.backend != "nccl":
            raise ValueError(
                "realloc.placement='colocated' needs realloc.backend='nccl' (CUDA IPC staging on GPUs); "
                "on CPU use placement='split'"
            )
        if not self.bucket_mb > 0:
            raise ValueError(f"realloc.bucket_mb={self.bucket_mb}: must be > 0 (256 on GPU)")
        for name in ("timeout_s", "connect_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"realloc.{name}={getattr(self, name)}: must be > 0 seconds")
        for name in ("send_buffers", "max_receive_buffers"):
            if getattr(self, name) < 1:
                raise ValueError(f"realloc.{name}={getattr(self, name)}: must be >= 1 (2 to overlap)")

    @property
    def bucket_bytes(self) -> int:
        return int(self.bucket_mb * (1 << 20))
