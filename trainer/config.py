"""Trainer configuration: DeepSpeed layout, optimiser, batching, the objective and its options.

The policy objective's knobs sit at the top of ``train``; components that are off by default have
their own section: ``train.reward`` (shaping), ``train.kl`` (reference model), ``train.critic``
(PPO's value model).
"""

from __future__ import annotations

from dataclasses import dataclass, field

ALGOS = ("grpo", "ppo")
BALANCE = ("kk", "ffd", "none")
PROX_LOGP = ("recompute", "loglinear")
CAP_MODES = ("mask", "clamp")
IMP_WEIGHT_LEVELS = ("token", "sequence", "geometric")
POLICY_LOSSES = ("ppo", "cispo", "gspo", "sapo", "m2po")
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")
LR_SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "sgd")
KL_ESTIMATORS = ("k1", "k2", "k3")
KL_PLACEMENTS = ("loss", "reward")


def check_one_of(name: str, value, allowed) -> None:
    """ValueError naming the field, the value and the allowed values."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: allowed values are {', '.join(map(str, allowed))}")


@dataclass
class RewardConfig:
    """Shaping of the scalar reward before advantages (AReaL order: penalty, bias, scale, clip, norm)."""

    bias: float = 0.0
    """Added to every reward."""
    scale: float = 1.0
    """Multiplies (reward + bias)."""
    clip: float | None = 20.0
    """Shaped rewards are clipped to [-clip, clip]; null disables."""
    normalize: bool = False
    """Normalise scalar rewards over the global batch (mean 0, std 1). GRPO normalises per group
    anyway; this is for ``algo: ppo``."""
    overlong_tokens: int = 0
    """DAPO soft overlong penalty: responses longer than max_new_tokens - overlong_tokens lose up to
    ``overlong_penalty_factor`` linearly; 0 disables."""
    overlong_penalty_factor: float = 1.0
    """Penalty at a response of exactly max_new_tokens tokens."""

    def __post_init__(self) -> None:
        if self.scale <= 0:
            raise ValueError(f"train.reward.scale={self.scale}: must be > 0")
        if self.clip is not None and self.clip <= 0:
            raise ValueError(f"train.reward.clip={self.clip}: must be > 0 or null (no clipping)")
        if self.overlong_tokens < 0:
            raise ValueError(
                f"train.reward.overlong_tokens={self.overlong_tokens}: must be >= 0 (0 disables)"
            )
        if self.overlong_penalty_factor < 0:
            raise ValueError(
                f"train.reward.overlong_penalty_factor={self.overlong_penalty_factor}: must be >= 0"
            )


@dataclass
class KLConfig:
    """KL penalty against a frozen reference model (built only when ``coef > 0``)."""

    coef: float = 0.0
    """Weight of the KL penalty; 0 builds no reference model."""
    estimator: str = "k3"
    """Per-token estimator of KL(pi || pi_ref): k1 (log ratio), k2 (squared / 2) or k3 (exp form, >= 0)."""
    placement: str = "loss"
    """'loss': coef * KL added to the loss (GRPO style, gradient through pi); 'reward': -coef * KL
    added to each token's reward before advantages (PPO style)."""
    ref_model_path: str | None = None
    """Local HF model directory of the reference; null uses the policy's initial weights."""

    def __post_init__(self) -> None:
        if self.coef < 0:
            raise ValueError(f"train.kl.coef={self.coef}: must be >= 0 (0 disables the reference model)")
        check_one_of("train.kl.estimator", self.estimator, KL_ESTIMATORS)
        check_one_of("train.kl.placement", self.placement, KL_PLACEMENTS)


