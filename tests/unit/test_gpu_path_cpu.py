"""The parts of the GPU path that run anywhere: config checks, forced lengths, the inverse of the
vLLM weight layout (what the engine digest reads), FLOP counting, and clear errors without vLLM."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from areal_like.config import ConfigError, load_config
from rollout.config import VLLMConfig
from rollout.samples import ForcedLengths, forced_length

GPU_RECIPE = "configs/gpu_addition.yaml"


def test_vllm_settings_are_validated():
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        VLLMConfig(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="sleep_level"):
        VLLMConfig(sleep_level=3)
    with pytest.raises(ValueError, match="dtype"):
        VLLMConfig(dtype="int8")
    with pytest.raises(ValueError, match="stream_interval"):
        VLLMConfig(stream_interval=0)


def test_token_versions_follow_the_engine_reported_swap_boundaries():
    from rollout.vllm_engine import token_versions

    # began under version 3; the engine reported 5 tokens at the swap to 4 and 9 at the swap to 6
    swaps = [(5, 4), (9, 6)]
    assert token_versions(3, swaps, 0, 12) == [3] * 5 + [4] * 4 + [6] * 3
    assert token_versions(3, swaps, 4, 3) == [3, 4, 4]  # a delta straddling a boundary
    assert token_versions(3, [(0, 4)], 0, 3) == [4, 4, 4]  # swapped before its first token
    assert token_versions(3, [], 7, 2) == [3, 3]


def test_engine_counts_are_found_under_our_request_ids():
    from rollout.vllm_engine import counts_by_request_id

    counts = counts_by_request_id({"e0-17-1a2b3c4d": 40, "e0-3": 7})
    assert counts["e0-17"] == 40 and counts["e0-17-1a2b3c4d"] == 40
    assert counts["e0-3"] == 7 and "e0" not in counts  # no random suffix: taken as is


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["placement.devices=cpu", "realloc.enabled=false"], "rollout.engine='vllm' needs GPUs"),
        (["rollout.engine=hf", "placement.devices=colocated", "realloc.placement=colocated"], "sleeps"),
        (
            ["placement.devices=colocated", "realloc.placement=colocated", "rollout.num_workers=2"],
            "must equal",
        ),
        (["realloc.backend=gloo"], "realloc.backend='nccl'"),
        (["placement.devices=colocated"], "realloc.placement='colocated'"),
        (["placement.devices=gpu"], "allowed values are 'cpu', 'split', 'colocated'"),
    ],
)
def test_device_placement_errors_name_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(GPU_RECIPE, overrides)


def test_gpu_recipe_loads_for_both_placements():
    split = load_config(GPU_RECIPE)
    assert (split.placement.devices, split.rollout.engine, split.realloc.placement) == (
        "split",
        "vllm",
        "split",
    )
    colocated = load_config(GPU_RECIPE, ["placement.devices=colocated", "realloc.placement=colocated"])
    assert colocated.placement.devices == "colocated"


def test_a_forced_length_median_beyond_the_cap_is_refused_before_the_run_naming_the_fix():
    from areal_like.controller import RLController

    config = load_config(GPU_RECIPE)  # rollout.max_new_tokens=3
    with pytest.raises(ValueError, match=r"ForcedLengths.median=9: .*rollout.max_new_tokens=3"):
        RLController(config, forced_lengths=ForcedLengths(median=9))
    RLController(config, forced_lengths=ForcedLengths(median=3))
    with pytest.raises(ValueError, match="ForcedLengths.sigma=-1"):
        ForcedLengths(median=3, sigma=-1)


def test_forced_lengths_are_fixed_per_sample_and_lognormal():
    lengths = [forced_length(256, 1.0, 2048, g, i) for g in range(500) for i in range(4)]
    assert lengths == [forced_length(256, 1.0, 2048, g, i) for g in range(500) for i in range(4)]
    assert min(lengths) >= 1 and max(lengths) == 2048  # the cap is reached (~2% of samples)
    assert 230 <= np.median(lengths) <= 285
    assert 0.005 < np.mean(np.array(lengths) == 2048) < 0.05
    assert forced_length(256, 0.0, 2048, 3, 1) == 256


def _tiny_plan(tp: int):
    from areal_like.core.realloc import Qwen2Dims, SourceLayout, make_plan, vllm_destination

    dims = Qwen2Dims(
        vocab_size=100, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4, num_kv_heads=2
    )
    specs = dims.specs("float32")
    plan = make_plan(
        SourceLayout.replicated(specs, 1), vllm_destination(dims, "float32", 1, tp), 4096, hosts=(0,) * tp
    )
    return dims, specs, plan


def test_engine_tensors_read_back_as_the_trainer_tensors():
    from areal_like.core.realloc.pack import (
        FlatSource,
        allocate_staging,
        execute_locally,
        logical_from_engine,
    )

    dims, specs, plan = _tiny_plan(tp=1)
    gen = torch.Generator().manual_seed(0)
    weights = {s.name: torch.randn(s.shape, generator=gen) for s in specs}
    staging = allocate_staging(plan, 0)
    execute_locally(plan, {0: {n: FlatSource(t.flatten(), 0) for n, t in weights.items()}}, {0: staging})
    assert "model.layers.0.self_attn.qkv_proj.weight" in staging  # vLLM's fused names and shapes
    assert staging["model.embed_tokens.weight"].shape == (128, 16)  # vocab padded to 64
    back = logical_from_engine(plan.dest.ranks[0], staging, specs, dims.tied_aliases)
    assert set(back) == set(weights) | {"lm_head.weight"}
    for name, tensor in weights.items():
        assert torch.equal(back[name], tensor), name
    assert back["lm_head.weight"] is back["model.embed_tokens.weight"]


def test_a_tensor_parallel_rank_cannot_pass_for_the_whole_model():
    from areal_like.core.realloc.pack import allocate_staging, logical_from_engine

    _, specs, plan = _tiny_plan(tp=2)
    with pytest.raises(ValueError, match="not covered exactly once"):
        logical_from_engine(plan.dest.ranks[0], allocate_staging(plan, 0), specs)


def test_useful_flops_count_matmuls_and_causal_attention():
    from types import SimpleNamespace

    from benchmarks.trainer import useful_flops

    cfg = SimpleNamespace(
        hidden_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=16, vocab_size=10, head_dim=None,
    )  # fmt: skip
    # per layer: q 8x8 + k,v 2x(8x4) + o 8x8 + mlp 3x(8x16) = 64+64+64+384 = 576; x2 layers + head 80 = 1232
    assert useful_flops(cfg, [3, 5]) == 6 * 1232 * 8 + 6 * 2 * 8 * (9 + 25)


def test_sharing_cpu_tensors_over_cuda_ipc_is_refused():
    from areal_like.core.realloc.ipc import share_tensors

    with pytest.raises(ValueError, match="only CUDA tensors"):
        share_tensors({"w": torch.zeros(2)})


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_engine_without_vllm_says_what_to_do():
    from rollout.vllm_adapter import check_version

    with pytest.raises(ImportError, match=r"vllm==0\.25\.1.*rollout.engine='hf'"):
        check_version()


def test_vllm_engine_needs_a_model_directory():
    from rollout.engine import EngineConfig, make_engine

    with pytest.raises(ValueError, match="model_path"):
        make_engine(EngineConfig(type="vllm"))


def test_each_engine_kind_names_the_layout_and_dtype_the_plan_writes_into():
    from areal_like.core.realloc import Qwen2Dims
    from rollout.engine import plan_destination

    dims = Qwen2Dims(
        vocab_size=100, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1
    )
    vllm = load_config(GPU_RECIPE, ["rollout.vllm.dtype=float16"]).rollout.engine_config()
    hf = load_config(GPU_RECIPE, ["rollout.engine=hf", "placement.devices=split"]).rollout.engine_config()
    assert (vllm.weights_dtype, hf.weights_dtype) == ("float16", "float32")
    for engine, naming, fused in ((vllm, "vllm", True), (hf, "hf", False)):
        layout = plan_destination(engine, dims, 2)
        names = {t.name for t in layout.ranks[0]}
        assert layout.naming == naming and layout.num_ranks == 2
        assert ("model.layers.0.self_attn.qkv_proj.weight" in names) == fused
        assert {t.dtype for t in layout.ranks[1]} == {engine.weights_dtype}


def _request_output(token_ids, logprobs, finished=False):
    from types import SimpleNamespace

    completion = SimpleNamespace(token_ids=token_ids, logprobs=logprobs, finish_reason="length")
    return SimpleNamespace(outputs=[completion], finished=finished, request_id="r-1")


def test_output_log_probs_are_read_from_vllm_flat_lists_and_must_be_the_returned_tokens():
    """``parse_output`` takes the sampled tokens' log-probs from the ``FlatLogprobs`` our params ask
    for (one entry per position) and refuses log-probs that are not those of the returned tokens."""
    from types import SimpleNamespace

    from rollout.vllm_adapter import parse_output

    flat = SimpleNamespace(token_ids=[7, 3, 9], logprobs=[-0.5, -1.25, -2.0])
    delta = parse_output(_request_output([7, 3, 9], flat, finished=True))
    assert (delta.token_ids, delta.logprobs, delta.finish_reason) == (
        [7, 3, 9],
        [-0.5, -1.25, -2.0],
        "length",
    )
    delta = parse_output(_request_output([7, 3, 9], flat))
    assert delta.finish_reason is None

    # An output without new tokens (an abort's last one): vLLM slices ``logprobs[-0:]``, the whole container.
    delta = parse_output(_request_output([], flat, finished=True))
    assert (delta.token_ids, delta.logprobs, delta.finish_reason) == ([], [], "length")

    with pytest.raises(RuntimeError, match="log-probs for"):  # a top-k entry per position too many
        parse_output(_request_output([7, 3], SimpleNamespace(token_ids=[7, 1, 3, 1], logprobs=[0.0] * 4)))
    with pytest.raises(RuntimeError, match="log-probs for none"):
        parse_output(_request_output([7, 3], None))


def test_batch_limits_are_read_from_the_async_and_the_offline_engine_alike():
    from types import SimpleNamespace

    from rollout.vllm_adapter import batch_limits

    config = SimpleNamespace(
        scheduler_config=SimpleNamespace(max_num_batched_tokens=16384, max_num_seqs=1024)
    )
    expected = {"max_num_batched_tokens": 16384, "max_num_seqs": 1024}
    assert batch_limits(SimpleNamespace(vllm_config=config)) == expected  # AsyncLLM
    assert batch_limits(SimpleNamespace(llm_engine=SimpleNamespace(vllm_config=config))) == expected  # LLM


class _ClosingAsyncLLM:
    """What ``VLLMEngine.close`` meets in vLLM 0.25.1's ``AsyncLLM``: an output-handler task reading
    the engine core, and a ``shutdown`` that stops the engine core and then cancels its
    socket-reading task on the client's loop from the calling thread (``call_soon_threadsafe``)."""

    def __init__(self) -> None:
        import asyncio

        self.output_handler = asyncio.get_running_loop().create_task(asyncio.Event().wait())
        self.socket_task = asyncio.get_running_loop().create_task(asyncio.Event().wait())
        self.handler_done_at_shutdown: bool | None = None

    def shutdown(self) -> None:
        self.handler_done_at_shutdown = self.output_handler.done()
        self.socket_task.get_loop().call_soon_threadsafe(self.socket_task.cancel)


def test_close_stops_the_output_handler_before_the_engine_core_and_lets_cancelled_tasks_end(monkeypatch):
    from rollout import vllm_adapter
    from rollout.vllm_engine import VLLMEngine

    async def start(*_):
        return _ClosingAsyncLLM()

    monkeypatch.setattr(VLLMEngine, "_start", lambda self, *a: start())
    monkeypatch.setattr(vllm_adapter, "batch_limits", lambda llm: {})
    monkeypatch.setattr(VLLMEngine, "_warm_up", lambda self: None)
    engine = VLLMEngine("/nonexistent", VLLMConfig())
    llm = engine._llm
    engine.close()
    # Otherwise the handler, still reading a stopped engine core, logs EngineDeadError ...
    assert llm.handler_done_at_shutdown is True
    # ... and the socket task, cancelled but never run again, is "destroyed but pending" at exit.
    assert llm.socket_task.cancelled()
    assert not engine._thread.is_alive()
