"""The generation engine interface: what a rollout worker calls to turn prompts into responses.

An engine owns one copy of the policy weights and a queue of requests. ``submit`` hands it one
token-id request with its sampling params and returns a ``RequestHandle`` at once; the engine decodes
its requests together (continuous batching: a request joins the running batch between decode steps
and leaves it when done) and resolves each handle with a ``GenerationOutput`` that carries, for every
output token, its behaviour log-prob and the policy version of the weights that produced it, as
recorded by the engine itself. ``update_weights`` swaps the weights while generating (interruptible
generation, AReaL section 3): the swap happens at a token boundary and the unfinished requests
continue from their partial output under the new version, their prefix re-encoded by the new weights.
``pause``/``resume`` hold and restart decoding at a token boundary; ``abort`` ends requests early
with finish_reason 'abort' and their partial output.

Weights from the reallocation plan (``areal_like/core/realloc``): every engine hosts its own
receiver, so the rollout worker calls the same two methods whatever engine it holds.
``setup_realloc`` joins the plan's group (leaving a previous one) and allocates staging tensors in
the engine's layout (``plan_destination``); ``receive_weights`` takes every bucket of a version into
the staging and only then swaps it in at a token boundary. ``weights_digest`` is the sha256 of the
weights as HF-named fp32 tensors, comparable with the trainer's. Engines that can free their GPU
for a colocated trainer (vLLM) also implement ``ColocatedEngine``.

Implementations: ``HFEngine`` (transformers, CPU and tests; ``rollout/hf_engine.py``) and
``VLLMEngine`` (vLLM's AsyncLLM on a GPU; ``rollout/vllm_engine.py``). ``make_engine`` builds one from
an ``EngineConfig``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from areal_like.core.realloc import DestinationLayout, Plan, Qwen2Dims, ReallocConfig
    from areal_like.core.realloc.ipc import IpcHandle
    from areal_like.core.types import GenerationOutput
    from rollout.config import VLLMConfig


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request (each request of a batch may have its own)."""

    max_new_tokens: int
    """Most tokens generated for the request; reaching it ends the request with finish_reason 'length'."""
    temperature: float = 1.0
    """Softmax temperature; 0.0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids (eos) that end a request with finish_reason 'stop'; the stop token is kept.
    Empty: generate exactly max_new_tokens (ignore eos, as benchmarks do)."""

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
    """What an engine has in flight right now (for routing and for the stall watchdog)."""

    running_requests: int
    """Requests in the batch being decoded."""
    waiting_requests: int
    """Requests submitted and not yet admitted to the batch (queue full, or paused)."""
    tokens_in_flight: int
    """Tokens (prompt + generated) of the running requests, i.e. held in the KV cache."""
    decode_steps_total: int = 0
    """Forward passes since the engine started; it stops moving when the engine is stuck."""


@dataclass(frozen=True)
class TokenChunk:
    """Tokens of one request produced since the previous chunk (streaming; one per decode step on HF)."""

    token_ids: list[int]
    """New token ids [K]."""
    logprobs: list[float]
    """Behaviour log-prob of each new token [K]."""
    versions: list[int]
    """Policy version that produced each new token [K]."""


