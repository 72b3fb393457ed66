"""HFEngine: a transformers causal LM with continuous batching and interruptible weight updates.

Dataflow (one engine thread decodes; any number of caller threads submit, wait, update, abort):
- callers: ``submit`` validates a request, appends it to the waiting queue under ``_cond`` and
  starts the engine thread if none runs; it returns a ``RequestHandle`` at once. ``generate`` is
  ``submit`` for a list plus waiting on the handles.
- engine thread (``_run``), one iteration per token boundary:
  1. boundary, under ``_cond``: load a pending weight update; take aborted requests out; park while
     paused; admit waiting requests up to ``max_batch_size`` running; exit when nothing is left.
  2. forward, without the lock: the running rows feed their last sampled token (one decode step on
     the KV cache) or, if the weights changed since their cache was built, are re-encoded from
     prompt + partial output by the new weights (AReaL: "discard KV, recompute"); newcomers are
     prefilled and joined to the batch (``rollout.kv_batch``).
  3. sample one token per row with the row's own params; record its log-prob and the version of the
     weights that computed the logits; rows that hit a stop token or their max_new_tokens leave the
     batch and their handles resolve. A long request therefore never holds up short ones.
- ``update_weights`` (the trainer's weight sync) validates in the caller's thread, posts the update
  and waits on ``_cond`` until the engine thread loads it at the next token boundary (or applies it
  itself when no engine thread runs), bounded by ``timeout_s``. ``receive_weights`` (reallocation
  plan) runs this process's plan executor into staging tensors in the caller's thread, then hands
  them to ``update_weights``: decoding goes on during the transfer.
Who blocks whom: callers hold ``_cond`` only briefly; only the engine thread touches the model while
it runs, so weights never change under a forward pass. Handle callbacks run on the engine thread.
Shutdown: the thread exits by itself when it has no request and no pending update (an idle engine
runs nothing); ``close`` aborts every request and joins it. If a forward raises, every request fails
with that error and later submits raise it.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from areal_like.core.types import GenerationOutput
from rollout import kv_batch
from rollout.engine import EngineLoad, RequestHandle, SamplingParams, TokenChunk
from rollout.sampling import sample_tokens

if TYPE_CHECKING:
    from areal_like.core.realloc import Plan, ReallocConfig
    from areal_like.core.realloc.executor import ReallocExecutor

logger = logging.getLogger(__name__)

# Shape legend: B = rows (requests) in the running batch, V = vocabulary.

_PARK_POLL_S = 1.0
"""While paused the engine thread re-checks its state at least this often."""


@dataclass
class _PendingUpdate:
    """New weights posted by ``update_weights`` for the engine thread to load at a token boundary."""

    state_dict: dict[str, torch.Tensor]
    version: int
    applied: bool = False


@dataclass
class _Request:
    """One request inside the engine: what was asked and what has been generated so far."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    handle: RequestHandle
    generator: torch.Generator
    """The request's own random stream (``rollout.sampling``): its samples do not depend on batching."""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)

    def output(self, finish_reason: str) -> GenerationOutput:
        return GenerationOutput(
            response_ids=self.tokens,
            logprobs=self.logprobs,
            versions=self.versions,
            finish_reason=finish_reason,
        )


@dataclass
class _Boundary:
    """What the engine thread does after a token boundary (decided under ``_cond``)."""

    newcomers: list[_Request]
    aborted: list[_Request]
    forward: bool
    """False: only finish the aborted requests, then come back to the boundary."""


