"""The vLLM engine behind the rollout Protocol, on one GPU (``pytest -m gpu`` on the GPU machine).

One engine (enforce_eager, sleep mode on) serves every test of the module, in order: token ids in and
out with log-probs equal to a float32 HF recompute; stop, length and abort endings; pause and resume;
a weight swap inside a sample (both versions, and the tokens after the swap scored by the new
weights); no prefix-cache hash left after a swap; the colocated arena filled over CUDA IPC; sleep
and wake keeping the weights; a swap while 256 requests decode, every token's version checked
against log-probs recomputed under both weight sets; last, a close while 32 requests decode.
"""

from __future__ import annotations

import time

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MAX_LEN = 512


def _peaky_model(path: str, seed: int) -> str:
    """A random Qwen2 (21-token vocab) with embeddings scaled 1.5x: entropy ~2.5 nats, and the
    log-prob of a token differs by ~0.45 between two seeds and by ~1.3 between neighbouring positions,
    so one read at the wrong position or under the wrong weights cannot pass as a match (bf16 vs
    fp32 noise is ~0.01)."""
    from areal_like.core.models import ModelBuildConfig, build_model, load_model

    build_model(
        ModelBuildConfig(
            hidden_size=256,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=512,
            max_position_embeddings=MAX_LEN,
            seed=seed,
        ),
        path,
    )
    model = load_model(path)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1.5)
    model.save_pretrained(path)
    return path


def _bf16_state(path: str) -> dict[str, torch.Tensor]:
    from areal_like.core.models import load_model

    return {k: v.to(torch.bfloat16) for k, v in load_model(path).state_dict().items()}


def _recompute(path: str, prompt: list[int], response: list[int]) -> torch.Tensor:
    """float32 HF log-probs of ``response`` after ``prompt`` at temperature 1."""
    from areal_like.core.models import load_model

    model = load_model(path).cuda()
    ids = torch.tensor([prompt + response], device="cuda")
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(response, device="cuda")[:, None])[:, 0].cpu()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return _peaky_model(str(root / "a"), 0), _peaky_model(str(root / "b"), 1)


@pytest.fixture(scope="module")
def engine(models):
    from rollout.config import VLLMConfig
    from rollout.vllm_engine import VLLMEngine

    config = VLLMConfig(
        enforce_eager=True, gpu_memory_utilization=0.3, max_model_len=MAX_LEN, enable_sleep_mode=True
    )
    eng = VLLMEngine(models[0], config, engine_id=0, version=0, max_batch_size=256, seed=0)
    yield eng
    eng.close()


def _params(n: int, **kw):
    from rollout.engine import SamplingParams

    return SamplingParams(max_new_tokens=n, **kw)


def test_token_ids_in_and_out_with_logprobs_of_the_sampling_distribution(engine, models):
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    outputs = engine.generate(prompts, _params(40), timeout_s=120)
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out.finish_reason == "length" and len(out.response_ids) == 40
        assert out.versions == [0] * 40
        ref = _recompute(models[0], prompt, out.response_ids)
        got = torch.tensor(out.logprobs)
        # bf16 engine vs fp32 reference (see _peaky_model for the margins)
        assert (got - ref).abs().mean() < 0.05, (got[:8], ref[:8])
        assert ref.min() > -20


def test_stop_token_ends_a_request_and_keeps_it(engine):
    # Same request id -> same sampling seed, so the run with a stop token follows the first one.
    first = engine.submit([5, 6, 7], _params(24), request_id="stop-probe").result(timeout_s=60)
    tokens = first.response_ids
    stop_at = next((i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i]), 0)
    params = _params(24, stop_token_ids=(tokens[stop_at],))
    out = engine.submit([5, 6, 7], params, request_id="stop-probe").result(timeout_s=60)
    assert out.finish_reason == "stop"
    assert out.response_ids == tokens[: stop_at + 1]


def test_abort_ends_a_request_with_its_partial_output(engine):
    handle = engine.submit([5, 6, 7], _params(MAX_LEN - 8), stream=True)
    seen = 0
    for chunk in handle.stream(timeout_s=60):
        seen += len(chunk.token_ids)
        if seen >= 5:
            break
    engine.abort([handle.request_id])
    out = handle.result(timeout_s=60)
    assert out.finish_reason == "abort"
    assert 5 <= len(out.response_ids) < MAX_LEN - 8


