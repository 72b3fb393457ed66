"""Checkpoint -> Hugging Face model directory (safetensors), loadable by transformers and vLLM.

The trainer state of a checkpoint is DeepSpeed's (ZeRO-2 or ZeRO-3 shards); DeepSpeed's own
``zero_to_fp32`` consolidates it into one fp32 state dict, which is loaded into the run's model
architecture (the ``config.json`` of the model the run started from) and saved with its tokenizer.
"""

from __future__ import annotations

import logging
import os
import shutil

from areal_like import checkpoint as ckpt
from areal_like.checkpoint_manifest import MANIFEST, verify
from areal_like.config import ConfigError

logger = logging.getLogger(__name__)


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory (checked against its manifest), or a run directory (its newest intact
    checkpoint). A path that is neither, or a damaged checkpoint, is a ``ConfigError``."""
    if os.path.exists(os.path.join(path, "state.pkl")):
        problem = verify(path) if os.path.exists(os.path.join(path, MANIFEST)) else None
        if problem is not None:
            raise ConfigError(
                f"checkpoint {path!r} is damaged: {problem}; pass its run directory instead to use "
                "the newest intact checkpoint"
            )
        return path
    latest = ckpt.latest_checkpoint(path) if os.path.isdir(path) else None
    if latest is None:
        raise ConfigError(
            f"{path!r} is neither a checkpoint directory (with state.pkl) "
            "nor a run directory with checkpoints"
        )
    return latest


def consolidated_state_dict(checkpoint_dir: str) -> dict:
    """fp32 weights of a checkpoint, gathered from every ZeRO rank's shard."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(os.path.join(checkpoint_dir, "trainer"), tag="trainer")


def load_policy(checkpoint_dir: str):
    """The policy model of a checkpoint, as a transformers model, with its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from areal_like.core.models import load_tokenizer

    state = ckpt.read_state(checkpoint_dir)
    model_config = AutoConfig.from_pretrained(state.model_path, local_files_only=True)
    model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    weights = consolidated_state_dict(checkpoint_dir)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if getattr(model_config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"checkpoint {checkpoint_dir!r} does not match the model at {state.model_path!r}: "
            f"missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.tie_weights()
    return model, load_tokenizer(state.model_path)


def export_checkpoint(checkpoint: str, out_dir: str, overwrite: bool = False) -> str:
    """Write the checkpoint's policy as an HF model directory; returns ``out_dir``."""
    checkpoint_dir = resolve_checkpoint(checkpoint)
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ConfigError(f"export target {out_dir!r} is not empty; pass --overwrite to replace it")
    model, tokenizer = load_policy(checkpoint_dir)
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    logger.info("exported %s -> %s", checkpoint_dir, out_dir)
    return out_dir
