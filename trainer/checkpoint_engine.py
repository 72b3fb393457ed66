"""The trainer ranks' DeepSpeed checkpoint engine: every file checksummed as it is written, and
optionally written in the background while training goes on.

DeepSpeed's ``engine.save_checkpoint`` gathers each file's state dict (module, ZeRO optimizer
partition, scheduler, client state) and hands it to ``checkpoint_engine.save(state_dict, path)``.
``SnapshotCheckpointEngine`` plugs in there, so the files keep DeepSpeed's own layout (which
``zero_to_fp32``, ``ds_to_universal`` and our export read):

- foreground: the file is serialised through a writer that computes its CRC-32 on the way out, and
  fsynced; the caller gets each file's size and checksum (the manifest needs no second read);
- background: ``save`` only snapshots the state dict (every tensor copied to host memory: the live
  tensors change at the next optimizer step) and queues it; one writer thread serialises, writes
  and checksums the queue while the rank trains on. ``progress()`` polls it without blocking.

Why not DeepSpeed's ``DecoupledCheckpointEngine`` or torch DCP's ``async_save``: the decoupled
engine hands tensors to a writer process through a torch multiprocessing queue, which moves CPU
tensors into shared memory (so the "copy" keeps changing with training) and still blocks in
``commit`` at the end of every save; its writer needs DeepSpeed's async-io op. DCP saves DTensor
state dicts in its own format, which ZeRO's flat partitions are not and which DeepSpeed's loaders,
``zero_to_fp32`` and ``ds_to_universal`` do not read. A snapshot into host memory at the step
boundary, then a background write (as DataStates-LLM does), fits DeepSpeed's engine interface.

Dataflow: the rank's thread (train steps) -> ``save`` -> queue -> writer thread -> files; the
controller polls ``progress`` (a WriteProgress) and commits the checkpoint when every rank is done.
A write error (a full disk) is kept and reported by ``progress``; the queue is then drained unwritten.
"""

from __future__ import annotations

import copy
import logging
import os
import queue
import stat
import threading
import zlib
from dataclasses import dataclass, field

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointCommitInfo, CheckpointEngine

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WrittenFile:
    """One checkpoint file a rank wrote (rank -> controller, for the manifest)."""

    path: str
    """Absolute path."""
    size: int
    """Bytes."""
    crc32: int
    """zlib.crc32 of the bytes written."""


@dataclass
class WriteProgress:
    """A rank's checkpoint writes since its last ``save_checkpoint`` (rank -> controller)."""

    done: bool
    """Every queued file is written (or the writes stopped at an error)."""
    files: list[WrittenFile] = field(default_factory=list)
    error: str | None = None
    """The first write error (its type, message and file), or None."""
    errno: int | None = None
    """That error's errno when it was an OSError (ENOSPC: the disk is full)."""


class _ChecksumWriter:
    """A file object for ``torch.save`` that checksums what passes through it."""

    def __init__(self, f) -> None:
        self._f = f
        self.crc = 0
        self.size = 0

    def write(self, data) -> int:
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()


def write_checksummed(obj, path: str) -> WrittenFile:
    """``torch.save(obj, path)``, fsynced, with the size and CRC-32 of the bytes written."""
    with open(path, "wb") as f:
        writer = _ChecksumWriter(f)
        torch.save(obj, writer)
        f.flush()
        if stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # pipes and devices cannot be fsynced
            os.fsync(f.fileno())
    return WrittenFile(path, writer.size, writer.crc)


def snapshot(obj):
    """A copy of a state dict that training cannot change: tensors copied to host memory
    (pinned when they live on a GPU, so the copy is one DMA), containers rebuilt, other leaves
    deep-copied."""
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "cpu":
            return obj.detach().clone()
        out = torch.empty(obj.shape, dtype=obj.dtype, device="cpu", pin_memory=True)
        return out.copy_(obj.detach(), non_blocking=True)
    if isinstance(obj, dict):
        try:  # dict, OrderedDict (module state dicts)
            return type(obj)((k, snapshot(v)) for k, v in obj.items())
        except TypeError:  # a mapping with another constructor (defaultdict)
            return copy.deepcopy(obj)
    if type(obj) in (list, tuple):
        return type(obj)(snapshot(v) for v in obj)
    return copy.deepcopy(obj)


class SnapshotCheckpointEngine(CheckpointEngine):
    """DeepSpeed checkpoint engine with checksummed, optionally background writes (see above)."""

    def __init__(self) -> None:
        super().__init__()
        self.name = "SnapshotCheckpointEngine"
        self.background = False
        """Set per save by the rank: True queues the writes instead of doing them now."""
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._written: list[WrittenFile] = []
        self._pending = 0
        self._error: Exception | None = None
        self._error_path: str | None = None
        self._thread: threading.Thread | None = None

    # ---- DeepSpeed's interface ---------------------------------------------------------------
    def create(self, info: CheckpointCommitInfo) -> None:
        pass

    def save(self, state_dict, path: str) -> None:
        if not self.background:
            # A failure is reported by progress(), not raised: raising here would leave the other
            # ranks waiting in DeepSpeed's end-of-save barrier.
            self._write_one(state_dict, path)
            return
        copied = snapshot(state_dict)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the non-blocking device-to-host copies are complete
        with self._lock:
            self._pending += 1
        self._ensure_thread()
        self._queue.put((copied, path))

    def load(self, path: str, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=False)

    def commit(self, info: CheckpointCommitInfo) -> bool:
        return True  # background writes are committed by the controller once every rank is done

    # ---- the rank's side ---------------------------------------------------------------------
    def begin(self, background: bool) -> None:
        """Start a new checkpoint: forget the previous one's files (it must be finished)."""
        with self._lock:
            assert self._pending == 0, "a checkpoint is saved while the previous one is still written"
            self._written, self._error, self._error_path = [], None, None
        self.background = background

    def progress(self) -> WriteProgress:
        with self._lock:
            error = None
            if self._error is not None:
                error = f"{type(self._error).__name__} writing {self._error_path}: {self._error}"
            return WriteProgress(
                done=self._pending == 0,
                files=list(self._written),
                error=error,
                errno=getattr(self._error, "errno", None),
            )

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._write_loop, name="checkpoint-writer", daemon=True)
            self._thread.start()

    def _write_one(self, state_dict, path: str) -> None:
        if self._error is not None:  # after a failure the rest of this checkpoint is moot
            return
        try:
            written = write_checksummed(state_dict, path)
        except Exception as err:  # a named fault boundary: reported through progress()
            logger.error("checkpoint write of %s failed: %s", path, err)
            with self._lock:
                self._error, self._error_path = err, path
            return
        with self._lock:
            self._written.append(written)

    def _write_loop(self) -> None:
        while True:
            state_dict, path = self._queue.get()
            try:
                self._write_one(state_dict, path)
            finally:
                del state_dict
                with self._lock:
                    self._pending -= 1


def install(*engines) -> SnapshotCheckpointEngine:
    """One ``SnapshotCheckpointEngine`` for all of a rank's DeepSpeed engines (policy, critic)."""
    io = SnapshotCheckpointEngine()
    for engine in engines:
        if engine is not None:
            engine.checkpoint_engine = io
    return io
