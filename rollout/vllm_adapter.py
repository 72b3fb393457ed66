"""Every call this project makes into vLLM, in one place (pinned: vLLM 0.25.1).

The next vLLM upgrade touches this file only: ``VLLMEngine`` (rollout/vllm_engine.py), the worker
extension (rollout/vllm_extension.py) and the benchmarks call these functions and never import
``vllm`` themselves. What each call relies on in 0.25.1:
- ``AsyncLLM.from_engine_args(AsyncEngineArgs(...))``: the engine core runs in its own process (the
  model with it, TP 1 = the ``uni`` executor); ``skip_tokenizer_init`` (token ids in and out);
  ``logprobs_mode='processed_logprobs'`` (log-probs of the distribution actually sampled, after
  temperature); ``worker_extension_cls`` mixes our class into vLLM's GPU worker so
  ``collective_rpc('areal_...')`` reaches it; ``enable_sleep_mode`` for colocated placement.
- ``AsyncLLM.generate(TokensPrompt, SamplingParams(output_kind=DELTA, logprobs=0, flat_logprobs=True),
  request_id)``: an async iterator of ``RequestOutput`` whose ``outputs[0]`` holds the new token ids
  and a ``FlatLogprobs`` whose ``token_ids``/``logprobs`` lists hold, with ``logprobs=0``, one entry
  per position: the sampled token and its log-prob (no ``Logprob`` object and dict per token);
  ``finish_reason`` is 'stop', 'length' or 'abort' on the last one. ``skip_clone`` spares the
  deep copy vLLM otherwise makes of every request's parameters: each request gets its own object.
- ``AsyncLLM.from_engine_args(args, usage_context=LLM_CLASS)``: the batch-size defaults of the
  offline ``LLM`` (``max_num_batched_tokens`` 16384 on an H100/H200, 8192 on smaller GPUs, instead of
  2048), read back through ``vllm_config.scheduler_config``.
- ``disable_log_stats=True`` (the offline ``LLM``'s default, not ``AsyncLLM``'s): no per-token
  Prometheus histograms and stats in the client, no per-request events in the engine core; the
  client's CPU bounds decoding with CUDA graphs (docs/benchmarks.md).
- ``stream_interval``: DELTA outputs every that many tokens (and the first and last), which divides
  the client's per-token work (one ``RequestOutput`` and one task wake-up per delta).
- ``engine_core.call_utility_async(name, *args)`` runs ``EngineCore.<name>`` on the engine-core
  thread between steps; a ``Future`` result is awaited there. Our ``areal_swap`` (added to
  ``EngineCore`` by rollout/vllm_extension.py) relies on the scheduler's ``set_pause_state``,
  ``requests`` (internal id -> ``Request.num_output_tokens``; the internal id is ours plus
  ``-<8 characters>``), ``reset_prefix_cache(reset_running_requests=True)`` (preempts the running
  requests so their KV cache is recomputed), ``EngineCoreProc.has_work`` and
  ``_idle_state_callbacks`` (run once the step in flight has been processed); and, to reset only
  the blocks that hold a hash, the scheduler's ``kv_cache_manager.block_pool`` with its
  ``cached_block_hash_to_block._cache`` (hash -> block or {block id: block}),
  ``cached_block_hashes_by_block``, ``KVCacheBlock.reset_hash``, ``metrics_collector`` and
  ``kv_event_queue``. ``areal_hashed_blocks`` (GPU test) reads ``block_pool.blocks``.
- ``pause_generation(mode='keep', clear_cache=False)`` (through ``engine_core.pause_scheduler_async``,
  skipping its fixed 20 ms sleep): requests freeze in place and the call returns once the engine's
  output queue is empty; ``sleep(level)`` / ``wake_up(tags)``; ``abort(ids)`` ends requests with a
  final 'abort' output.
- ``LLM.generate`` (the offline engine) is used only as the benchmark baseline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rollout.config import VLLMConfig
    from rollout.engine import SamplingParams

PINNED_VERSION = "0.25.1"
"""The vLLM release this adapter is written and tested against."""

EXTENSION_CLS = "rollout.vllm_extension.WeightExtension"
"""Qualified name of our worker extension (imported by vLLM inside its worker process)."""


def check_version() -> str:
    """The installed vLLM version; ImportError naming the pin when vLLM is missing or differs."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            f"rollout.engine='vllm' needs vllm=={PINNED_VERSION} (GPU machines only; see "
            "docs/operations.md 'GPU runs'); on CPU use rollout.engine='hf'"
        ) from e
    if vllm.__version__ != PINNED_VERSION and not os.environ.get("AREAL_ALLOW_VLLM_VERSION"):
        raise ImportError(
            f"vllm {vllm.__version__} is installed but rollout/vllm_adapter.py is written against "
            f"{PINNED_VERSION}; install that version, or set AREAL_ALLOW_VLLM_VERSION=1 to try anyway"
        )
    return vllm.__version__


