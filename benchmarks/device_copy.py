"""Device copy of a model's tensors into one arena, as the colocated weight path issues it (GPU).

``areal-like bench device_copy [--shape 7b]``

The model's tensors (the shapes of benchmarks/_models.py, bf16) are cut into pieces packed into 256 MiB
buckets as a reallocation plan does, then copied into one arena three ways: one
``torch._foreach_copy_`` per bucket, one ``copy_`` per piece, and mixed (``copy_`` for pieces of
1 MiB and more, ``_foreach_copy_`` for the rest: what ``realloc.pack.CopyList`` does), against the
floor of one flat copy of the same bytes. Median of 5 after a warm-up; last line JSON.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks import emit
from benchmarks._models import dims


def shapes(shape: str) -> list[tuple[int, int]]:
    """(rows, cols) of every tensor of ``shape`` as the trainer holds it (1-D tensors as (n, 1))."""
    out = []
    for spec in dims(shape).specs("bfloat16"):
        rows, cols = (spec.shape[0], spec.shape[1]) if len(spec.shape) == 2 else (spec.shape[0], 1)
        out.append((rows, cols))
    return out


def pieces(rows_cols: list[tuple[int, int]], bucket_bytes: int) -> list[list[tuple[int, int, int]]]:
    """(tensor, row0, rows) pieces grouped into buckets of at most bucket_bytes (rows split)."""
    buckets, cur, fill = [], [], 0
    for t, (rows, cols) in enumerate(rows_cols):
        row = 0
        while row < rows:
            take = min(rows - row, max(1, (bucket_bytes - fill) // (2 * cols)))
            cur.append((t, row, take))
            fill += take * cols * 2
            row += take
            if fill >= bucket_bytes - 2 * cols:
                buckets.append(cur)
                cur, fill = [], 0
    return buckets + ([cur] if cur else [])


def timed(fn, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    best = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best.append(time.perf_counter() - start)
    return sorted(best)[len(best) // 2]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="areal-like bench device_copy", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="7b", help="model shape (benchmarks/_models.py), e.g. qwen3-1.7b")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench device_copy needs a CUDA GPU")
    shape = args.shape
    tensors = shapes(shape)
    srcs = [torch.randn(r, c, device="cuda", dtype=torch.bfloat16) for r, c in tensors]
    total = sum(t.numel() for t in srcs)
    arena = torch.empty(total, device="cuda", dtype=torch.bfloat16)
    dst_tensors, off = [], 0
    for r, c in tensors:
        dst_tensors.append(arena[off : off + r * c].view(r, c))
        off += r * c
    groups = []
    for bucket in pieces(tensors, 256 << 20):
        dsts = [dst_tensors[t][r0 : r0 + n] for t, r0, n in bucket]
        groups.append((dsts, [srcs[t][r0 : r0 + n] for t, r0, n in bucket]))
    flat_src = torch.empty_like(arena)

    def foreach_per_bucket():
        for d, s in groups:
            torch._foreach_copy_(d, s)

    def copy_each():
        for d, s in groups:
            for a, b in zip(d, s, strict=True):
                a.copy_(b)

    def hybrid(threshold=1 << 20):
        for d, s in groups:
            small = [(a, b) for a, b in zip(d, s, strict=True) if a.numel() * 2 < threshold]
            for a, b in zip(d, s, strict=True):
                if a.numel() * 2 >= threshold:
                    a.copy_(b)
            if small:
                torch._foreach_copy_([a for a, _ in small], [b for _, b in small])

    result = dict(
        shape=shape,
        gbytes=round(total * 2 / 1e9, 3),
        pieces=sum(len(d) for d, _ in groups),
        buckets=len(groups),
        floor_single_copy_s=timed(lambda: arena.copy_(flat_src)),
        foreach_per_bucket_s=timed(foreach_per_bucket),
        copy_each_s=timed(copy_each),
        hybrid_s=timed(hybrid),
        gpu=torch.cuda.get_device_name(0),
    )
    emit(result, args.out)
    return 0
