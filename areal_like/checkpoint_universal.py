"""Resume on another trainer layout (rank count, ZeRO stage) through DeepSpeed's universal checkpoint.

A checkpoint's ``trainer/`` holds DeepSpeed ZeRO shards that only the layout which wrote them can
load. When a run resumes with another ``train.num_ranks`` or ``train.zero_stage``, the shards are
converted once, on the controller, by DeepSpeed's ``ds_to_universal`` (one file per parameter and
optimizer state: fp32 weights, Adam moments, step) into ``step_N.universal.tmp`` beside the
checkpoint; every rank of the new layout then loads its own slice of it (``load_universal``), and
the directory is removed. The optimizer state, the LR scheduler and the step count carry over.

DeepSpeed writes the universal format a little differently for ZeRO-1/2 and ZeRO-3 sources, and
each loader reads only its own flavour; ``adapt_for_stage`` fills in what the target stage's loader
looks for (the common optimizer state in both forms, a per-parameter ``step``, the model-states
file name) so that any ZeRO stage loads any other. ZeRO stage 0 (no ZeRO) keeps its optimizer
state in another format: a layout change to or from it is refused.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from areal_like.config import ConfigError

logger = logging.getLogger(__name__)

TAGS = ("trainer", "critic")
"""DeepSpeed checkpoint tags under a checkpoint's ``trainer/``: the policy, and the PPO critic."""
OPTIMIZER_STATE = "optimizer_state.pt"


@dataclass(frozen=True)
class TrainerLayout:
    """How the trainer's state is sharded: what a checkpoint records and a resume compares."""

    num_ranks: int
    zero_stage: int

    @classmethod
    def of(cls, train_config) -> TrainerLayout:
        return cls(train_config.num_ranks, train_config.zero_stage)

    def __str__(self) -> str:
        return f"train.num_ranks={self.num_ranks} train.zero_stage={self.zero_stage}"


def needs_conversion(saved: TrainerLayout | None, now: TrainerLayout, step: int) -> bool:
    """Whether checkpoint ``step`` (saved as ``saved``; None: an older checkpoint, taken to match)
    must go through a universal checkpoint to load as ``now``; a change it cannot make raises."""
    if saved is None or saved == now:
        return False
    if saved.zero_stage == 0 and now.zero_stage == 0:
        return False  # no ZeRO: every rank holds (and loads) the whole state
    if 0 in (saved.zero_stage, now.zero_stage):
        raise ConfigError(
            f"checkpoint step {step} was saved with {saved}; it cannot resume as {now}: a layout "
            "change goes through DeepSpeed's universal checkpoint, which needs ZeRO stage 1-3 on both "
            f"sides. Resume with train.zero_stage={saved.zero_stage} (any num_ranks"
            f"{'' if saved.zero_stage == 0 else ' and stage 1-3'}), or set run.resume=false"
        )
    return True


def convert(tag_dir: str, out_dir: str) -> None:
    """``ds_to_universal`` of one DeepSpeed tag directory, in a child process (it forks workers,
    which a Ray driver's threads make unsafe in-process)."""
    cmd = [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", tag_dir,
        "--output_folder", out_dir, "--inject_missing_state", "--num_extract_workers",
        str(max(1, min(4, os.cpu_count() or 1))), "--num_merge_workers", "1",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-3000:]
        raise RuntimeError(f"ds_to_universal of {tag_dir} failed (exit {result.returncode}):\n{tail}")


def adapt_for_stage(universal_dir: str, zero_stage: int) -> None:
    """Make a universal checkpoint written from any ZeRO stage loadable by a ``zero_stage`` engine."""
    import deepspeed
    import torch

    zero_dir = os.path.join(universal_dir, "zero")
    path = os.path.join(zero_dir, OPTIMIZER_STATE)
    state = torch.load(path, map_location="cpu", weights_only=False)
    inner = state.get("optimizer_state_dict")
    if inner is not None:  # from ZeRO-3: the base optimizer's state dict inside
        step = inner["state"][0]["step"] if inner.get("state") else None
        state.setdefault("param_groups", inner["param_groups"])
    else:  # from ZeRO-1/2: the step is per parameter
        steps = glob.glob(os.path.join(zero_dir, "*", "step.pt"))
        step = torch.load(steps[0], weights_only=False) if steps else None
        state["optimizer_state_dict"] = {"state": {0: {"step": step}} if step is not None else {},
                                         "param_groups": state["param_groups"]}  # fmt: skip
    state.setdefault("ds_version", deepspeed.__version__)  # ZeRO-1/2 loaders require it
    torch.save(state, path)
    for param_dir in glob.glob(os.path.join(zero_dir, "*", "")):
        if not os.path.exists(os.path.join(param_dir, "fp32.pt")):
            continue
        # ZeRO-1/2 loaders read every parameter's step, and its states as {"param": tensor}
        # (ZeRO-3 sources write bare tensors; ZeRO-3 loaders take either).
        step_path = os.path.join(param_dir, "step.pt")
        if step is not None and not os.path.exists(step_path):
            torch.save(step, step_path)
        for name in ("fp32.pt", "exp_avg.pt", "exp_avg_sq.pt"):
            path = os.path.join(param_dir, name)
            if os.path.exists(path):
                value = torch.load(path, map_location="cpu", weights_only=False)
                if isinstance(value, torch.Tensor):
                    torch.save({"param": value}, path)
    # The loader reads the metadata (client state, scheduler, step counts) from the model-states
    # file named as the target stage names it; with a universal checkpoint that is rank 0's.
    wanted = "zero_pp_rank_0_mp_rank_00_model_states.pt" if zero_stage == 3 else "mp_rank_00_model_states.pt"
    if not os.path.exists(os.path.join(universal_dir, wanted)):
        found = sorted(glob.glob(os.path.join(universal_dir, "*model_states.pt")))
        assert found, f"{universal_dir}: ds_to_universal wrote no model-states file"
        shutil.copy2(found[0], os.path.join(universal_dir, wanted))


def to_universal(trainer_dir: str, out_dir: str, zero_stage: int) -> None:
    """Every tag of ``trainer_dir`` (policy, critic) as a universal checkpoint under ``out_dir``."""
    shutil.rmtree(out_dir, ignore_errors=True)
    for tag in TAGS:
        if os.path.isdir(os.path.join(trainer_dir, tag)):
            convert(os.path.join(trainer_dir, tag), os.path.join(out_dir, tag))
            adapt_for_stage(os.path.join(out_dir, tag), zero_stage)


@contextlib.contextmanager
def trainer_checkpoint_for(
    checkpoint_dir: str, step: int, saved: TrainerLayout | None, now: TrainerLayout
) -> Iterator[tuple[str, bool]]:
    """(directory the ranks load from, whether it is a universal checkpoint) for resuming
    ``checkpoint_dir`` as ``now``; a converted copy is removed when the block ends."""
    trainer_dir = os.path.join(checkpoint_dir, "trainer")
    if not needs_conversion(saved, now, step):
        yield trainer_dir, False
        return
    out_dir = checkpoint_dir.rstrip("/") + ".universal.tmp"  # a crash leaves it to remove_leftovers
    print(f"checkpoint step {step} was saved with {saved}; converting it for {now} (universal checkpoint)")
    to_universal(trainer_dir, out_dir, now.zero_stage)
    try:
        yield out_dir, True
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
