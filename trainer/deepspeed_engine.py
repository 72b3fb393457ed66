"""DeepSpeed engines for the policy, the critic, the reference model and SFT.

``EngineSpec`` is the part of a config that shapes an engine; ``make_engine`` turns a model into a
DeepSpeed engine with the optimizer, the learning-rate schedule (``LRSchedule``), ZeRO stage, bf16
and offload that the spec asks for. Gradient accumulation is unmanaged: the caller runs any number
of ``backward`` calls and then one ``step`` per minibatch, so micro-batch counts may vary per step.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSpec:
    zero_stage: int
    lr: float
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    grad_clip: float = 1.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    total_steps: int = 1
    """Optimiser steps of the whole run (the end of a linear/cosine decay)."""
    bf16: bool = True
    """Used on GPU only."""
    offload_optimizer: bool = False
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    fp32_lm_head: bool = False
    """The output head's matmul in fp32 (logits in fp32 whatever the model's dtype)."""

    @classmethod
    def of_train(cls, cfg, **overrides) -> EngineSpec:
        """From a ``TrainConfig`` or ``SFTConfig``; overrides e.g. the critic's lr (an SFTConfig
        needs ``total_steps``)."""
        fields = dict(
            total_steps=overrides.pop("total_steps", None) or cfg.total_optimizer_steps,
            zero_stage=cfg.zero_stage,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            optimizer=cfg.optimizer,
            grad_clip=cfg.grad_clip,
            lr_schedule=cfg.lr_schedule,
            warmup_steps=cfg.warmup_steps,
            min_lr_ratio=cfg.min_lr_ratio,
            bf16=cfg.bf16,
            offload_optimizer=cfg.offload_optimizer,
            gradient_checkpointing=cfg.gradient_checkpointing,
            attn_implementation=cfg.attn_implementation,
            fp32_lm_head=cfg.fp32_lm_head,
        )
        fields.update(overrides)
        return cls(**fields)


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimiser step ``step`` (0-based count of steps taken).

    Warm-up: (step + 1) / warmup_steps. Then constant, or a linear/cosine decay that reaches
    ``min_ratio`` at the last step (step = total_steps - 1).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(total_steps - warmup_steps - 1, 1)
    progress = min(max((step - warmup_steps) / span, 0.0), 1.0)
    if schedule == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r}")


class LRSchedule:
    """Picklable lr lambda (LambdaLR saves its __dict__ in checkpoints)."""

    def __init__(self, spec: EngineSpec) -> None:
        self.warmup_steps = spec.warmup_steps
        self.total_steps = spec.total_steps
        self.schedule = spec.lr_schedule
        self.min_ratio = spec.min_lr_ratio

    def __call__(self, step: int) -> float:
        return lr_multiplier(step, self.warmup_steps, self.total_steps, self.schedule, self.min_ratio)


def on_gpu() -> bool:
    return torch.cuda.is_available()


def ds_config(spec: EngineSpec, world_size: int, with_optimizer: bool = True) -> dict:
    """The DeepSpeed config dict. Batch-size keys are nominal: accumulation is unmanaged."""
    zero: dict = {"stage": spec.zero_stage}
    if spec.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu()}
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "managed_gradient_accumulation": False,
        "zero_optimization": zero,
        "gradient_clipping": spec.grad_clip,
        "bf16": {"enabled": on_gpu() and spec.bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if with_optimizer:
        if spec.optimizer == "adamw":
            params = {"lr": spec.lr, "weight_decay": spec.weight_decay}
            if not spec.offload_optimizer:
                params["torch_adam"] = True
            config["optimizer"] = {"type": "AdamW", "params": params}
        else:
            params = {"lr": spec.lr, "weight_decay": spec.weight_decay}
            config["optimizer"] = {"type": "SGD", "params": params}
            config["zero_allow_untested_optimizer"] = True  # plain SGD is fine under ZeRO
    return config


def load_train_model(path: str, spec: EngineSpec, value_head: bool = False):
    """A causal LM (or, with ``value_head``, a token-level value model on the same backbone) in fp32,
    set up for training as ``spec`` asks: every dropout off (the trainer runs in train mode, which
    transformers needs to checkpoint activations, yet scores tokens as the engines do), no KV
    cache, gradient checkpointing, and an fp32 output head."""
    from areal_like.core.models import load_model

    model = load_model(
        path,
        torch.float32,
        attn_implementation=spec.attn_implementation,
        value_head=value_head,
        no_dropout=True,
    )
    model.config.use_cache = False
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec.fp32_lm_head and not value_head:
        fp32_output_head(model.get_output_embeddings())
    return model


def fp32_output_head(head: torch.nn.Linear) -> None:
    """Make the output head multiply in fp32 (ScaleRL): bf16 weights and hidden states are cast up
    first, so the logits [.., V] come out in fp32 whatever the model's dtype."""
    import types

    assert isinstance(head, torch.nn.Linear), f"fp32_lm_head expects a Linear output head, got {type(head)}"

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return torch.nn.functional.linear(hidden.float(), self.weight.float(), bias)

    head.forward = types.MethodType(forward, head)


