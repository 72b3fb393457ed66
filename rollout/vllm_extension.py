"""Our methods inside vLLM's GPU worker (``worker_extension_cls``): how new weights get in.

vLLM mixes ``WeightExtension`` into its worker class in the engine-core process, which holds the
model; ``VLLMEngine`` reaches these methods through ``collective_rpc`` (rollout/vllm_adapter.py).
Arguments and results are plain data (pickled bytes, ints, str): vLLM's channel turns tensors into
lists, so tensors themselves travel over CUDA IPC or NCCL.

Three ways in:
- ``areal_load_shared(blob)``: the object-store path. The rollout actor puts the HF state dict on
  the same GPU and shares it by CUDA IPC; we open it and call vLLM's own ``model.load_weights``
  (which fuses q/k/v and gate/up itself).
- ``areal_join(blob)`` + ``areal_receive(version)``: split placement. This process is a member of
  the reallocation plan's NCCL group; trainer ranks broadcast bf16 buckets straight into staging
  tensors laid out as vLLM's parameters (``vllm_destination``), then one fused copy loads them.
- ``areal_make_arena(blob)`` + ``areal_load_staged()``: colocated placement. The staging is a
  persistent arena shared by CUDA IPC with the trainer rank on this GPU, which writes into it; we
  copy it into the parameters when told.
Every load runs inside ``areal_swap``, a utility method this module adds to vLLM's ``EngineCore``
(the process that also holds the worker when TP is 1): one call from the client stops scheduling,
waits for the step in flight, records how many tokens each request has (so the client knows which
weights sampled every token, with no timing assumption), loads, preempts the running requests so
their KV cache is recomputed by the new weights, and lets scheduling go on.
"""

from __future__ import annotations

import pickle
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch


class WeightExtension:
    """Mixed into vLLM's worker: ``self.get_model()`` and ``self.vllm_config`` come from there."""

    if TYPE_CHECKING:  # provided by vLLM's worker class this is mixed into
        vllm_config: Any

        def get_model(self) -> Any: ...

    # ---- object-store path --------------------------------------------------------------------------
    def areal_load_shared(self, blob: bytes) -> int:
        """Load HF-named tensors shared by CUDA IPC (``share_tensors``); returns how many."""
        from areal_like.core.realloc.ipc import open_shared_tensors

        tensors = open_shared_tensors(pickle.loads(blob))
        self.get_model().load_weights(iter(tensors.items()))
        torch.cuda.synchronize()
        return len(tensors)

    # ---- reallocation plan ------------------------------------------------------------------------
    def areal_join(self, blob: bytes) -> int:
        """Join the plan's group as ``member`` hosting ``engine_rank``; staging allocated once.
        ``blob``: pickled (plan, ReallocConfig, master_addr, master_port, member, engine_rank)."""
        from areal_like.core.realloc.executor import ReallocExecutor
        from areal_like.core.realloc.pack import allocate_staging

        plan, config, addr, port, member, engine_rank = pickle.loads(blob)
        self._areal_check_names(plan, engine_rank)
        previous = getattr(self, "_areal_executor", None)
        self._areal_executor = ReallocExecutor.rejoin(previous, plan, member, config, addr, port)
        self._areal_rank = engine_rank
        self._areal_staging = allocate_staging(
            plan, engine_rank, torch.device("cuda", torch.cuda.current_device())
        )
        return sum(t.numel() * t.element_size() for t in self._areal_staging.values())

    def areal_receive(self, version: int) -> dict:
        """Receive ``version``'s buckets into the staging (all-or-nothing), then load them."""
        from dataclasses import asdict

        stats = self._areal_executor.run(version, staging={self._areal_rank: self._areal_staging})
        self.areal_load_staged()
        return asdict(stats)

    def areal_make_arena(self, blob: bytes) -> bytes:
        """Colocated: allocate ``engine_rank``'s staging arena and return its pickled ``IpcHandle``
        for the trainer rank on this GPU. ``blob``: pickled (plan, engine_rank)."""
        from areal_like.core.realloc.ipc import IpcArena

        plan, engine_rank = pickle.loads(blob)
        self._areal_check_names(plan, engine_rank)
        self._areal_arena = IpcArena(plan, engine_rank, torch.device("cuda", torch.cuda.current_device()))
        self._areal_staging = self._areal_arena.views
        return pickle.dumps(self._areal_arena.handle())

    def areal_load_staged(self) -> int:
        """Copy the staging tensors into the model's parameters (one fused copy)."""
        params = dict(self.get_model().named_parameters())
        names = list(self._areal_staging)
        torch._foreach_copy_([params[n].data for n in names], [self._areal_staging[n] for n in names])
        torch.cuda.synchronize()
        return len(names)

    # ---- checks -----------------------------------------------------------------------------------
    def areal_digest(self) -> str:
        """sha256 of the weights as HF-named fp32 tensors (comparable with the trainer's digest)."""
        from areal_like.core.digest import state_dict_digest
        from areal_like.core.realloc.pack import logical_from_engine
        from areal_like.core.realloc.qwen2 import Qwen2Dims, vllm_destination

        dims = Qwen2Dims.from_config(self.vllm_config.model_config.hf_config)
        dtype = str(next(self.get_model().parameters()).dtype).removeprefix("torch.")
        layout = vllm_destination(dims, dtype, 1, 1)
        params = {n: p.data for n, p in self.get_model().named_parameters()}
        logical = logical_from_engine(layout.ranks[0], params, dims.specs(dtype), dims.tied_aliases)
        return state_dict_digest(logical)

    def _areal_check_names(self, plan, engine_rank: int) -> None:
        params = dict(self.get_model().named_parameters())
        for t in plan.dest.ranks[engine_rank]:
            if t.alias_of is not None:
                continue
            p = params.get(t.name)
            if p is None or tuple(p.shape) != tuple(t.shape):
                raise ValueError(
                    f"realloc plan tensor {t.name} {tuple(t.shape)} does not match vLLM's parameter "
                    f"({None if p is None else tuple(p.shape)}); the plan must use vllm_destination "
                    f"for this model (vLLM has {len(params)} parameters, e.g. {list(params)[:3]})"
                )


