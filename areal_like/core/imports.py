"""Callables named by import path in configs ('package.module:attr', the attribute may be dotted):
reward functions, environment factories."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def import_callable(path: str, label: str) -> Callable[..., Any]:
    """The callable ``path`` names; ValueError starting with ``label`` (the config field and value,
    e.g. "rollout.episode.env='x'") and saying what is wrong."""
    module_name, sep, attr_path = path.partition(":")
    if not sep or not module_name or not attr_path or ":" in attr_path:
        raise ValueError(f"{label} is malformed; expected 'package.module:function'")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{label}: cannot import module {module_name!r}: {err}") from err
    for attr in attr_path.split("."):
        if not hasattr(target, attr):
            raise ValueError(f"{label}: {module_name} has no attribute {attr!r}")
        target = getattr(target, attr)
    if not callable(target):
        raise ValueError(f"{label} names a {type(target).__name__}, not a callable")
    return target
