"""The GPU generation engine: vLLM's ``AsyncLLM`` behind the ``GenerationEngine`` Protocol.

Threads and processes (inside one rollout worker actor that holds a GPU):
- the caller's threads (the worker's rollout loop, the controller's calls) use the Protocol methods;
  each turns into a coroutine posted to
- the engine's event-loop thread, which owns the ``AsyncLLM`` client: one task per request iterates
  its output deltas (every ``stream_interval`` tokens), labels the tokens with versions, streams
  chunks and resolves the ``RequestHandle``;
- vLLM's engine-core process (spawned by ``AsyncLLM``) holds the model, the scheduler and the KV
  cache, and runs our ``WeightExtension`` methods and ``areal_swap`` (rollout/vllm_extension.py).
Weight swap (interruptible generation), always on the loop thread, one at a time: one utility call
``areal_swap`` makes the engine core stop scheduling, finish the step in flight, record how many
tokens every request has, load the new weights, preempt the running requests (their prompt and
partial output are re-encoded by the new weights) and schedule on. The client then records, per
request, "tokens before index n were sampled by the old version" and bumps its version in the same
loop step, so a token's version is that of the weights that sampled it, as the engine reports it:
no timing assumption, and a sample spanning a swap carries both versions.
Every vLLM call goes through ``rollout/vllm_adapter.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import pickle
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

from areal_like.core.types import GenerationOutput
from rollout import vllm_adapter as vllm
from rollout.engine import EngineLoad, RequestHandle, SamplingParams, TokenChunk

if TYPE_CHECKING:
    import torch

    from rollout.config import VLLMConfig

logger = logging.getLogger(__name__)
T = TypeVar("T")


def token_versions(start_version: int, swaps: list[tuple[int, int]], first: int, count: int) -> list[int]:
    """Versions of a request's output tokens ``first .. first+count-1``. ``start_version`` is the
    engine's version when the request began; ``swaps`` lists ``(n, version)`` in swap order: the
    tokens from index ``n`` on were sampled by ``version`` (until the next swap)."""
    out = []
    for i in range(first, first + count):
        version = start_version
        for n, after in swaps:
            if i < n:
                break
            version = after
        out.append(version)
    return out


def counts_by_request_id(engine_counts: dict[str, int]) -> dict[str, int]:
    """The engine core's ``{internal id: tokens}`` keyed by our request ids too: vLLM 0.25 appends
    ``-<8 random characters>`` to every request id it is given."""
    out = dict(engine_counts)
    for internal, n in engine_counts.items():
        base, _, suffix = internal.rpartition("-")
        if base and len(suffix) == 8:
            out.setdefault(base, n)
    return out


async def _let_tasks_end(timeout_s: float) -> None:
    """Give the loop's other tasks up to ``timeout_s`` to end (after a shutdown has cancelled them)."""
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    if others:
        await asyncio.wait(others, timeout=timeout_s)


class _Versions:
    """Which weights sampled a running request's tokens (see ``token_versions``)."""

    __slots__ = ("start", "swaps")

    def __init__(self, start: int) -> None:
        self.start = start
        self.swaps: list[tuple[int, int]] = []