# ---- inside vLLM's engine core ------------------------------------------------------------------------
def areal_swap(core: Any, method: str, args: list, keep_paused: bool) -> Future:
    """``EngineCore.areal_swap``: run ``WeightExtension.<method>(*args)`` at a token boundary.

    Runs on the engine core's thread between steps (a utility call). Scheduling stops; once the
    step in flight has been processed (the core is idle), we record every unfinished request's
    output-token count, load, preempt the running requests (their KV cache was computed by the old
    weights) and, unless ``keep_paused`` or the scheduler was already paused, let scheduling go on.
    The returned future resolves to ``{"tokens": {request_id: count}, "result": ..., "stopped_s":
    ..., "drain_s": ..., "load_s": ..., "reset_s": ...}``; ``stopped_s`` is how long the engine did
    not step (drain excluded: the step in flight still samples with the old weights)."""
    from vllm.v1.core.sched.interface import PauseState
    from vllm.v1.engine import EngineCoreRequestType

    scheduler = core.scheduler
    was_paused = scheduler.pause_state != PauseState.UNPAUSED
    scheduler.set_pause_state(PauseState.PAUSED_ALL)
    asked = time.perf_counter()
    future: Future = Future()

    def at_idle(engine: Any, future: Future = future) -> None:
        try:
            t0 = time.perf_counter()
            tokens = {
                rid: request.num_output_tokens
                for rid, request in engine.scheduler.requests.items()
                if request.num_output_tokens > 0
            }
            result = engine.collective_rpc(method, args=tuple(args))[0]
            t1 = time.perf_counter()
            _reset_only_hashed_blocks(engine.scheduler.kv_cache_manager.block_pool)
            engine.reset_prefix_cache(reset_running_requests=True)
            t2 = time.perf_counter()
            if not (keep_paused or was_paused):
                engine.scheduler.set_pause_state(PauseState.UNPAUSED)
                # An idle core blocks on its input queue: wake it so that it sees the work again.
                engine.input_queue.put_nowait((EngineCoreRequestType.WAKEUP, None))
            future.set_result(
                dict(tokens=tokens, result=result, stopped_s=t2 - t0, drain_s=t0 - asked, load_s=t1 - t0,
                     reset_s=t2 - t1)
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001 - the utility output carries it to the client
            future.set_exception(e)

    if core.has_work():
        core._idle_state_callbacks.append(at_idle)
    else:
        at_idle(core)
    return future


def _reset_only_hashed_blocks(pool: Any) -> None:
    """Make this ``BlockPool``'s ``reset_prefix_cache`` visit only the blocks that hold a hash.

    vLLM 0.25's version clears every block's hash, O(all KV blocks): 8 ms of a 12.5 ms swap at 1.5B
    on an H200 (~180k blocks), while a swap leaves hashes on the few thousand blocks the running
    requests filled. Every hashed block is a value of ``cached_block_hash_to_block`` (a block gets
    its primary hash only with its insertion there; extra hashes live in
    ``cached_block_hashes_by_block``), so clearing those blocks and both maps is the same reset.
    Installed once per pool, as an instance attribute; the same preconditions and events as vLLM's."""
    if getattr(pool, "_areal_fast_reset", False):
        return
    from vllm.v1.core.block_pool import BlockHashToBlockMap

    def reset_prefix_cache() -> bool:
        if pool.num_gpu_blocks - pool.get_num_free_blocks() != 1:  # the null block is always used
            return type(pool).reset_prefix_cache(pool)  # vLLM's own refusal and warning
        for entry in pool.cached_block_hash_to_block._cache.values():
            for block in entry.values() if isinstance(entry, dict) else (entry,):
                block.reset_hash()
        pool.cached_block_hash_to_block = BlockHashToBlockMap()
        pool.cached_block_hashes_by_block.clear()
        if pool.metrics_collector:
            pool.metrics_collector.reset()
        if pool.enable_kv_cache_events:
            from vllm.distributed.kv_events import AllBlocksCleared

            pool.kv_event_queue.append(AllBlocksCleared())
        return True

    pool.reset_prefix_cache = reset_prefix_cache
    pool._areal_fast_reset = True


def areal_hashed_blocks(core: Any) -> dict:
    """``EngineCore.areal_hashed_blocks``: blocks that still hold a prefix-cache hash, and the size of
    the hash map (both 0 right after a swap; the GPU test reads them)."""
    pool = core.scheduler.kv_cache_manager.block_pool
    return dict(
        hashed=sum(1 for b in pool.blocks if b.block_hash is not None),
        mapped=len(pool.cached_block_hash_to_block),
        blocks=len(pool.blocks),
    )


def _install_engine_core_utility() -> None:
    """Add ``areal_swap`` to vLLM's ``EngineCore`` class (imported in the engine-core process
    when vLLM builds its worker with our extension)."""
    try:
        from vllm.v1.engine.core import EngineCore
    except ImportError:  # CPU machines: no vLLM, nothing to install
        return
    if not hasattr(EngineCore, "areal_swap"):
        EngineCore.areal_swap = areal_swap
        EngineCore.areal_hashed_blocks = areal_hashed_blocks


_install_engine_core_utility()