def make_engine(model, spec: EngineSpec, world_size: int, with_optimizer: bool = True):
    """Wrap ``model`` in a DeepSpeed engine (no optimizer: a frozen engine for the reference)."""
    import deepspeed

    if not with_optimizer:
        for p in model.parameters():
            p.requires_grad_(False)
    kwargs = {}
    if with_optimizer:
        schedule = LRSchedule(spec)
        kwargs = dict(
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
        )
    engine, _, _, _ = deepspeed.initialize(
        model=model, config=ds_config(spec, world_size, with_optimizer), **kwargs
    )
    # Trainable engines run in train mode: transformers checkpoints activations only there (dropout
    # is off, see load_train_model); a frozen engine (the reference) runs in eval mode.
    engine.train(with_optimizer)
    module = engine.module
    logger.info(
        "%s engine: %s mode, gradient checkpointing %s",
        type(module).__name__, "train" if module.training else "eval",
        "on" if module.training and getattr(module, "is_gradient_checkpointing", False) else "off",
    )  # fmt: skip
    return engine


def load_engine_checkpoint(engine, directory: str, tag: str, universal: bool = False):
    """``engine.load_checkpoint``; ``universal``: ``directory`` holds a universal checkpoint (written
    by another rank count or ZeRO stage), which DeepSpeed reads when its config says so."""
    saved = engine._config.load_universal_checkpoint
    engine._config.load_universal_checkpoint = universal
    try:
        return engine.load_checkpoint(directory, tag=tag)
    finally:
        engine._config.load_universal_checkpoint = saved


def skip_the_shared_memory_op() -> None:
    """Keep DeepSpeed from JIT-building its CPU shared-memory all-reduce op at ``init_distributed``.

    DeepSpeed builds ``deepspeed_shm_comm`` whenever its accelerator is the CPU (23.5-24.1 s on the
    2-core machine, at the first start after each install), but only ``inference_all_reduce`` (DeepSpeed
    inference) uses it: training all-reduces go through torch.distributed (gloo here). Skipping it also
    removes the build lock that a run killed during the build would leave behind. DeepSpeed reads its
    op table ``deepspeed.ops.__compatible_ops__`` from the module and keeps edits to it.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


STALE_BUILD_LOCK_S = 600.0
"""A DeepSpeed JIT-build lock older than this is left over from a killed build (a real one takes ~1 min)."""


def clear_stale_build_locks(max_age_s: float = STALE_BUILD_LOCK_S) -> list[str]:
    """Remove JIT-build locks of DeepSpeed ops that a killed build left behind.

    torch's extension builder waits, silently and forever, while its ``lock`` file exists; a process
    killed mid-build leaves it, and every later DeepSpeed start on the machine then hangs.
    """
    import glob
    import os
    import time

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "torch_extensions"
    )
    removed = []
    for lock in glob.glob(os.path.join(root, "**", "deepspeed_*", "lock"), recursive=True):
        age = time.time() - os.path.getmtime(lock)
        if age > max_age_s:
            logger.warning(
                "removing a stale DeepSpeed build lock %s (%.0f s old, left by a killed build)", lock, age
            )
            os.remove(lock)
            removed.append(lock)
    return removed


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int, timeout_s: float):
    """Join the trainer process group (NCCL on GPU, gloo on CPU) through DeepSpeed."""
    import datetime
    import os

    import deepspeed

    clear_stale_build_locks()
    skip_the_shared_memory_op()

    os.environ.update(
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(master_port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK="0",
    )
    deepspeed.init_distributed(
        dist_backend="nccl" if on_gpu() else "gloo",
        auto_mpi_discovery=False,
        verbose=False,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return torch.device("cuda", 0) if on_gpu() else torch.device("cpu")