class VLLMEngine:
    def __init__(
        self,
        model_path: str,
        config: VLLMConfig,
        engine_id: int = 0,
        version: int = 0,
        max_batch_size: int = 512,
        seed: int = 0,
    ) -> None:
        self.engine_id = engine_id
        self.config = config
        self._version = version
        self._seed = seed
        self._ids = itertools.count()
        self._running: dict[str, RequestHandle] = {}
        self._tokens_in_flight: dict[str, int] = {}
        self._versions: dict[str, _Versions] = {}
        self._decode_events = 0
        self.swaps_total = 0
        self._paused = False
        self._sleeping = False
        self._closed = False
        self._swap_lock: asyncio.Lock | None = None
        self.last_swap_s: dict[str, float] = {}
        """Seconds of the last weight swap, measured in the engine core: ``engine_stopped`` (no
        step ran: load + preemption of the running requests), ``drain`` (finishing the step in
        flight), ``load``, ``reset``; and ``end_to_end`` as the client saw it (round trip included)."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"vllm-{engine_id}", daemon=True)
        self._thread.start()
        start = time.perf_counter()
        self._llm = self._call(self._start(model_path, max_batch_size), config.start_timeout_s)
        self.start_seconds = time.perf_counter() - start
        self.batch_limits = vllm.batch_limits(self._llm)
        """The engine's ``max_num_batched_tokens`` and ``max_num_seqs`` as vLLM resolved them."""
        start = time.perf_counter()
        self._warm_up()
        self.warmup_seconds = time.perf_counter() - start
        logger.info(
            "vLLM engine %d started in %.1fs, warmed up in %.2fs (%s; %s)",
            engine_id, self.start_seconds, self.warmup_seconds, model_path, self.batch_limits,
        )  # fmt: skip

    def _warm_up(self) -> None:
        """One two-token sampled request, so that what vLLM compiles at the first request that asks
        for log-probs (the Triton kernel ``_topk_log_softmax_kernel``, the per-request-seed sampler)
        is compiled at start, not inside the first rollout."""
        from rollout.engine import SamplingParams

        self.submit([0], SamplingParams(max_new_tokens=2, temperature=1.0), request_id="warm-up").result(
            self.config.start_timeout_s
        )
        self._decode_events = 0

    async def _start(self, model_path: str, max_batch_size: int) -> Any:
        self._swap_lock = asyncio.Lock()
        return vllm.start_async_llm(model_path, self.config, max_batch_size, self._seed)

    # ---- Protocol ---------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return self._version

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        stream: bool = False,
    ) -> RequestHandle:
        if self._closed:
            raise RuntimeError(f"vLLM engine {self.engine_id} is closed")
        rid = request_id or f"e{self.engine_id}-{next(self._ids)}"
        handle = RequestHandle(rid, self.engine_id, stream=stream)
        # A per-request seed keeps samples independent of batching and timing (like HFEngine).
        seed = (
            (self._seed * 1_000_003 + zlib.crc32(rid.encode())) % (2**31) if params.temperature > 0 else None
        )
        vparams = vllm.sampling_params(params, seed=seed)
        self._running[rid] = handle
        self._tokens_in_flight[rid] = len(prompt_ids)
        asyncio.run_coroutine_threadsafe(self._serve(handle, list(prompt_ids), vparams), self._loop)
        return handle

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | Sequence[SamplingParams],
        timeout_s: float | None = None,
    ) -> list[GenerationOutput]:
        per = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        handles = [self.submit(p, sp) for p, sp in zip(prompts, per, strict=True)]
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        return [
            h.result(None if deadline is None else max(0.0, deadline - time.monotonic())) for h in handles
        ]

    def abort(self, request_ids: list[str]) -> None:
        known = [r for r in request_ids if r in self._running]
        if known:
            self._call(vllm.abort(self._llm, known), 60.0)

    def pause(self, timeout_s: float = 60.0) -> None:
        self._call(self._pause(), timeout_s)

    def resume(self) -> None:
        self._call(self._resume(), 60.0)

    def update_weights(
        self, state_dict: dict[str, torch.Tensor], version: int, timeout_s: float = 60.0
    ) -> None:
        """Object-store path: HF-named tensors (any dtype, CPU) -> this GPU -> CUDA IPC -> vLLM's
        ``load_weights`` in the engine core, swapped at a token boundary."""
        import torch

        from areal_like.core.realloc.ipc import share_tensors

        dtype = getattr(torch, self.config.dtype)
        on_gpu = {n: t.detach().to("cuda", dtype).contiguous() for n, t in state_dict.items()}
        blob = pickle.dumps(share_tensors(on_gpu))
        self._call(self._swap(version, "areal_load_shared", blob), timeout_s)
        del on_gpu

    def load(self) -> EngineLoad:
        running = len(self._running)
        return EngineLoad(
            running_requests=0 if self._paused else running,
            waiting_requests=running if self._paused else 0,
            tokens_in_flight=sum(self._tokens_in_flight.values()),
            decode_steps_total=self._decode_events,
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._running:
                self._call(vllm.abort(self._llm, list(self._running)), 30.0)
            self._call(vllm.stop_output_handler(self._llm), 30.0)
        finally:
            vllm.shutdown(self._llm)
            # vLLM cancels its socket-reading tasks on this loop: let them end before it stops, or
            # asyncio reports "Task was destroyed but it is pending!" at exit.
            with contextlib.suppress(TimeoutError):  # a stuck loop is stopped all the same
                self._call(_let_tasks_end(2.0), 10.0)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10.0)

    # ---- weight paths of the reallocation plan and colocated placement -----------------------------
    def setup_realloc(
        self, plan, config, master_addr: str, master_port: int, member: int, engine_rank: int
    ) -> int:
        """Split placement: the engine core joins the plan's NCCL group; returns staging bytes."""
        blob = pickle.dumps((plan, config, master_addr, master_port, member, engine_rank))
        return self._call(vllm.rpc(self._llm, "areal_join", blob), config.connect_timeout_s + 60)

    def receive_weights(self, version: int, timeout_s: float) -> dict:
        """Split placement: receive ``version`` over NCCL (generation paused meanwhile) and load it."""
        return self._call(self._swap(version, "areal_receive", version), timeout_s)

    def make_arena(self, plan, engine_rank: int):
        """Colocated placement: allocate the staging arena in the engine core; returns its ``IpcHandle``."""
        blob = self._call(vllm.rpc(self._llm, "areal_make_arena", pickle.dumps((plan, engine_rank))), 300.0)
        return pickle.loads(blob)

    def load_staged(self, version: int, timeout_s: float = 60.0) -> None:
        """Colocated placement: the trainer rank has written ``version`` into the arena; load it."""
        self._call(self._swap(version, "areal_load_staged"), timeout_s)

    def sleep(self, timeout_s: float = 300.0) -> None:
        """Colocated placement: free this GPU for the trainer (requests stay queued, frozen)."""
        self._call(self._sleep(), timeout_s)

    def wake(self, resume: bool = True, timeout_s: float = 300.0) -> None:
        """Undo ``sleep``. ``resume=False`` keeps generation paused (load new weights, then ``resume``)."""
        self._call(self._wake(resume), timeout_s)

    def prefix_cache_blocks(self) -> dict:
        """The engine core's KV blocks holding a prefix-cache hash (``hashed``), hash-map entries
        (``mapped``) and all blocks (``blocks``): what a swap's reset leaves (a check, O(blocks))."""
        return self._call(vllm.hashed_blocks(self._llm), 60.0)

    def weights_digest(self) -> str:
        return self._call(vllm.rpc(self._llm, "areal_digest"), 600.0)

    def on_client_thread(self, fn: Callable[[], T]) -> T:
        """``fn()`` run on the thread that runs the AsyncLLM client and our request tasks (for
        diagnostics: that thread's CPU time, a profiler switched on or off there)."""

        async def call() -> T:
            return fn()

        return self._call(call(), 60.0)

    # ---- loop side --------------------------------------------------------------------------------
    async def _serve(self, handle: RequestHandle, prompt_ids: list[int], params: Any) -> None:
        rid = handle.request_id
        tokens: list[int] = []
        logprobs: list[float] = []
        versions: list[int] = []
        reason = "abort"
        # Registered before the request reaches vLLM, on the loop thread that records swaps.
        record = self._versions[rid] = _Versions(self._version)
        try:
            async for delta in vllm.generate(self._llm, rid, prompt_ids, params):
                if delta.token_ids:
                    new = token_versions(record.start, record.swaps, len(tokens), len(delta.token_ids))
                    tokens += delta.token_ids
                    logprobs += delta.logprobs
                    versions += new
                    self._tokens_in_flight[rid] = len(prompt_ids) + len(tokens)
                    self._decode_events += 1
                    handle._emit(TokenChunk(delta.token_ids, delta.logprobs, new))
                if delta.finish_reason is not None:
                    reason = delta.finish_reason
            handle._finish(GenerationOutput(tokens, logprobs, versions, reason))
        except BaseException as e:  # noqa: BLE001 - the handle carries any failure to its caller
            handle._finish(None, e)
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            self._running.pop(rid, None)
            self._tokens_in_flight.pop(rid, None)
            self._versions.pop(rid, None)

    async def _pause(self) -> None:
        await vllm.pause(self._llm)
        self._paused = True

    async def _resume(self) -> None:
        self._paused = False
        await vllm.resume(self._llm)

    async def _swap(self, version: int, method: str, *args: Any) -> Any:
        assert self._swap_lock is not None
        async with self._swap_lock:
            start = time.perf_counter()
            keep_paused = self._paused or self._sleeping
            out = await vllm.swap(self._llm, method, list(args), keep_paused)
            # No await from here to the version bump: deltas sampled after the swap are processed
            # by the client after this step of the loop, and find the swap recorded.
            counts = counts_by_request_id(out["tokens"])
            for rid, record in self._versions.items():
                record.swaps.append((counts.get(rid, 0), version))
            self._version = version
            self.swaps_total += 1
            self.last_swap_s = {
                "engine_stopped": out["stopped_s"],
                "drain": out["drain_s"],
                "load": out["load_s"],
                "reset": out["reset_s"],
                "end_to_end": time.perf_counter() - start,
            }
            return out["result"]

    async def _sleep(self) -> None:
        if self._sleeping:
            return
        await self._pause()
        await vllm.sleep(self._llm, self.config.sleep_level)
        self._sleeping = True

    async def _wake(self, resume: bool) -> None:
        if self._sleeping:
            await vllm.wake(self._llm)
            self._sleeping = False
            # vLLM resumes its scheduler on a full wake; hold it until the new weights are in.
            await vllm.pause(self._llm)
        if resume:
            await self._resume()

    def _call(self, coro, timeout_s: float) -> Any:
        future: Future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout_s)
        except TimeoutError:
            future.cancel()
            raise TimeoutError(f"vLLM engine {self.engine_id}: no answer within {timeout_s:.0f}s") from None
