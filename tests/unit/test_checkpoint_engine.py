"""The trainer ranks' checkpoint engine: checksummed writes, background writes of a snapshot.

A background write into a named pipe (FIFO) cannot finish before the test reads the pipe, so
"the caller goes on while the file is written" is observed, not timed.
"""

from __future__ import annotations

import errno
import io
import os
import threading
import time
import zlib
from collections import OrderedDict

import torch

from trainer.checkpoint_engine import SnapshotCheckpointEngine, WriteProgress, snapshot, write_checksummed


def state_dict() -> dict:
    return {
        "module": OrderedDict(w=torch.arange(1000, dtype=torch.float32), b=torch.ones(3)),
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(1000), "step": torch.tensor(2.0)}}, "lr": 0.1},
        "global_steps": 2,
    }


def mutate(sd: dict) -> None:
    """What the next optimizer step does to the live tensors."""
    sd["module"]["w"].add_(1.0)
    sd["optimizer"]["state"][0]["exp_avg"].fill_(7.0)
    sd["optimizer"]["state"][0]["step"].add_(1)


def wait_done(engine, timeout_s: float = 30.0) -> WriteProgress:
    deadline = time.monotonic() + timeout_s
    while not (progress := engine.progress()).done:
        assert time.monotonic() < deadline, "background write did not finish"
        time.sleep(0.01)
    return progress


def test_a_foreground_write_reports_size_and_checksum_of_the_file(tmp_path):
    path = str(tmp_path / "model.pt")
    written = write_checksummed(state_dict(), path)
    with open(path, "rb") as f:
        data = f.read()
    assert (written.size, written.crc32) == (len(data), zlib.crc32(data))
    assert torch.equal(torch.load(path, weights_only=False)["module"]["w"], torch.arange(1000.0))


def test_a_snapshot_is_not_changed_by_training_and_keeps_container_types():
    live = state_dict()
    copy = snapshot(live)
    mutate(live)
    assert isinstance(copy["module"], OrderedDict) and copy["global_steps"] == 2
    assert torch.equal(copy["module"]["w"], torch.arange(1000.0))
    assert float(copy["optimizer"]["state"][0]["exp_avg"].sum()) == 0.0
    assert float(copy["optimizer"]["state"][0]["step"]) == 2.0


def test_a_background_save_returns_before_the_write_and_writes_the_state_of_the_save(tmp_path):
    pipe = str(tmp_path / "model.pt")
    os.mkfifo(pipe)  # the writer blocks in open() until the test reads: the write cannot be early
    engine = SnapshotCheckpointEngine()
    engine.begin(background=True)
    live = state_dict()
    engine.save(live, pipe)
    assert not engine.progress().done  # save() returned; the file is still being written
    mutate(live)  # training goes on

    received = []

    def read_pipe():
        with open(pipe, "rb") as f:
            received.append(f.read())

    reader = threading.Thread(target=read_pipe)
    reader.start()
    reader.join(30)
    progress = wait_done(engine)
    assert progress.error is None and [f.path for f in progress.files] == [pipe]
    data = received[0]
    assert (progress.files[0].size, progress.files[0].crc32) == (len(data), zlib.crc32(data))
    saved = torch.load(io.BytesIO(data), weights_only=False)
    assert torch.equal(saved["module"]["w"], torch.arange(1000.0))  # not the mutated values
    assert float(saved["optimizer"]["state"][0]["step"]) == 2.0


def test_a_write_error_is_reported_not_raised_and_the_next_checkpoint_starts_clean(tmp_path):
    os.symlink("/dev/full", tmp_path / "full.pt")  # every write fails with ENOSPC
    engine = SnapshotCheckpointEngine()
    for background in (False, True):
        engine.begin(background)
        engine.save(state_dict(), str(tmp_path / "full.pt"))
        engine.save(state_dict(), str(tmp_path / "after.pt"))  # skipped: this checkpoint failed
        progress = wait_done(engine)
        assert progress.errno == errno.ENOSPC and "full.pt" in progress.error
        assert "No space left on device" in progress.error and progress.files == []
    engine.begin(background=True)
    engine.save(state_dict(), str(tmp_path / "ok.pt"))
    progress = wait_done(engine)
    assert progress.error is None and [os.path.basename(f.path) for f in progress.files] == ["ok.pt"]