class RequestHandle:
    """The caller's side of one submitted request: its result, its token stream and its timings.

    The engine's thread fills it (``_emit``, ``_finish``, ``_fail``); callers wait with ``result`` or
    iterate ``stream``. Done callbacks run on the engine's thread, so they must be quick (a queue put).
    """

    def __init__(self, request_id: str, engine_id: int, stream: bool = False) -> None:
        self.request_id = request_id
        self.engine_id = engine_id
        self.submitted_at = time.monotonic()
        """monotonic time of ``submit``."""
        self.finished_at: float | None = None
        """monotonic time the engine resolved the request (None while running)."""
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._output: GenerationOutput | None = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[RequestHandle], None]] = []
        self._chunks: queue.SimpleQueue[TokenChunk | None] | None = queue.SimpleQueue() if stream else None

    def finished_s(self) -> float:
        """``finished_at`` of a resolved request (the caller knows it is done)."""
        assert self.finished_at is not None, f"request {self.request_id} has not finished"
        return self.finished_at

    def done(self) -> bool:
        return self._done.is_set()

    @property
    def streaming(self) -> bool:
        """Whether the request was submitted with ``stream=True`` (the engine then emits chunks)."""
        return self._chunks is not None

    def result(self, timeout_s: float | None = None) -> GenerationOutput:
        """The finished output; TimeoutError after ``timeout_s``, RuntimeError if the engine failed."""
        if not self._done.wait(timeout_s):
            raise TimeoutError(
                f"engine {self.engine_id}: request {self.request_id} not finished within {timeout_s}s"
            )
        if self._error is not None:
            raise RuntimeError(
                f"engine {self.engine_id}: request {self.request_id} failed: {self._error!r}"
            ) from self._error
        assert self._output is not None
        return self._output

    def stream(self, timeout_s: float | None = None) -> Iterator[TokenChunk]:
        """Yield token chunks as the engine produces them, until the request ends (then ``result``).

        Each wait for the next chunk is bounded by ``timeout_s`` (TimeoutError). Needs ``stream=True``
        at submit.
        """
        if self._chunks is None:
            raise ValueError(f"request {self.request_id} was submitted without stream=True")
        while True:
            try:
                chunk = self._chunks.get(timeout=timeout_s)
            except queue.Empty:
                raise TimeoutError(
                    f"engine {self.engine_id}: request {self.request_id} sent no token for {timeout_s}s"
                ) from None
            if chunk is None:
                return
            yield chunk

    def add_done_callback(self, fn: Callable[[RequestHandle], None]) -> None:
        """Call ``fn(handle)`` once the request ends (at once when it already has)."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    # ---- engine side -------------------------------------------------------------------------------
    def _emit(self, chunk: TokenChunk) -> None:
        if self._chunks is not None:
            self._chunks.put(chunk)

    def _finish(self, output: GenerationOutput | None, error: BaseException | None = None) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self._output, self._error = output, error
            self.finished_at = time.monotonic()
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        if self._chunks is not None:
            self._chunks.put(None)
        for fn in callbacks:
            fn(self)


class GenerationEngine(Protocol):
    """One copy of the policy that generates responses and takes weight updates while generating."""

    engine_id: int

    @property
    def version(self) -> int:
        """Policy version of the weights currently loaded."""
        ...

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        stream: bool = False,
    ) -> RequestHandle:
        """Queue one request; returns at once. ``stream=True`` makes ``handle.stream()`` available."""
        ...

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | Sequence[SamplingParams],
        timeout_s: float | None = None,
    ) -> list[GenerationOutput]:
        """Submit every prompt (one params for all, or one each) and wait; outputs in prompt order."""
        ...

    def abort(self, request_ids: list[str]) -> None:
        """End these requests at the next token boundary with finish_reason 'abort' (unknown ids ignored)."""
        ...

    def pause(self, timeout_s: float = 60.0) -> None:
        """Stop decoding at the next token boundary (requests keep their place); returns once stopped."""
        ...

    def resume(self) -> None:
        """Undo ``pause``: decoding continues (re-encoding the prefixes if the weights changed meanwhile)."""
        ...

    def update_weights(
        self, state_dict: dict[str, torch.Tensor], version: int, timeout_s: float = 60.0
    ) -> None:
        """Load new weights; blocks until running generation has switched to them (or timeout_s)."""
        ...

    def load(self) -> EngineLoad:
        """Requests and tokens in flight, for routing and stall detection."""
        ...

    def close(self) -> None:
        """Abort every request and stop the engine's thread; later submits raise."""
        ...

    # ---- weights from the reallocation plan ----------------------------------------------------------
    def setup_realloc(
        self,
        plan: Plan,
        config: ReallocConfig,
        master_addr: str,
        master_port: int,
        member: int,
        engine_rank: int,
    ) -> int:
        """Join the plan's group as ``member`` hosting ``engine_rank`` (leaving the group this engine
        was in, if any); staging allocated once. Returns the staging's bytes."""
        ...

    def receive_weights(self, version: int, timeout_s: float) -> dict:
        """Receive every bucket of ``version`` into the staging, then load it at a token boundary
        (``timeout_s`` bounds the load). A failed transfer raises before the weights change. Returns
        this member's ``TransferStats`` as a dict."""
        ...

    def weights_digest(self) -> str:
        """sha256 of the loaded weights as HF-named fp32 tensors (compare with the trainer's)."""
        ...


