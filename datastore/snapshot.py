"""Snapshot files: the unconsumed samples of a store, written atomically, read back with a check.

Producer: ``DataStoreClient.snapshot`` (at a trainer checkpoint, writers and readers paused).
Consumer: ``DataStoreClient.restore`` (into the fresh store of a resumed run). The file is a pickled
``StoreSnapshot``; it is written to ``path.tmp``, fsynced, renamed over ``path`` and the directory
fsynced, so a crash leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import os
import pickle

from datastore.types import StoreSnapshot

FORMAT_VERSION = 1


def write_snapshot(path: str, snapshot: StoreSnapshot) -> None:
    tmp_path = f"{path}.tmp"
    with open(tmp_path, "wb") as f:
        pickle.dump(snapshot, f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_path, path)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def read_snapshot(path: str) -> StoreSnapshot:
    with open(path, "rb") as f:
        snapshot = pickle.load(f)
    if not isinstance(snapshot, StoreSnapshot) or snapshot.format_version != FORMAT_VERSION:
        raise ValueError(f"datastore.restore: {path} is not a datastore snapshot (format {FORMAT_VERSION})")
    return snapshot
