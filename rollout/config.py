"""Rollout configuration (no torch/ray imports: configs are data)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rollout.env import EpisodeConfig

if TYPE_CHECKING:
    from rollout.engine import EngineConfig


@dataclass
class VLLMConfig:
    """vLLM engine settings (``rollout.engine: vllm``, GPU machines; vLLM 0.25.1)."""

    dtype: str = "bfloat16"
    """Weights and activations of the engine; the trainer's weights are cast to it on every sync."""
    gpu_memory_utilization: float = 0.85
    """Fraction of the GPU vLLM may take (weights + KV cache). Colocated placement: leave room for
    the trainer, e.g. 0.4."""
    enforce_eager: bool = False
    """Skip torch.compile and CUDA graphs: starts in ~30 s instead of ~45-75 s (1.5B, H200) and decodes
    several times slower; for tests that need a quick start."""
    enable_prefix_caching: bool = True
    """Share the KV cache of a group's common prompt; reset after every weight swap."""
    max_model_len: int | None = None
    """Longest prompt + response in tokens; None = the model's max_position_embeddings."""
    max_num_batched_tokens: int | None = None
    """Tokens per scheduler step (chunked prefill); None = vLLM's offline default (16384 on an
    H100/H200, 8192 on smaller GPUs; a served engine's would be 2048)."""
    enable_sleep_mode: bool = False
    """Let the engine free its GPU memory while the trainer runs; colocated placement turns it on."""
    sleep_level: int = 1
    """1: weights to CPU and KV cache dropped while asleep; 2: both dropped (the next sync reloads)."""
    start_timeout_s: float = 900.0
    """Longest wait for the engine to start (torch.compile and CUDA-graph capture take minutes)."""
    stream_interval: int = 16
    """Tokens per output delta the client processes (the first and last token always come at once).
    1 makes the client do Python work for every token of every request, which bounds decoding
    speed at high concurrency; larger only delays partial results (streamed chunks)."""

    def __post_init__(self) -> None:
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(
                f"rollout.vllm.dtype={self.dtype!r}: allowed values are 'bfloat16', 'float16', 'float32'"
            )
        if not 0.05 <= self.gpu_memory_utilization <= 0.98:
            raise ValueError(
                f"rollout.vllm.gpu_memory_utilization={self.gpu_memory_utilization}: must be in [0.05, 0.98]"
            )
        if self.sleep_level not in (1, 2):
            raise ValueError(f"rollout.vllm.sleep_level={self.sleep_level}: allowed values are 1, 2")
        for name in ("max_model_len", "max_num_batched_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"rollout.vllm.{name}={value}: must be >= 1 or null")
        if self.stream_interval < 1:
            raise ValueError(f"rollout.vllm.stream_interval={self.stream_interval}: must be >= 1 token")
        if self.start_timeout_s <= 0:
            raise ValueError(f"rollout.vllm.start_timeout_s={self.start_timeout_s}: must be > 0 seconds")


@dataclass
class RolloutConfig:
    """Generation workers, sampling and the staleness bound."""

    num_workers: int = 1
    """Rollout worker actors, each with its own generation engine."""
    engine: str = "hf"
    """Generation engine: 'hf' (transformers, CPU default) or 'vllm' (GPU; settings in ``vllm``)."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """vLLM engine settings, used when ``engine`` is 'vllm'."""
    group_size: int = 8
    """Responses sampled per prompt (the GRPO group)."""
    max_staleness: int = 1
    """eta: a sample is trained on only if its oldest token is at most eta policy versions old.
    0 is the synchronous baseline (generation and training alternate)."""
    max_concurrent_groups: int | None = None
    """Cap on prompt groups generating at once over all workers; None = train.batch_groups."""
    groups_per_generate: int = 16
    """Most prompt groups one worker keeps in flight (submitted to its engine, not yet scored); it
    asks the dispatcher for more as soon as groups finish, so its engine batch stays full."""
    engine_max_batch_size: int = 512
    """Most sequences one engine decodes together; further requests wait and join between decode
    steps as running ones finish (continuous batching)."""
    dynamic_sampling: bool = False
    """Drop groups whose samples all got the same reward (zero advantage) before the datastore;
    they are counted, and the staleness gate admits a new group in their place."""
    engine_stall_timeout_s: float = 120.0
    """A worker whose engine has requests but makes no decode step for this long takes itself out
    of rotation; its groups are requeued for the other workers."""
    health_timeout_s: float = 60.0
    """A worker that does not answer a health check this long is taken out of rotation (killed)."""
    max_restarts: int = 3
    """How many times a retired worker (dead or silent) is replaced by a fresh actor, re-synced to the
    current weights and put back into rotation; 0 = never (the fleet only shrinks)."""
    min_active_workers: int = 1
    """The run stops, naming every failure, when fewer rollout workers than this are in rotation."""
    max_new_tokens: int = 8
    """Response length cap in tokens."""
    temperature: float = 1.0
    """Sampling temperature (the trainer recomputes log-probs at the same temperature)."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1.0 disables it."""
    torch_threads: int = 1
    """torch intra-op threads per worker (keep workers x threads within the machine's cores)."""
    weight_update_timeout_s: float = 120.0
    """How long a weight update may wait for an engine before the run fails naming it."""
    episode: EpisodeConfig = field(default_factory=EpisodeConfig)
    """Multi-turn episodes with an environment (tools); off unless ``episode.env`` is set. Then
    ``max_new_tokens`` caps each model turn and the environment gives the reward."""

    def engine_config(self, model_path: str = "", seed: int = 0) -> EngineConfig:
        """The ``EngineConfig`` of one worker's engine (``model_path``: a local HF directory)."""
        from rollout.engine import EngineConfig

        return EngineConfig(
            type=self.engine,
            model_path=model_path,
            max_batch_size=self.engine_max_batch_size,
            seed=seed,
            vllm=self.vllm,
        )

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"rollout.num_workers={self.num_workers}: must be >= 1")
        if self.engine not in ("hf", "vllm"):
            raise ValueError(f"rollout.engine={self.engine!r}: allowed values are 'hf', 'vllm'")
        if self.group_size < 1:
            raise ValueError(f"rollout.group_size={self.group_size}: must be >= 1")
        if self.max_staleness < 0:
            raise ValueError(
                f"rollout.max_staleness={self.max_staleness}: eta must be >= 0 "
                "(0 = synchronous, 1-8 typical for asynchronous runs)"
            )
        if self.max_concurrent_groups is not None and self.max_concurrent_groups < 1:
            raise ValueError(
                f"rollout.max_concurrent_groups={self.max_concurrent_groups}: must be >= 1 or null"
            )
        if self.groups_per_generate < 1:
            raise ValueError(f"rollout.groups_per_generate={self.groups_per_generate}: must be >= 1")
        if self.engine_max_batch_size < 1:
            raise ValueError(f"rollout.engine_max_batch_size={self.engine_max_batch_size}: must be >= 1")
        for name in ("engine_stall_timeout_s", "health_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"rollout.{name}={getattr(self, name)}: must be > 0 seconds")
        if not 1 <= self.min_active_workers <= self.num_workers:
            raise ValueError(
                f"rollout.min_active_workers={self.min_active_workers}: must be in [1, rollout.num_workers="
                f"{self.num_workers}]"
            )
        if self.max_new_tokens < 1:
            raise ValueError(f"rollout.max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"rollout.temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p={self.top_p}: must be in (0, 1]")
        if self.engine == "vllm" and self.top_p < 1:
            # vLLM reports the log-prob after nucleus truncation and renormalisation, the trainer
            # recomputes the full tempered distribution: pi_prox/pi_behav would be off on every token.
            raise ValueError(
                f"rollout.top_p={self.top_p} with rollout.engine='vllm': vLLM's sampled log-probs are "
                "taken after top-p truncation, not on the full distribution the trainer recomputes, so "
                "the behaviour importance weights would be biased; use rollout.top_p=1.0 with vLLM (or "
                "the 'hf' engine, which records full-distribution log-probs)"
            )
        if self.torch_threads < 1:
            raise ValueError(f"rollout.torch_threads={self.torch_threads}: must be >= 1")
