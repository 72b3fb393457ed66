"""Benchmarks behind ``areal-like bench NAME [args]``: each module here with a ``main(argv) -> int``.

A benchmark prints a human-readable table and, as its last line, one JSON object with its figures
(ratios measured side by side in the same run), so scripts and notes can quote it.
"""

from __future__ import annotations

import importlib
import pkgutil


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def run(name: str, argv: list[str]) -> int:
    if name not in available():
        raise ValueError(f"unknown benchmark {name!r}; available: {', '.join(available()) or 'none'}")
    return importlib.import_module(f"benchmarks.{name}").main(argv)


def emit(result: dict, out: str | None, quiet: bool = False) -> None:
    """Print ``result`` as the benchmark's last line (JSON; not with ``quiet``), and write it to
    ``out`` when given."""
    import json

    line = json.dumps(result)
    if out:
        with open(out, "w") as f:
            f.write(line + "\n")
    if not quiet:
        print(line)


def device_copy_seconds(nbytes: int, repeats: int, device) -> list[float]:
    """The colocated floor: one device-to-device copy of ``nbytes``, seconds per repeat (a warm-up
    copy first, not counted)."""
    import time

    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for rep in range(repeats + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        if rep:
            times.append(time.perf_counter() - start)
    return times