class HFEngine:
    """Generation engine on a transformers model, float32 on CPU (see the module docstring).

    Behaviour log-probs are those of ``rollout.sampling.sample_tokens``: under the tempered,
    un-truncated distribution, which is what a trainer recomputes from the same logits.
    """

    def __init__(
        self,
        model: PreTrainedModel | str | os.PathLike,
        engine_id: int = 0,
        version: int = 0,
        max_batch_size: int = 512,
        seed: int = 0,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"HFEngine max_batch_size={max_batch_size}: must be >= 1.")
        if not isinstance(model, PreTrainedModel):
            model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, local_files_only=True)
        self.model = model.to(device="cpu", dtype=torch.float32).eval()
        self.engine_id = engine_id
        self.max_batch_size = max_batch_size
        self._version = version
        self._seed = seed
        config = self.model.config.get_text_config(decoder=True)
        self._vocab_size: int = config.vocab_size
        # Pad positions are masked out, so any valid id works; prefer the model's own.
        pad_token_id = getattr(config, "pad_token_id", None)
        self._pad_token_id: int = pad_token_id if pad_token_id is not None else 0
        self._param_shapes = {name: tuple(t.shape) for name, t in self.model.state_dict().items()}
        self._num_submitted = itertools.count()  # numbers requests: default ids and random streams

        # Guarded by _cond: the queue, the live request ids, control flags and the thread handle.
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._live: dict[str, _Request] = {}
        self._abort_ids: set[str] = set()
        self._pending: _PendingUpdate | None = None
        self._paused = False
        self._parked = False  # the engine thread is waiting at a boundary because of pause
        self._closed = False
        self._failure: BaseException | None = None
        self._thread: threading.Thread | None = None
        # Written by the engine thread, read by load().
        self._num_running = 0
        self._tokens_in_flight = 0
        self._decode_steps = 0
        self._on_step: Callable[[int], None] | None = None
        """Test hook, called on the engine thread at each token boundary with the most tokens any
        running request has generated so far."""
        # The reallocation plan's receiver (``setup_realloc``): executor, hosted engine rank, staging.
        self._realloc: ReallocExecutor | None = None
        self._realloc_rank = 0
        self._staging: dict[int, dict[str, torch.Tensor]] = {}

    # ---- the Protocol ------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return self._version

    def load(self) -> EngineLoad:
        with self._cond:
            return EngineLoad(
                running_requests=self._num_running,
                waiting_requests=len(self._waiting),
                tokens_in_flight=self._tokens_in_flight,
                decode_steps_total=self._decode_steps,
            )

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        stream: bool = False,
    ) -> RequestHandle:
        return self._submit_many([prompt_ids], [params], [request_id], stream)[0]

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | Sequence[SamplingParams],
        timeout_s: float | None = None,
    ) -> list[GenerationOutput]:
        """Generate one response per prompt, in prompt order (a convenience over ``submit``)."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(
                f"engine {self.engine_id}: {len(params)} SamplingParams for {len(prompts)} prompts; "
                "pass one SamplingParams for all or one per prompt."
            )
        handles = self._submit_many(prompts, list(params), [None] * len(prompts), stream=False)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        return [
            h.result(None if deadline is None else max(deadline - time.monotonic(), 0.0)) for h in handles
        ]

    def abort(self, request_ids: list[str]) -> None:
        with self._cond:
            self._abort_ids.update(rid for rid in request_ids if rid in self._live)
            self._cond.notify_all()

    def pause(self, timeout_s: float = 60.0) -> None:
        with self._cond:
            self._paused = True
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: self._thread is None or self._parked, timeout=timeout_s):
                raise TimeoutError(
                    f"engine {self.engine_id}: did not reach a token boundary within {timeout_s}s of pause"
                )

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def update_weights(
        self, state_dict: dict[str, torch.Tensor], version: int, timeout_s: float = 60.0
    ) -> None:
        """Load ``state_dict`` as policy ``version``; running requests switch at their next token.

        Blocks until the weights are loaded. Raises ValueError (weights and version unchanged) when
        the state_dict does not match the model or the version goes backwards, and TimeoutError
        when the engine thread does not reach a token boundary within ``timeout_s``.
        """
        self._check_update(state_dict, version)
        update = _PendingUpdate(state_dict=state_dict, version=version)
        deadline = time.monotonic() + timeout_s
        with self._cond:
            # One update at a time: a second updater waits for the first to be applied.
            if not self._cond.wait_for(lambda: self._pending is None, timeout=timeout_s):
                ahead = self._pending.version if self._pending is not None else "?"
                raise TimeoutError(
                    f"engine {self.engine_id}: update to version {version} waited {timeout_s}s behind the "
                    f"update to version {ahead}, which is still not applied; "
                    "check that the engine thread is making progress."
                )
            self._pending = update
            if self._thread is None:  # nothing decodes: no forward can race with the load
                self._apply_pending_locked(num_generated=None)
                return
            self._cond.notify_all()
            remaining_s = max(deadline - time.monotonic(), 0.0)
            if not self._cond.wait_for(lambda: update.applied, timeout=remaining_s):
                if self._pending is update:
                    self._pending = None
                raise TimeoutError(
                    f"engine {self.engine_id}: update to version {version} not applied within {timeout_s}s "
                    f"(engine still at version {self._version}); a decode step took longer than the "
                    "timeout: raise timeout_s or lower max_batch_size."
                )

    def weights_digest(self) -> str:
        """sha256 of the loaded weights (names and fp32 bytes), comparable with the trainer's."""
        from areal_like.core.digest import state_dict_digest

        return state_dict_digest(self.model.state_dict())

    def setup_realloc(
        self,
        plan: Plan,
        config: ReallocConfig,
        master_addr: str,
        master_port: int,
        member: int,
        engine_rank: int,
    ) -> int:
        """Join the plan's group as ``member`` hosting ``engine_rank`` (leaving a previous group);
        float32 staging in the HF state dict's names, allocated once. Returns the staging's bytes."""
        from areal_like.core.realloc.executor import ReallocExecutor
        from areal_like.core.realloc.pack import allocate_staging

        self._realloc = ReallocExecutor.rejoin(self._realloc, plan, member, config, master_addr, master_port)
        self._realloc_rank = engine_rank
        self._staging = {engine_rank: allocate_staging(plan, engine_rank)}
        return sum(t.numel() * t.element_size() for t in self._staging[engine_rank].values())

    def receive_weights(self, version: int, timeout_s: float = 60.0) -> dict:
        """Receive every bucket of ``version`` into the staging (all-or-nothing: a failed transfer
        raises with the weights untouched), then load it at the next token boundary."""
        assert self._realloc is not None, f"engine {self.engine_id}: receive_weights before setup_realloc"
        stats = self._realloc.run(version, staging=self._staging)
        self.update_weights(self._staging[self._realloc_rank], version, timeout_s=timeout_s)
        return dataclasses.asdict(stats)

    def close(self, timeout_s: float = 30.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)

    # ---- submission and validation ------------------------------------------------------------------
    def _submit_many(
        self,
        prompts: list[list[int]],
        params: list[SamplingParams],
        request_ids: list[str | None],
        stream: bool,
    ) -> list[RequestHandle]:
        self._check_prompts(prompts)
        with self._cond:
            if self._closed:
                raise RuntimeError(f"engine {self.engine_id}: submit after close()")
            if self._failure is not None:
                raise RuntimeError(f"engine {self.engine_id} failed earlier: {self._failure!r}")
            requests: list[_Request] = []
            new_ids: set[str] = set()
            for prompt, request_params, rid in zip(prompts, params, request_ids, strict=True):
                number = next(self._num_submitted)
                rid = rid if rid is not None else f"{self.engine_id}-{number}"
                if rid in self._live or rid in new_ids:
                    raise ValueError(f"engine {self.engine_id}: request id {rid!r} is already in flight")
                new_ids.add(rid)
                handle = RequestHandle(rid, self.engine_id, stream=stream)
                # The n-th request of an engine seeded s always gets the same random stream.
                generator = torch.Generator().manual_seed(self._seed * 1_000_003 + number)
                requests.append(_Request(rid, list(prompt), request_params, handle, generator))
            for request in requests:
                self._live[request.request_id] = request
            self._waiting.extend(requests)
            if self._thread is None and requests:
                self._thread = threading.Thread(
                    target=self._run, name=f"hf-engine-{self.engine_id}", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()
        return [r.handle for r in requests]

    def _check_prompts(self, prompts: list[list[int]]) -> None:
        for index, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(
                    f"engine {self.engine_id}: prompt {index} is empty; every prompt needs a token."
                )
            low, high = min(prompt), max(prompt)
            if low < 0 or high >= self._vocab_size:
                raise ValueError(
                    f"engine {self.engine_id}: prompt {index} has token ids in [{low}, {high}], outside the "
                    f"model's vocabulary [0, {self._vocab_size}); tokenize with the model's tokenizer."
                )

    def _check_update(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Validate before loading: ``load_state_dict`` copies matching tensors before it raises."""
        if version < self._version:
            raise ValueError(
                f"engine {self.engine_id}: update_weights version={version} is older than the loaded version "
                f"{self._version}; versions must not go backwards."
            )
        missing = [name for name in self._param_shapes if name not in state_dict]
        unexpected = [name for name in state_dict if name not in self._param_shapes]
        mismatched = [
            f"{name}: got {tuple(tensor.shape)}, model has {self._param_shapes[name]}"
            for name, tensor in state_dict.items()
            if name in self._param_shapes
            and (not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != self._param_shapes[name])
        ]
        if missing or unexpected or mismatched:
            problems = [
                f"{label} ({len(items)}): {items[:3]}"
                for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", mismatched))
                if items
            ]
            raise ValueError(
                f"engine {self.engine_id}: state_dict for version {version} does not match the model; "
                f"{'; '.join(problems)}. Send the full model state_dict under the model's own "
                f"parameter names. Weights and version ({self._version}) are unchanged."
            )

    def _apply_pending_locked(self, num_generated: int | None) -> None:
        """Load the pending update; caller holds ``_cond`` and no forward pass is running."""
        update = self._pending
        assert update is not None
        self.model.load_state_dict(update.state_dict, strict=True)
        logger.info(
            "engine %d: weights v%d -> v%d %s",
            self.engine_id,
            self._version,
            update.version,
            "while idle" if num_generated is None else f"at token {num_generated}, re-encoding the batch",
        )
        self._version = update.version
        update.applied = True
        self._pending = None
        self._cond.notify_all()

    # ---- the engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        rows: list[_Request] = []  # the running batch, in row order
        batch: kv_batch.PaddedBatch | None = None
        cache_version = self._version  # weights the batch's KV cache was computed with
        try:
            while True:
                num_generated = max((len(r.tokens) for r in rows), default=0)
                if self._on_step is not None:
                    self._on_step(num_generated)
                with self._cond:
                    step = self._boundary_locked(rows, num_generated)
                if step is None:
                    return
                if step.aborted:
                    rows, batch = self._leave(rows, batch, {id(r) for r in step.aborted})
                    self._publish_load(rows, batch)
                    self._resolve([(r, "abort") for r in step.aborted])
                if not step.forward:
                    continue
                logits, batch, cache_version = self._forward(rows, batch, cache_version, step.newcomers)
                rows = rows + step.newcomers
                finished = self._sample_and_record(logits, rows, version=cache_version)
                if finished:
                    rows, batch = self._leave(rows, batch, {id(r) for r, _ in finished})
                self._publish_load(rows, batch)
                self._resolve(finished)
        except BaseException as error:
            logger.exception("engine %d: engine thread failed; failing every request", self.engine_id)
            with self._cond:
                self._failure = error
                failed = list(self._live.values())  # running, joining and waiting requests alike
                self._waiting.clear()
                self._live.clear()
                self._thread = None
                self._num_running = self._tokens_in_flight = 0
                self._cond.notify_all()
            for request in failed:
                request.handle._finish(None, error)

    def _boundary_locked(self, rows: list[_Request], num_generated: int) -> _Boundary | None:
        """Token boundary: updates, aborts, pause and admission; None tells the thread to exit."""
        while True:
            if self._pending is not None:
                self._apply_pending_locked(num_generated)
            if self._closed:
                self._abort_ids.update(self._live)
            if self._abort_ids:
                aborted = [r for r in (*rows, *self._waiting) if r.request_id in self._abort_ids]
                self._waiting = collections.deque(
                    r for r in self._waiting if r.request_id not in self._abort_ids
                )
                self._abort_ids.clear()
                if aborted:
                    return _Boundary(newcomers=[], aborted=aborted, forward=False)
            if self._paused and (rows or self._waiting) and not self._closed:
                self._parked = True
                self._cond.notify_all()
                self._cond.wait(_PARK_POLL_S)
                continue
            self._parked = False
            newcomers: list[_Request] = []
            while self._waiting and len(rows) + len(newcomers) < self.max_batch_size:
                newcomers.append(self._waiting.popleft())
            if not rows and not newcomers:
                assert not self._waiting and self._pending is None
                self._thread = None
                self._num_running = self._tokens_in_flight = 0
                self._cond.notify_all()
                return None
            return _Boundary(newcomers=newcomers, aborted=[], forward=True)

    def _forward(
        self,
        rows: list[_Request],
        batch: kv_batch.PaddedBatch | None,
        cache_version: int,
        newcomers: list[_Request],
    ) -> tuple[torch.Tensor, kv_batch.PaddedBatch, int]:
        """Next-token logits [B, V] for the running rows then the newcomers, all under ``self._version``."""
        version = self._version  # only this thread changes it while the thread runs
        parts = []
        if rows:
            assert batch is not None
            if cache_version != version:
                # New weights: the cached keys/values are stale; recompute them over the whole prefix.
                logits, batch = kv_batch.prefill(
                    self.model, [r.prompt_ids + r.tokens for r in rows], self._pad_token_id
                )
            else:
                last = torch.tensor([r.tokens[-1] for r in rows], dtype=torch.long)  # [B]
                logits = kv_batch.decode(self.model, batch, last)
            parts.append(logits)
        if newcomers:
            logits, joined = kv_batch.prefill(
                self.model, [r.prompt_ids for r in newcomers], self._pad_token_id
            )
            batch = kv_batch.concat(batch, joined) if rows and batch is not None else joined
            parts.append(logits)
        self._decode_steps += 1
        assert batch is not None
        return (torch.cat(parts) if len(parts) > 1 else parts[0]), batch, version

    def _sample_and_record(
        self, logits: torch.Tensor, rows: list[_Request], version: int
    ) -> list[tuple[_Request, str]]:
        """Sample a token per row, append it with its log-prob and version; return finished rows."""
        temperatures = torch.tensor([r.params.temperature for r in rows], dtype=logits.dtype)  # [B]
        top_p = torch.tensor([r.params.top_p for r in rows], dtype=logits.dtype)  # [B]
        tokens, logprobs = sample_tokens(logits, temperatures, top_p, [r.generator for r in rows])
        finished = []
        for request, token, logprob in zip(rows, tokens.tolist(), logprobs.tolist(), strict=True):
            request.tokens.append(token)
            request.logprobs.append(logprob)
            request.versions.append(version)
            if request.handle.streaming:
                request.handle._emit(TokenChunk([token], [logprob], [version]))
            if token in request.params.stop_token_ids:
                finished.append((request, "stop"))
            elif len(request.tokens) >= request.params.max_new_tokens:
                finished.append((request, "length"))
        return finished

    def _leave(
        self, rows: list[_Request], batch: kv_batch.PaddedBatch | None, leaving: set[int]
    ) -> tuple[list[_Request], kv_batch.PaddedBatch | None]:
        """Drop the rows whose ``id()`` is in ``leaving`` from the row list and the batch."""
        keep = [i for i, r in enumerate(rows) if id(r) not in leaving]
        if len(keep) == len(rows):
            return rows, batch
        if not keep:
            return [], None
        assert batch is not None
        kv_batch.select(batch, torch.tensor(keep, dtype=torch.long))
        return [rows[i] for i in keep], batch

    def _publish_load(self, rows: list[_Request], batch: kv_batch.PaddedBatch | None) -> None:
        # Every row holds one sampled token not yet fed to the model, hence + len(rows).
        self._num_running = len(rows)
        self._tokens_in_flight = int(batch.lengths.sum()) + len(rows) if batch is not None else 0

    def _resolve(self, finished: list[tuple[_Request, str]]) -> None:
        if not finished:
            return
        with self._cond:
            for request, _ in finished:
                self._live.pop(request.request_id, None)
        for request, reason in finished:
            request.handle._finish(request.output(reason))