def _prepare_environment() -> None:
    # The worker process must import our extension: make the checkout importable there.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *[p for p in paths if p]])
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    # The caller may hold a CUDA context (tests, colocated checks): a forked engine core could not.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")


def engine_kwargs(model_path: str, config: VLLMConfig, max_num_seqs: int, seed: int) -> dict[str, Any]:
    """Keyword arguments shared by ``AsyncEngineArgs`` and the offline ``LLM`` (benchmarks)."""
    kwargs: dict[str, Any] = dict(
        model=model_path,
        skip_tokenizer_init=True,
        dtype=config.dtype,
        seed=seed,
        gpu_memory_utilization=config.gpu_memory_utilization,
        enforce_eager=config.enforce_eager,
        enable_prefix_caching=config.enable_prefix_caching,
        max_num_seqs=max_num_seqs,
        logprobs_mode="processed_logprobs",
        worker_extension_cls=EXTENSION_CLS,
        enable_sleep_mode=config.enable_sleep_mode,
        tensor_parallel_size=1,
        stream_interval=config.stream_interval,
        disable_log_stats=True,
    )
    if config.max_model_len is not None:
        kwargs["max_model_len"] = config.max_model_len
    if config.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = config.max_num_batched_tokens
    return kwargs


def start_async_llm(model_path: str, config: VLLMConfig, max_num_seqs: int, seed: int) -> Any:
    """An ``AsyncLLM`` for ``model_path`` (call on the event loop thread that will drive it)."""
    check_version()
    _prepare_environment()
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(**engine_kwargs(model_path, config, max_num_seqs, seed))
    # The offline engine's defaults: a rollout is a throughput batch, not a server's latency. In the
    # default (engine) context an unset max_num_batched_tokens is 2048 (16384 offline on an H100/H200):
    # prompts then prefill in 8x more engine steps (docs/benchmarks.md).
    return AsyncLLM.from_engine_args(args, usage_context=UsageContext.LLM_CLASS)


def batch_limits(llm: Any) -> dict[str, int]:
    """The engine's resolved ``max_num_batched_tokens`` and ``max_num_seqs`` (``AsyncLLM`` or ``LLM``)."""
    engine = getattr(llm, "llm_engine", llm)
    scheduler = engine.vllm_config.scheduler_config
    return {
        "max_num_batched_tokens": scheduler.max_num_batched_tokens,
        "max_num_seqs": scheduler.max_num_seqs,
    }


def start_offline_llm(model_path: str, config: VLLMConfig, max_num_seqs: int, seed: int) -> Any:
    """The offline ``vllm.LLM`` with the same settings (benchmark baseline)."""
    check_version()
    _prepare_environment()
    from vllm import LLM

    return LLM(**engine_kwargs(model_path, config, max_num_seqs, seed))


def sampling_params(params: SamplingParams, seed: int | None = None, stream: bool = True) -> Any:
    """Our ``SamplingParams`` as vLLM's: the sampled token's log-prob always, deltas when streaming,
    eos ignored when the request has no stop tokens (forced lengths for benchmarks)."""
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import RequestOutputKind

    stop = list(params.stop_token_ids)
    return VllmSamplingParams(
        max_tokens=params.max_new_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        seed=seed,
        logprobs=0,
        flat_logprobs=True,
        skip_clone=True,
        stop_token_ids=stop or None,
        ignore_eos=not stop,
        detokenize=False,
        output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
    )


def token_prompt(prompt_ids: list[int]) -> Any:
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=list(prompt_ids))


