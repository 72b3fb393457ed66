"""The generation engine interface: what a rollout worker calls to turn prompts into responses.

An engine owns one copy of the policy weights. It generates batches of requests, reports for every
output token the policy version that produced it and its behaviour log-prob, and accepts new
weights while generating (interruptible generation, AReaL section 3): the swap happens at a token
boundary and the unfinished requests continue under the new version.

Implementations: ``HFEngine`` (transformers, CPU and tests; ``rollout/hf_engine.py``). A vLLM
engine for GPUs implements the same Protocol. ``make_engine`` builds one from an ``EngineConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from areal_like.types import GenerationOutput


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one batch of requests; the same for every request of a ``generate`` call."""

    max_new_tokens: int
    """Most tokens generated per request; a request that reaches it ends with finish_reason 'length'."""
    temperature: float = 1.0
    """Softmax temperature; 0.0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids (eos) that end a request with finish_reason 'stop'; the stop token is kept."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(
                f"SamplingParams.max_new_tokens={self.max_new_tokens}: must be >= 1; "
                "set the response token budget to a positive number."
            )
        if self.temperature < 0.0:
            raise ValueError(
                f"SamplingParams.temperature={self.temperature}: must be >= 0; use 0.0 for greedy decoding."
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(
                f"SamplingParams.top_p={self.top_p}: must be in (0, 1]; use 1.0 to disable nucleus sampling."
            )
        # Accept any iterable (a list from YAML) but store a tuple so the record stays hashable.
        stop_ids = tuple(int(token) for token in self.stop_token_ids)
        if any(token < 0 for token in stop_ids):
            raise ValueError(
                f"SamplingParams.stop_token_ids={stop_ids}: token ids must be >= 0; "
                "pass the tokenizer's eos_token_id(s)."
            )
        object.__setattr__(self, "stop_token_ids", stop_ids)


@dataclass(frozen=True)
class EngineLoad:
    """What an engine has in flight right now; the router sends new prompts to the least loaded."""

    running_requests: int
    """Requests accepted by ``generate`` and not yet finished (queued chunks included)."""
    tokens_in_flight: int
    """Tokens (prompt + generated) held in the KV cache of the batch being decoded."""


class GenerationEngine(Protocol):
    """One copy of the policy that generates responses and takes weight updates while generating."""

    engine_id: int

    @property
    def version(self) -> int:
        """Policy version of the weights currently loaded."""
        ...

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[GenerationOutput]:
        """Generate one response per prompt; outputs are in prompt order, each with per-token versions."""
        ...

    def update_weights(
        self, state_dict: dict[str, torch.Tensor], version: int, timeout_s: float = 60.0
    ) -> None:
        """Load new weights; blocks until running generation has switched to them (or timeout_s)."""
        ...

    def load(self) -> EngineLoad:
        """Requests and tokens in flight, for routing."""
        ...


@dataclass
class EngineConfig:
    """Which generation engine a rollout worker builds, and its knobs."""

    type: str = "hf"
    """Engine backend. Known: 'hf' (transformers on CPU, the default and the test engine)."""
    model_path: str = ""
    """Local directory of a transformers checkpoint (config + weights); no hub downloads."""
    max_batch_size: int = 512
    """Most requests decoded together; a larger ``generate`` call is split into chunks of this size."""
    seed: int = 0
    """Seed of the engine's sampling generator; engines of one run should get different seeds."""

    def __post_init__(self) -> None:
        if self.type not in _ENGINE_TYPES:
            raise ValueError(
                f"EngineConfig.type={self.type!r}: unknown engine; use one of {sorted(_ENGINE_TYPES)}."
            )
        if self.max_batch_size < 1:
            raise ValueError(
                f"EngineConfig.max_batch_size={self.max_batch_size}: must be >= 1; "
                "lower it to fit memory, never to 0."
            )


_ENGINE_TYPES = frozenset({"hf"})


def make_engine(
    config: EngineConfig,
    engine_id: int = 0,
    version: int = 0,
    model: PreTrainedModel | None = None,
) -> GenerationEngine:
    """Build the engine named by ``config.type``.

    ``model`` is a runtime handle (an already built model, e.g. in tests); when it is None the
    engine loads ``config.model_path``.
    """
    if config.type == "hf":
        from rollout.hf_engine import HFEngine

        if model is None and not config.model_path:
            raise ValueError(
                "EngineConfig.model_path='' and no model given: set model_path to a local checkpoint."
            )
        return HFEngine(
            model if model is not None else config.model_path,
            engine_id=engine_id,
            version=version,
            max_batch_size=config.max_batch_size,
            seed=config.seed,
        )
    raise AssertionError(f"EngineConfig.type={config.type!r} passed validation but has no builder")