def test_pause_holds_decoding_and_resume_finishes(engine):
    handle = engine.submit([5, 6, 7], _params(300), stream=True)
    stream = handle.stream(timeout_s=60)
    next(stream)
    engine.pause()
    load = engine.load()
    assert load.running_requests == 0 and load.waiting_requests == 1
    steps = engine.load().decode_steps_total
    time.sleep(1.0)
    assert engine.load().decode_steps_total == steps, "tokens arrived while paused"
    engine.resume()
    out = handle.result(timeout_s=120)
    assert out.finish_reason == "length" and len(out.response_ids) == 300


def test_weight_swap_inside_a_sample_carries_both_versions(engine, models):
    from areal_like.core.digest import state_dict_digest

    prompt = [5, 6, 7, 8]
    handle = engine.submit(prompt, _params(400), stream=True)
    seen = 0
    for chunk in handle.stream(timeout_s=60):
        seen += len(chunk.token_ids)
        if seen >= 20:
            break
    new_state = _bf16_state(models[1])
    engine.update_weights(new_state, version=1, timeout_s=120)
    out = handle.result(timeout_s=120)
    k = out.versions.index(1)
    assert 20 <= k < 400 and out.versions == [0] * k + [1] * (400 - k)
    assert engine.version == 1
    assert engine.weights_digest() == state_dict_digest(new_state)
    # Tokens after the swap were sampled by the new weights over a prefix re-encoded by them.
    ref_new = _recompute(models[1], prompt, out.response_ids)[k:]
    ref_old = _recompute(models[0], prompt, out.response_ids)[k:]
    got = torch.tensor(out.logprobs[k:])
    assert (got - ref_new).abs().mean() < 0.05
    assert (got - ref_old).abs().mean() > 0.2


def test_swap_clears_every_prefix_cache_hash(engine, models):
    """areal_swap resets only the blocks that hold a hash (vLLM's reset visits all blocks): after a
    swap no block may keep a hash, or a new request would reuse KV computed by the old weights."""
    prompts = [[3 + i % 17] * 64 for i in range(32)]  # 4 full 16-token blocks each, hashed
    engine.generate(prompts, _params(8), timeout_s=120)
    before = engine.prefix_cache_blocks()
    assert before["hashed"] >= 32 and before["mapped"] >= 32, before
    engine.update_weights(_bf16_state(models[1]), version=5, timeout_s=120)
    after = engine.prefix_cache_blocks()
    assert after["hashed"] == 0 and after["mapped"] == 0, (before, after)
    assert engine.last_swap_s["reset"] < 0.05, engine.last_swap_s


def test_colocated_arena_written_over_cuda_ipc_then_loaded(engine, models):
    from transformers import AutoConfig

    from areal_like.core.digest import state_dict_digest
    from areal_like.core.models import load_model
    from areal_like.core.realloc import Qwen2Dims, SourceLayout, make_plan, vllm_destination
    from areal_like.core.realloc.ipc import open_ipc_staging
    from areal_like.core.realloc.pack import execute_locally
    from areal_like.core.realloc.sources import flat_sources

    dims = Qwen2Dims.from_config(AutoConfig.from_pretrained(models[0], local_files_only=True))
    plan = make_plan(
        SourceLayout.replicated(dims.specs("bfloat16"), 1),
        vllm_destination(dims, "bfloat16", 1, 1),
        64 << 20,
        hosts=(0,),
    )
    handle = engine.make_arena(plan, 0)
    arena = open_ipc_staging(plan, handle)
    trainer_model = load_model(models[0]).to("cuda", torch.bfloat16)  # the "trainer" holds model a
    execute_locally(plan, {0: flat_sources(trainer_model, 0, 1)}, {0: arena})
    torch.cuda.synchronize()
    engine.load_staged(2)
    engine.resume()
    assert engine.version == 2
    assert engine.weights_digest() == state_dict_digest(_bf16_state(models[0]))
    out = engine.generate([[5, 6, 7]], _params(8), timeout_s=60)[0]
    assert out.versions == [2] * 8