@dataclass
class CriticConfig:
    """The value model of ``algo: ppo`` (a token-level value head on the policy's backbone)."""

    model_path: str | None = None
    """Local HF model directory to initialise the critic's backbone; null uses the policy's init."""
    lr: float = 1e-4
    """Critic learning rate (same schedule and warm-up as the policy)."""
    weight_decay: float = 0.0
    """Critic AdamW weight decay."""
    value_clip: float | None = 0.2
    """PPO value clipping around the pre-update values; null disables."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"train.critic.lr={self.lr}: must be > 0")
        if self.value_clip is not None and self.value_clip <= 0:
            raise ValueError(f"train.critic.value_clip={self.value_clip}: must be > 0 or null")


@dataclass
class TrainConfig:
    """One train step consumes ``batch_groups`` prompt groups (x rollout.group_size samples)."""

    max_steps: int = 50
    """Train steps to run (a resumed run continues up to this count)."""
    batch_groups: int = 16
    """Prompt groups per train step (AReaL's consumer batch size, in groups)."""
    num_ranks: int = 1
    """DeepSpeed data-parallel ranks (Ray actors; gloo on CPU)."""
    sequence_parallel: int = 1
    """Ulysses sequence parallelism: groups of this many consecutive ranks share every micro-batch,
    each rank running the model on 1/N of its positions (attention trades sequence shards for head
    shards with two all-to-alls per layer), so num_ranks / sequence_parallel groups train on
    different data. For responses too long for one GPU's activation memory. Needs sdpa attention,
    num_ranks divisible by it, the model's attention heads divisible by it, and its KV heads
    dividing it or divisible by it; no critic (algo: grpo). 1 = off."""

    # -- engine ------------------------------------------------------------------------------------
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0, 1, 2 or 3."""
    bf16: bool = True
    """bf16 weights and activations with fp32 master weights on GPU; CPU always trains in fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% more compute)."""
    offload_optimizer: bool = False
    """ZeRO-Offload: optimizer states and step on the CPU (needs zero_stage >= 1; DeepSpeed JIT-builds
    its CPU Adam on first use, 1-2 minutes)."""
    attn_implementation: str = "sdpa"
    """transformers attention backend: sdpa (CPU and GPU), eager, flex_attention (GPU: one packed row
    per micro-batch without the attention between sequences, padded to max_tokens_per_micro_batch so
    its kernels compile once, on the first step; backward is GPU-only), or flash_attention_2 (GPU,
    needs the flash-attn package)."""
    fp32_lm_head: bool = False
    """Multiply the output head in fp32 (ScaleRL): bf16 weights and hidden states are cast up, so
    logits, log-probs and the importance ratios come from fp32 logits. Costs a [tokens, V] fp32 logits
    tensor (and its gradient) per micro-batch instead of bf16: 4 bytes x vocabulary per token, e.g.
    0.6 MB per token at Qwen's 151,936; size max_tokens_per_micro_batch for it. No effect on CPU."""
    optimizer: str = "adamw"
    """adamw, or sgd (plain SGD, for exact-gradient tests)."""
    lr: float = 1e-3
    """Peak learning rate (after warm-up)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    lr_schedule: str = "constant"
    """After warm-up: constant, linear or cosine decay to min_lr_ratio * lr at the last optimiser step."""
    min_lr_ratio: float = 0.0
    """Floor of the linear/cosine decay, as a fraction of lr."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up from lr / warmup_steps to lr, in optimiser steps."""
    grad_clip: float = 1.0
    """Gradient-norm clipping threshold (0 disables). A step whose gradient norm is not finite is
    skipped and counted (train/skipped_steps_total), never applied."""

    # -- batching ----------------------------------------------------------------------------------
    micro_batch_size: int = 64
    """Sequences per forward/backward pass on one rank (used when max_tokens_per_micro_batch is null)."""
    max_tokens_per_micro_batch: int | None = None
    """Token budget of one micro-batch (prompt + response tokens; padded tokens count when packing is
    off). Micro-batches are then formed by length, their number varies per step; null = fixed
    micro_batch_size sequences."""
    packing: bool = True
    """Pack sequences without padding (position ids restart per sequence, attention never crosses
    them). With flash_attention_2 or flex_attention one packed row per micro-batch; with sdpa/eager
    rows as long as the longest sequence, which keeps the quadratic attention cost down."""
    balance: str = "kk"
    """Spread the global batch over data-parallel ranks by token count: kk (Karmarkar-Karp), ffd
    (greedy, longest first), or none (keep the controller's shards)."""
    ppo_minibatches: int = 1
    """Optimiser steps per train batch (the batch is split into this many minibatches)."""

    # -- algorithm and advantages --------------------------------------------------------------------
    algo: str = "grpo"
    """grpo: group-relative advantages, no critic. ppo: GAE with a critic (train.critic)."""
    adv_std_norm: bool = True
    """GRPO: divide group-centred rewards by the group std (False = Dr.GRPO style)."""
    adv_leave_one_out: bool = False
    """GRPO: baseline = mean of the other samples of the group (RLOO)."""
    adv_batch_norm: bool = False
    """Normalise advantages over all response tokens of the global batch (mean 0, std 1)."""
    gamma: float = 1.0
    """Discount of per-token rewards (GAE; also applies to GRPO when KL is in the reward). GRPO
    without KL rewards ignores it: every response token gets its sequence's advantage."""
    gae_lambda: float = 1.0
    """GAE lambda (PPO with a critic; e.g. 0.95)."""

    # -- policy loss (formulas and papers: docs/algorithms.md) -------------------------------------
    policy_loss: str = "ppo"
    """Surrogate on the policy ratio u = pi_theta / pi_prox: ppo (clipped, the knobs eps_clip,
    eps_clip_high, dual_clip), cispo (clipped and detached u times log pi), gspo (clipped
    sequence-level geometric-mean ratio), sapo (soft sigmoid gate instead of the clip), m2po
    (unclipped u; tokens with the largest squared log(pi_theta / pi_behav) leave the loss until the
    second moment is at most m2po_threshold). The behaviour weight below applies to all of them."""
    eps_clip: float = 0.2
    """PPO clip range below 1 (and above 1 unless eps_clip_high is set)."""
    eps_clip_high: float | None = None
    """Upper clip range (clip-higher, DAPO: e.g. 0.28); None uses eps_clip."""
    dual_clip: float | None = None
    """Dual-clip PPO: for negative advantages the loss is capped at dual_clip times abs(A) (e.g. 3.0)."""
    use_decoupled_loss: bool = True
    """AReaL's decoupled objective: clip around the proximal policy (the pre-update weights) and
    weight each token by pi_prox / pi_behav. False is standard PPO with the behaviour policy as the
    old policy."""
    behav_imp_weight_cap: float | None = 5.0
    """Cap on pi_prox / pi_behav; None keeps all tokens with the full weight (the paper's objective)."""
    behav_imp_weight_mode: str = "mask"
    """mask: tokens whose weight leaves [floor, cap] leave the loss (masked importance sampling,
    MIS; AReaL's rejection sampling); clamp: their weight is clamped into [floor, cap] (truncated
    importance sampling, TIS)."""
    behav_imp_weight_floor: float | None = None
    """Lower bound of pi_prox / pi_behav (e.g. 0.5); null: none. With mode mask and a cap this is
    IcePop: tokens whose trainer/engine probability ratio leaves [floor, cap] are masked."""
    behav_imp_weight_level: str = "token"
    """token: each token's own weight; sequence: one weight per sequence, the product of its
    tokens' ratios (sequence-level TIS/MIS); geometric: the geometric mean of its tokens' ratios.
    The bounds then apply to that weight and the whole sequence is kept, masked or clamped."""
    cispo_eps_low: float | None = None
    """CISPO: the detached ratio is clipped below at 1 - cispo_eps_low; null: no lower bound
    (MiniMax-M1)."""
    cispo_eps_high: float = 0.28
    """CISPO: the detached ratio is clipped above at 1 + cispo_eps_high."""
    gspo_eps_clip: float = 3e-4
    """GSPO: clip range below 1 of the sequence ratio (the paper's 3e-4: sequence ratios are
    geometric means over tokens and stay much closer to 1 than token ratios)."""
    gspo_eps_clip_high: float = 4e-4
    """GSPO: clip range above 1 of the sequence ratio (the paper's 4e-4)."""
    sapo_tau_pos: float = 1.0
    """SAPO: temperature of the sigmoid gate for positive advantages (higher = sharper)."""
    sapo_tau_neg: float = 1.05
    """SAPO: temperature of the gate for negative advantages (the paper keeps it above tau_pos)."""
    m2po_threshold: float = 0.04
    """M2PO: bound on the mean squared log(pi_theta / pi_behav) of the tokens a micro-batch keeps."""
    prox_logp: str = "recompute"
    """recompute: a no-grad forward with the pre-update weights; loglinear: AReaL's approximation
    from per-token versions (skips that forward pass)."""
    loss_agg: str = "token_mean"
    """token_mean: sum over the global minibatch's tokens / their count (across ranks and
    micro-batches); seq_mean_token_mean: per-sequence mean then mean over sequences (GRPO paper);
    seq_mean_token_sum: token sum / (loss_norm_tokens * sequences) (Dr.GRPO)."""
    loss_norm_tokens: int | None = None
    """Constant length of seq_mean_token_sum; null uses rollout.max_new_tokens."""

    # -- engine/trainer mismatch guards ------------------------------------------------------------
    logp_mismatch_warn: float | None = 0.05
    """Warn when the mean abs(logp_engine - logp_trainer) over the first minibatch's fresh tokens
    (made by the very weights being trained) exceeds this; null disables."""
    logp_mismatch_stop: float | None = 0.25
    """Stop the run (before the optimizer step) when that mean exceeds this on a step whose first
    minibatch is all fresh tokens (every eta=0 step, and the first step of any run): the engine
    samples from another distribution than the trainer scores (temperature, top_p/top_k, weights
    not loaded). null disables."""

    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward shaping."""
    kl: KLConfig = field(default_factory=KLConfig)
    """Reference-model KL penalty."""
    critic: CriticConfig = field(default_factory=CriticConfig)
    """Value model (algo: ppo)."""

    torch_threads: int = 1
    """torch intra-op threads per trainer rank."""
    dist_timeout_s: float = 600.0
    """Timeout of every collective between trainer ranks."""

    def __post_init__(self) -> None:
        positive = (
            "max_steps",
            "batch_groups",
            "num_ranks",
            "sequence_parallel",
            "micro_batch_size",
            "ppo_minibatches",
            "torch_threads",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)}: must be >= 1")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"train.zero_stage={self.zero_stage}: allowed values are 0, 1, 2, 3")
        for name, allowed in (
            ("algo", ALGOS),
            ("balance", BALANCE),
            ("prox_logp", PROX_LOGP),
            ("behav_imp_weight_mode", CAP_MODES),
            ("behav_imp_weight_level", IMP_WEIGHT_LEVELS),
            ("policy_loss", POLICY_LOSSES),
            ("loss_agg", LOSS_AGGREGATIONS),
            ("lr_schedule", LR_SCHEDULES),
            ("optimizer", OPTIMIZERS),
        ):
            check_one_of(f"train.{name}", getattr(self, name), allowed)
        if self.lr <= 0:
            raise ValueError(f"train.lr={self.lr}: must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")
        if self.warmup_steps < 0:
            raise ValueError(f"train.warmup_steps={self.warmup_steps}: must be >= 0")
        if self.grad_clip < 0:
            raise ValueError(f"train.grad_clip={self.grad_clip}: must be >= 0 (0 disables clipping)")
        if self.max_tokens_per_micro_batch is not None and self.max_tokens_per_micro_batch < 2:
            raise ValueError(
                f"train.max_tokens_per_micro_batch={self.max_tokens_per_micro_batch}: must be >= the "
                "longest sequence (prompt + response), or null for micro_batch_size sequences"
            )
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("train.offload_optimizer=true needs train.zero_stage >= 1 (ZeRO-Offload)")
        if not 0 < self.eps_clip < 1:
            raise ValueError(f"train.eps_clip={self.eps_clip}: must be in (0, 1), e.g. 0.2")
        if self.eps_clip_high is not None and self.eps_clip_high <= 0:
            raise ValueError(f"train.eps_clip_high={self.eps_clip_high}: must be > 0 or null")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"train.dual_clip={self.dual_clip}: must be > 1 (e.g. 3.0) or null")
        if self.behav_imp_weight_cap is not None and self.behav_imp_weight_cap <= 1:
            raise ValueError(
                f"train.behav_imp_weight_cap={self.behav_imp_weight_cap}: must be > 1 (e.g. 5.0) "
                "or null for no cap"
            )
        self._check_policy_loss()
        self._check_sequence_parallel()
        if self.prox_logp == "loglinear" and not self.use_decoupled_loss:
            raise ValueError(
                "train.prox_logp='loglinear' approximates the decoupled loss's proximal policy; set "
                "train.use_decoupled_loss=true or train.prox_logp='recompute'"
            )
        if not 0 < self.gamma <= 1:
            raise ValueError(f"train.gamma={self.gamma}: must be in (0, 1]")
        if not 0 <= self.gae_lambda <= 1:
            raise ValueError(f"train.gae_lambda={self.gae_lambda}: must be in [0, 1]")
        if self.loss_norm_tokens is not None and self.loss_norm_tokens < 1:
            raise ValueError(f"train.loss_norm_tokens={self.loss_norm_tokens}: must be >= 1 or null")

    def _check_sequence_parallel(self) -> None:
        """What can be checked without the model (its head counts: trainer.sequence_parallel)."""
        size = self.sequence_parallel
        if size == 1:
            return
        if self.num_ranks % size:
            raise ValueError(
                f"train.sequence_parallel={size} must divide train.num_ranks={self.num_ranks} (groups "
                f"of {size} consecutive ranks share a micro-batch); set num_ranks to a multiple of {size}"
            )
        if self.attn_implementation != "sdpa":
            raise ValueError(
                f"train.sequence_parallel={size} needs train.attn_implementation='sdpa' (the Ulysses "
                f"attention runs sdpa on the gathered sequence), not {self.attn_implementation!r}"
            )
        if self.algo == "ppo":
            raise ValueError(
                f"train.sequence_parallel={size} does not support the critic of train.algo='ppo' yet; "
                "use train.algo='grpo' or train.sequence_parallel=1"
            )

    def _check_policy_loss(self) -> None:
        floor = self.behav_imp_weight_floor
        if floor is not None and not 0 < floor < 1:
            raise ValueError(
                f"train.behav_imp_weight_floor={floor}: must be in (0, 1), e.g. 0.5, or null (no floor)"
            )
        corrected = self.behav_imp_weight_floor is not None or self.behav_imp_weight_level != "token"
        if corrected and not self.use_decoupled_loss:
            raise ValueError(
                "train.behav_imp_weight_floor / behav_imp_weight_level correct pi_prox / pi_behav, which is "
                "1 without the decoupled loss; set train.use_decoupled_loss=true"
            )
        if self.dual_clip is not None and self.policy_loss != "ppo":
            raise ValueError(
                f"train.dual_clip={self.dual_clip} applies to train.policy_loss=ppo only, not "
                f"{self.policy_loss!r}; set train.dual_clip=null"
            )
        if self.cispo_eps_low is not None and not 0 < self.cispo_eps_low <= 1:
            raise ValueError(f"train.cispo_eps_low={self.cispo_eps_low}: must be in (0, 1] or null")
        for name in ("cispo_eps_high", "gspo_eps_clip", "gspo_eps_clip_high", "sapo_tau_pos",
                     "sapo_tau_neg", "m2po_threshold"):  # fmt: skip
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name}={getattr(self, name)}: must be > 0")
        if not self.gspo_eps_clip < 1:
            raise ValueError(f"train.gspo_eps_clip={self.gspo_eps_clip}: must be < 1 (e.g. 3e-4)")
        for name in ("logp_mismatch_warn", "logp_mismatch_stop"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"train.{name}={getattr(self, name)}: must be > 0 or null (off)")

    @property
    def total_optimizer_steps(self) -> int:
        return self.max_steps * self.ppo_minibatches