@dataclass
class Delta:
    """What one ``RequestOutput`` added to a request."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None
    """None while the request runs; 'stop', 'length' or 'abort' on its last output."""


def parse_output(output: Any) -> Delta:
    """The new tokens of a ``RequestOutput`` (DELTA kind) with the sampled tokens' log-probs, from
    the flat lists of its ``FlatLogprobs`` (one entry per position with ``logprobs=0``)."""
    completion = output.outputs[0]
    token_ids = list(completion.token_ids)
    positions = completion.logprobs
    if not token_ids:  # e.g. an abort's last output; vLLM then hands over the whole container
        logprobs: list[float] = []
    elif positions is None or positions.token_ids != token_ids:
        found = "none" if positions is None else f"{positions.token_ids[:8]}... ({len(positions.token_ids)})"
        raise RuntimeError(
            f"vLLM returned tokens {token_ids[:8]}... ({len(token_ids)}) but log-probs for {found} "
            f"(request {output.request_id})"
        )
    else:
        logprobs = list(positions.logprobs)
    reason = completion.finish_reason if output.finished else None
    return Delta(token_ids, logprobs, None if reason is None else str(reason))


async def generate(llm: Any, request_id: str, prompt_ids: list[int], params: Any):
    """Async iterator of ``Delta`` for one request."""
    async for output in llm.generate(token_prompt(prompt_ids), params, request_id):
        yield parse_output(output)


async def abort(llm: Any, request_ids: list[str]) -> None:
    await llm.abort(request_ids)


async def pause(llm: Any) -> None:
    """Freeze every request in place (their KV cache kept) until ``resume``; returns once the engine
    core has stopped stepping and sent its last outputs. Calls the engine-core client directly:
    ``AsyncLLM.pause_generation`` adds a fixed 20 ms sleep for output processing, which our engine
    replaces by waiting until delivered tokens are stamped (measured: pause 50-65 ms -> see
    docs/benchmarks.md)."""
    core = getattr(llm, "engine_core", None)
    if core is not None and hasattr(core, "pause_scheduler_async"):
        await core.pause_scheduler_async(mode="keep", clear_cache=False)
    else:
        await llm.pause_generation(mode="keep", clear_cache=False)


async def resume(llm: Any) -> None:
    await llm.resume_generation()


async def swap(llm: Any, method: str, args: list, keep_paused: bool) -> dict:
    """Run ``WeightExtension.<method>(*args)`` at a token boundary in one engine-core utility call
    (``areal_swap`` in rollout/vllm_extension.py): returns the engine's record of it, with
    ``tokens`` = ``{internal request id: output tokens sampled before the load}``."""
    return await llm.engine_core.call_utility_async("areal_swap", method, args, keep_paused)


async def sleep(llm: Any, level: int) -> None:
    """Free the engine's GPU memory (level 1: weights to CPU, KV cache dropped; level 2: both
    dropped); frozen requests stay queued and are recomputed after ``wake``."""
    await llm.sleep(level=level, mode="keep")


async def wake(llm: Any, tags: list[str] | None = None) -> None:
    """Re-allocate what ``sleep`` freed (``tags``: 'weights', 'kv_cache'; None = all)."""
    await llm.wake_up(tags)


async def rpc(llm: Any, method: str, *args: Any, timeout_s: float | None = None) -> Any:
    """Call ``WeightExtension.<method>`` in the engine's worker; returns the (single) worker's result.
    Arguments and results must be plain data (bytes, str, numbers): vLLM's msgpack channel turns
    tensors into nested lists."""
    results = await llm.collective_rpc(method, timeout=timeout_s, args=args)
    return results[0]


async def hashed_blocks(llm: Any) -> dict:
    """``{"hashed": blocks holding a prefix-cache hash, "mapped": hash-map entries, "blocks": all}``
    (``areal_hashed_blocks``: both counts are 0 right after a swap)."""
    return await llm.engine_core.call_utility_async("areal_hashed_blocks")


async def stop_output_handler(llm: Any) -> None:
    """Cancel ``AsyncLLM``'s output-handler task and wait until it has ended. ``AsyncLLM.shutdown``
    stops the engine core first and cancels the handler after, so a handler still reading then
    logs "AsyncLLM output_handler failed ... EngineDeadError" (seen at the close of the 7B swap
    benchmark, whose engine had 32 requests running)."""
    handler = getattr(llm, "output_handler", None)
    if handler is not None and not handler.done():
        handler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await handler


def shutdown(llm: Any) -> None:
    llm.shutdown()


def shutdown_offline(llm: Any) -> None:
    """Stop an offline ``LLM``'s engine-core process so that its GPU memory is freed."""
    llm.llm_engine.engine_core.shutdown()


def offline_generate(llm: Any, prompts: list[list[int]], params: list[Any]) -> list[Delta]:
    """``LLM.generate`` on token ids (FINAL_ONLY params): one Delta with the whole response each."""
    outputs = llm.generate([token_prompt(p) for p in prompts], params, use_tqdm=False)
    return [parse_output(o) for o in outputs]