class ColocatedEngine(GenerationEngine, Protocol):
    """An engine that shares its GPU with a trainer rank (colocated placement; vLLM): it sleeps while
    the trainer steps and takes new weights from a staging arena the trainer rank writes into."""

    def make_arena(self, plan: Plan, engine_rank: int) -> IpcHandle:
        """Allocate this engine's staging arena; returns its handle for the trainer rank."""
        ...

    def load_staged(self, version: int, timeout_s: float = 60.0) -> None:
        """The trainer rank wrote ``version`` into the arena: load it at a token boundary."""
        ...

    def sleep(self) -> None:
        """Pause generation and free the GPU memory."""
        ...

    def wake(self, resume: bool = True) -> None:
        """Take the GPU back; ``resume=False`` keeps generation paused (until the new weights)."""
        ...


@dataclass
class EngineConfig:
    """Which generation engine a rollout worker builds, and its knobs."""

    type: str = "hf"
    """Engine backend: 'hf' (transformers on CPU, the default and the test engine) or 'vllm' (GPU)."""
    model_path: str = ""
    """Local directory of a transformers checkpoint (config + weights); no hub downloads."""
    max_batch_size: int = 512
    """Most requests decoded together; more wait in the queue and join as running ones finish."""
    seed: int = 0
    """Seed of the engine's sampling generator; engines of one run should get different seeds."""
    vllm: VLLMConfig | None = None
    """vLLM settings (type 'vllm'); None = the defaults."""

    @property
    def weights_dtype(self) -> str:
        """dtype of the engine's weights, and so of the reallocation plan's wire: the HF engine
        computes in float32, vLLM in ``vllm.dtype``."""
        if self.type == "vllm":
            from rollout.config import VLLMConfig

            return (self.vllm or VLLMConfig()).dtype
        return "float32"

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


_ENGINE_TYPES = frozenset({"hf", "vllm"})


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
        from areal_like.core.models import load_model
        from rollout.hf_engine import HFEngine

        if model is None and not config.model_path:
            raise ValueError(
                "EngineConfig.model_path='' and no model given: set model_path to a local checkpoint."
            )
        return HFEngine(
            model if model is not None else load_model(config.model_path),
            engine_id=engine_id,
            version=version,
            max_batch_size=config.max_batch_size,
            seed=config.seed,
        )
    if config.type == "vllm":
        from rollout.config import VLLMConfig
        from rollout.vllm_engine import VLLMEngine

        if model is not None or not config.model_path:
            raise ValueError("EngineConfig.type='vllm' loads config.model_path itself (a local HF directory)")
        return VLLMEngine(
            config.model_path,
            config.vllm or VLLMConfig(),
            engine_id=engine_id,
            version=version,
            max_batch_size=config.max_batch_size,
            seed=config.seed,
        )
    raise AssertionError(f"EngineConfig.type={config.type!r} passed validation but has no builder")


def plan_destination(config: EngineConfig, dims: Qwen2Dims, num_engines: int) -> DestinationLayout:
    """The layout ``num_engines`` engines of ``config.type`` hold their weights in: what the
    reallocation plan writes into (HF: the HF state dict; vLLM: its own fused parameters, TP 1)."""
    from areal_like.core.realloc import hf_destination, vllm_destination

    if config.type == "hf":
        return hf_destination(dims, config.weights_dtype, num_engines)
    if config.type == "vllm":
        return vllm_destination(dims, config.weights_dtype, num_engines, 1)
    raise AssertionError(f"EngineConfig.type={config.type!r} passed validation but has no layout")
