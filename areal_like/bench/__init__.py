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
    return importlib.import_module(f"areal_like.bench.{name}").main(argv)
