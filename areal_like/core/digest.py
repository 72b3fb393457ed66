"""A content digest of a model's weights, comparable across processes (trainer vs engines)."""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def state_dict_digest(weights: dict[str, torch.Tensor]) -> str:
    """sha256 over names and fp32 bytes, independent of dict order."""
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(np.ascontiguousarray(weights[name].detach().cpu().float().numpy()).tobytes())
    return h.hexdigest()
