"""Column-packed rows: how sample data crosses between a client and a storage unit.

A batch of n samples goes as one array per column (the samples' arrays concatenated along axis 0,
with offsets), not as n dicts of small arrays: Ray then serializes a handful of large buffers
(zero-copy on the reading side) instead of thousands of small ones, which is most of the
per-sample cost of the data plane. Unpacking gives per-sample views into those buffers (no copy).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class PackedColumn:
    """One column of n samples. Producer: ``pack_rows``; consumer: ``unpack_rows``."""

    values: np.ndarray
    """[sum_i L_i, ...]: sample i's array is values[offsets[i]:offsets[i + 1]]."""
    offsets: np.ndarray
    """int64 [n + 1]"""


@dataclass
class PackedRows:
    """The columns of n samples, by sample id (client <-> storage unit, both directions)."""

    sample_ids: list[str]
    packed: dict[str, PackedColumn] = field(default_factory=dict)
    """Columns every sample has, all with one dtype and trailing shape (the usual case)."""
    loose: dict[str, list[np.ndarray | None]] = field(default_factory=dict)
    """Other columns (0-d arrays, mixed dtypes or shapes, or absent in some samples): per sample,
    None where a sample lacks the column."""

    def __len__(self) -> int:
        return len(self.sample_ids)

    def row_nbytes(self) -> list[int]:
        """Bytes of each sample's arrays, over all columns."""
        sizes = np.zeros(len(self.sample_ids), dtype=np.int64)
        for column in self.packed.values():
            row_bytes = column.values.itemsize * int(np.prod(column.values.shape[1:], dtype=np.int64))
            sizes += np.diff(column.offsets) * row_bytes
        for arrays in self.loose.values():
            sizes += [a.nbytes if a is not None else 0 for a in arrays]
        return sizes.tolist()

    @property
    def nbytes(self) -> int:
        loose = sum(a.nbytes for arrays in self.loose.values() for a in arrays if a is not None)
        return sum(c.values.nbytes for c in self.packed.values()) + loose


def _packable(arrays: list[np.ndarray | None]) -> bool:
    first = arrays[0]
    if first is None or first.ndim == 0:
        return False
    return all(
        a is not None and a.ndim == first.ndim and a.dtype == first.dtype and a.shape[1:] == first.shape[1:]
        for a in arrays
    )


def pack_rows(sample_ids: list[str], rows: list[dict[str, np.ndarray]]) -> PackedRows:
    """Per-sample column dicts -> one packed record (one copy of the data per column)."""
    assert len(sample_ids) == len(rows), (len(sample_ids), len(rows))
    names = list(dict.fromkeys(name for row in rows for name in row))
    out = PackedRows(list(sample_ids))
    for name in names:
        arrays = [row.get(name) for row in rows]
        arrays = [np.asarray(a) if a is not None else None for a in arrays]
        if not _packable(arrays):
            out.loose[name] = arrays
            continue
        present = [a for a in arrays if a is not None]  # all of them, as _packable checked
        offsets = np.zeros(len(present) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in present], out=offsets[1:])
        out.packed[name] = PackedColumn(np.concatenate(present), offsets)
    return out


def unpack_rows(rows: PackedRows) -> list[dict[str, np.ndarray]]:
    """One record -> per-sample column dicts of views into its buffers (read-only when they came
    through Ray's object store)."""
    out: list[dict[str, np.ndarray]] = [{} for _ in rows.sample_ids]
    for name, column in rows.packed.items():
        values, bounds = column.values, column.offsets.tolist()
        for i, row in enumerate(out):
            row[name] = values[bounds[i] : bounds[i + 1]]
    for name, arrays in rows.loose.items():
        for row, array in zip(out, arrays, strict=True):
            if array is not None:
                row[name] = array
    return out
