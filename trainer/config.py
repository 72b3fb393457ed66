"""Trainer configuration: DeepSpeed layout, optimiser, GRPO and the decoupled PPO objective."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    """One train step consumes ``batch_groups`` prompt groups (x rollout.group_size samples)."""

    max_steps: int = 50
    """Train steps to run (a resumed run continues up to this count)."""
    batch_groups: int = 16
    """Prompt groups per train step (AReaL's consumer batch size, in groups)."""
    num_ranks: int = 1
    """DeepSpeed data-parallel ranks (Ray actors; gloo on CPU)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0, 1, 2 or 3."""
    micro_batch_size: int = 64
    """Sequences per forward/backward pass on one rank."""
    ppo_minibatches: int = 1
    """Optimiser steps per train batch (the batch is split into this many minibatches)."""
    lr: float = 1e-3
    """AdamW learning rate after warm-up."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up, in optimiser steps."""
    grad_clip: float = 1.0
    """Gradient-norm clipping threshold (0 disables)."""
    eps_clip: float = 0.2
    """PPO clip range below 1 (and above 1 unless eps_clip_high is set)."""
    eps_clip_high: float | None = None
    """Upper clip range (clip-higher, DAPO); None uses eps_clip."""
    use_decoupled_loss: bool = True
    """AReaL's decoupled objective: clip around the recomputed proximal policy and weight each token
    by pi_prox / pi_behav. False is standard PPO with the behaviour policy as the old policy."""
    behav_imp_weight_cap: float | None = 5.0
    """Tokens whose pi_prox / pi_behav exceeds this are masked out of the loss; None keeps all
    tokens with the full weight (the paper's objective)."""
    adv_std_norm: bool = True
    """GRPO: divide group-centred rewards by the group std (False = Dr.GRPO style)."""
    torch_threads: int = 1
    """torch intra-op threads per trainer rank."""
    dist_timeout_s: float = 600.0
    """Timeout of every collective between trainer ranks."""

    def __post_init__(self) -> None:
        positive = (
            "max_steps",
            "batch_groups",
            "num_ranks",
            "micro_batch_size",
            "ppo_minibatches",
            "torch_threads",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)}: must be >= 1")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"train.zero_stage={self.zero_stage}: allowed values are 0, 1, 2, 3")
        if self.lr <= 0:
            raise ValueError(f"train.lr={self.lr}: must be > 0")
        if self.warmup_steps < 0:
            raise ValueError(f"train.warmup_steps={self.warmup_steps}: must be >= 0")
        if self.grad_clip < 0:
            raise ValueError(f"train.grad_clip={self.grad_clip}: must be >= 0 (0 disables clipping)")
        if not 0 < self.eps_clip < 1:
            raise ValueError(f"train.eps_clip={self.eps_clip}: must be in (0, 1), e.g. 0.2")
        if self.eps_clip_high is not None and self.eps_clip_high <= 0:
            raise ValueError(f"train.eps_clip_high={self.eps_clip_high}: must be > 0 or null")
        if self.behav_imp_weight_cap is not None and self.behav_imp_weight_cap <= 1:
            raise ValueError(
                f"train.behav_imp_weight_cap={self.behav_imp_weight_cap}: must be > 1 (e.g. 5.0) "
                "or null for no cap"
            )
