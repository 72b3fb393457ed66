"""Checkpoint manifests: every file of a checkpoint with its size and checksum, written last.

``manifest.json`` is the last file written into a staged checkpoint, so a checkpoint directory
without one never finished saving. ``verify`` re-reads the files and names the first damage it
finds (a missing directory or file, a truncated or grown file, a checksum mismatch) in words a
user can act on; ``None`` means the checkpoint is intact.

The checksum is CRC-32 (zlib): it is there to catch truncation and corruption, not tampering, and
it runs several times faster than SHA-256 on CPUs without SHA instructions, which matters when a
resume re-reads tens of gigabytes. Files are hashed on a few threads (zlib releases the GIL).
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_CHUNK_BYTES = 8 << 20
_HASH_THREADS = 4


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint, as the manifest records it."""

    path: str
    """Relative to the checkpoint directory, '/'-separated."""
    size: int
    """Bytes."""
    crc32: int
    """zlib.crc32 of the whole file."""


def human_bytes(num_bytes: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(num_bytes) < 1000 or unit == "TB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    raise AssertionError("unreachable")


def crc32_of(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            crc = zlib.crc32(chunk, crc)
    return crc


def list_files(directory: str) -> list[str]:
    """Every regular file under ``directory`` (relative, '/'-separated), the manifest excluded."""
    found = []
    for parent, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(parent, name), directory).replace(os.sep, "/")
            if rel != MANIFEST:
                found.append(rel)
    return sorted(found)


def write_manifest(directory: str, known: dict[str, FileEntry] | None = None) -> list[FileEntry]:
    """Record every file under ``directory`` into its manifest (fsynced, renamed into place).

    ``known``: entries whose checksum the writer computed while writing (the trainer ranks' files);
    their size is checked against the disk, and only the other files are read and hashed here.
    """
    known = known or {}
    rels = list_files(directory)

    def entry(rel: str) -> FileEntry:
        size = os.path.getsize(os.path.join(directory, rel))
        if rel in known:
            assert known[rel].size == size, f"{rel}: written {known[rel].size} bytes, {size} on disk"
            return known[rel]
        return FileEntry(rel, size, crc32_of(os.path.join(directory, rel)))

    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        entries = list(pool.map(entry, rels))
    payload = {
        "format": FORMAT_VERSION,
        "checksum": "crc32",
        "files": [asdict(e) for e in entries],
    }
    tmp = os.path.join(directory, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, MANIFEST))
    return entries


def read_manifest(directory: str) -> list[FileEntry]:
    with open(os.path.join(directory, MANIFEST)) as f:
        payload = json.load(f)
    if payload.get("format") != FORMAT_VERSION or payload.get("checksum") != "crc32":
        raise ValueError(f"unknown manifest format {payload.get('format')!r}")
    return [FileEntry(**e) for e in payload["files"]]


def verify(directory: str) -> str | None:
    """None when every file of the manifest is there with its size and checksum; otherwise what
    is wrong, e.g. 'trainer/trainer/mp_rank_00_model_states.pt truncated, 1.1 MB of 1.2 MB'."""
    if not os.path.isdir(directory):
        return "directory missing"
    if not os.path.exists(os.path.join(directory, MANIFEST)):
        return f"no {MANIFEST} (the save did not finish)"
    try:
        entries = read_manifest(directory)
    except (OSError, ValueError, TypeError, KeyError) as err:
        return f"{MANIFEST} unreadable ({err})"
    problems = []
    missing_dirs: dict[str, int] = {}
    for e in entries:
        path = os.path.join(directory, e.path)
        if not os.path.exists(path):
            top = e.path.split("/", 1)[0]
            if "/" in e.path and not os.path.isdir(os.path.join(directory, top)):
                missing_dirs[top] = missing_dirs.get(top, 0) + 1
            else:
                problems.append(f"{e.path} missing")
            continue
        size = os.path.getsize(path)
        if size < e.size:
            problems.append(f"{e.path} truncated, {human_bytes(size)} of {human_bytes(e.size)}")
        elif size > e.size:
            problems.append(f"{e.path} has {human_bytes(size)}, {human_bytes(e.size)} were written")
    problems = [f"{d}/ missing ({n} files)" for d, n in missing_dirs.items()] + problems
    if not problems:  # sizes match: now the (slower) checksums
        with ThreadPoolExecutor(_HASH_THREADS) as pool:
            sums = list(pool.map(lambda e: crc32_of(os.path.join(directory, e.path)), entries))
        pairs = zip(entries, sums, strict=True)
        problems = [f"{e.path} checksum mismatch" for e, crc in pairs if crc != e.crc32]
    if not problems:
        return None
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return problems[0] + more