def test_sleep_frees_memory_and_wake_keeps_the_weights(engine):
    digest = engine.weights_digest()
    free_before = torch.cuda.mem_get_info()[0]
    engine.sleep()
    free_asleep = torch.cuda.mem_get_info()[0]
    assert free_asleep > free_before + (256 << 20), (free_before, free_asleep)
    engine.wake(resume=True)
    assert engine.weights_digest() == digest
    out = engine.generate([[5, 6, 7]], _params(8), timeout_s=60)[0]
    assert out.finish_reason == "length" and len(out.response_ids) == 8


def _recompute_many(path: str, pairs: list[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
    """``_recompute`` for many (prompt, response) pairs with one model load."""
    from areal_like.core.models import load_model

    model = load_model(path).cuda()
    out = []
    with torch.no_grad():
        for prompt, response in pairs:
            ids = torch.tensor([prompt + response], device="cuda")
            logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
            target = torch.tensor(response, device="cuda")[:, None]
            out.append(torch.log_softmax(logits, -1).gather(1, target)[:, 0].cpu())
    return out


RESPONSE = 400


def test_every_token_carries_the_version_of_the_weights_that_sampled_it(engine, models):
    """A swap (a -> b) lands while 256 requests decode. The engine core reports how many tokens each
    request had at the swap; each token's label must name the weights whose log-prob it carries."""
    import numpy as np

    engine.update_weights(_bf16_state(models[0]), version=10, timeout_s=120)
    state_b = _bf16_state(models[1])  # ready before the requests: the tiny model decodes fast
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, 20, int(rng.integers(3, 8))).tolist() for _ in range(256)]
    start_steps = engine.load().decode_steps_total
    handles = [engine.submit(p, _params(RESPONSE)) for p in prompts]
    deadline = time.monotonic() + 60
    while engine.load().decode_steps_total < start_steps + 256 * 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    engine.update_weights(state_b, version=11, timeout_s=120)
    swap = dict(engine.last_swap_s)
    outs = [h.result(timeout_s=300) for h in handles]
    cuts = []
    for out in outs:
        k = out.versions.count(10)
        assert out.versions == [10] * k + [11] * (len(out.versions) - k)
        cuts.append(k)
    spanning = sum(0 < k < RESPONSE for k in cuts)
    assert spanning >= 128, f"only {spanning} of 256 samples span the swap (cuts {sorted(cuts)[:10]}...)"
    pairs = [(p, o.response_ids) for p, o in zip(prompts, outs, strict=True)]
    ref_a, ref_b = _recompute_many(models[0], pairs), _recompute_many(models[1], pairs)
    decided = wrong = 0
    for out, a, b, k in zip(outs, ref_a, ref_b, cuts, strict=True):
        got = torch.tensor(out.logprobs)
        clear = (a - b).abs() > 0.3  # tokens the two weight sets score apart (bf16 noise ~0.01)
        labelled_a = torch.arange(len(got)) < k
        nearer_a = (got - a).abs() < (got - b).abs()
        decided += int(clear.sum())
        wrong += int((clear & (nearer_a != labelled_a)).sum())
    assert decided > 5000 and wrong == 0, f"{wrong} of {decided} clearly scored tokens: wrong version"
    assert swap["engine_stopped"] < 1.0 and swap["end_to_end"] >= swap["engine_stopped"], swap


def test_close_under_load_ends_every_request_and_leaves_no_task_running(engine, capfd):
    """Last in the module (it closes the shared engine; the fixture's close is then a no-op)."""
    handles = [engine.submit([3, 4, 5 + i % 9], _params(MAX_LEN - 8), stream=True) for i in range(32)]
    next(iter(handles[0].stream(timeout_s=60)))  # decoding
    llm = engine._llm
    engine.close()
    assert all(h.result(timeout_s=10).finish_reason == "abort" for h in handles)
    assert llm.output_handler.done()
    assert llm.engine_core.resources.output_queue_task.done()
    assert "output_handler failed" not in capfd.readouterr().err
