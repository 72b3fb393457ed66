"""The GPU generation engine: vLLM's ``AsyncLLM`` behind the ``GenerationEngine`` Protocol.

Threads and processes (inside one rollout worker actor that holds a GPU):
- the caller's threads (the worker's rollout loop, the controller's calls) use the Protocol methods;
  each turns into a coroutine posted to
- the engine's event-loop thread, which owns the ``AsyncLLM`` client: one task per request iterates
  its output deltas, stamps every new token with the engine's current policy version, streams
  chunks and resolves the ``RequestHandle``;
- vLLM's engine-core process (spawned by ``AsyncLLM``) holds the model, the scheduler and the KV
  cache, and runs our ``WeightExtension`` methods (rollout/vllm_extension.py) on request.
Weight swap (interruptible generation), always on the loop thread, one at a time:
  pause (requests freeze at a token boundary; vLLM returns once their tokens are out) -> wait until
  every delivered token has been stamped -> load the new weights in the engine core -> preempt the
  frozen requests and reset the prefix cache (their prompt and partial output are re-encoded by the
  new weights) -> bump the version -> resume. So a token's version is that of the weights that
  sampled it, and a sample spanning a swap carries both versions.
Every vLLM call goes through ``rollout/vllm_adapter.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import pickle
import threading
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from areal_like.core.types import GenerationOutput
from rollout import vllm_adapter as vllm
from rollout.engine import EngineLoad, RequestHandle, SamplingParams, TokenChunk

if TYPE_CHECKING:
    import torch

    from rollout.config import VLLMConfig

logger = logging.getLogger(__name__)

_SETTLE_S = 0.005
"""Poll interval while waiting for delivered tokens to be stamped before a version bump."""


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
        self._decode_events = 0
        self._last_delivery = time.monotonic()
        self._paused = False
        self._sleeping = False
        self._closed = False
        self._swap_lock: asyncio.Lock | None = None
        self.last_swap_s: dict[str, float] = {}
        """Seconds of the last weight swap: pausing at a token boundary (and stamping what was
        delivered), loading in the engine core, and re-queueing running requests + resuming."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"vllm-{engine_id}", daemon=True)
        self._thread.start()
        start = time.perf_counter()
        self._llm = self._call(self._start(model_path, max_batch_size), config.start_timeout_s)
        self.start_seconds = time.perf_counter() - start
        logger.info("vLLM engine %d started in %.1fs (%s)", engine_id, self.start_seconds, model_path)

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
        finally:
            vllm.shutdown(self._llm)
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

    def weights_digest(self) -> str:
        return self._call(vllm.rpc(self._llm, "areal_digest"), 600.0)

    # ---- loop side --------------------------------------------------------------------------------
    async def _serve(self, handle: RequestHandle, prompt_ids: list[int], params: Any) -> None:
        rid = handle.request_id
        tokens: list[int] = []
        logprobs: list[float] = []
        versions: list[int] = []
        reason = "abort"
        try:
            async for delta in vllm.generate(self._llm, rid, prompt_ids, params):
                if delta.token_ids:
                    version = self._version
                    tokens += delta.token_ids
                    logprobs += delta.logprobs
                    versions += [version] * len(delta.token_ids)
                    self._tokens_in_flight[rid] = len(prompt_ids) + len(tokens)
                    self._decode_events += 1
                    self._last_delivery = time.monotonic()
                    handle._emit(
                        TokenChunk(delta.token_ids, delta.logprobs, [version] * len(delta.token_ids))
                    )
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

    async def _pause(self) -> None:
        await vllm.pause(self._llm)
        self._paused = True
        await self._settle()

    async def _resume(self) -> None:
        self._paused = False
        await vllm.resume(self._llm)

    async def _settle(self) -> None:
        """Wait until every token vLLM sent before the pause has been stamped by its request task
        (the delivery clock stops moving), so none of them gets the next version."""
        while True:
            last = self._last_delivery
            await asyncio.sleep(_SETTLE_S)
            if self._last_delivery == last:
                return

    async def _swap(self, version: int, method: str, *args: Any) -> Any:
        assert self._swap_lock is not None
        async with self._swap_lock:
            t0 = time.perf_counter()
            was_paused = self._paused
            if not was_paused:
                await self._pause()
            t1 = time.perf_counter()
            try:
                result = await vllm.rpc(self._llm, method, *args)
                t2 = time.perf_counter()
                await vllm.recompute_running(self._llm)
                self._version = version
            finally:
                if not was_paused and not self._sleeping:
                    await self._resume()
            t3 = time.perf_counter()
            self.last_swap_s = {"pause": t1 - t0, "load": t2 - t1, "reset_resume": t3 - t2}
            return result

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
