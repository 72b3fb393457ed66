"""HFEngine: exact decoding, exact behaviour log-probs, stop rules, seeding, interruptible weight updates."""

from __future__ import annotations

import threading

import pytest
import torch
import transformers

from rollout.engine import EngineConfig, EngineLoad, SamplingParams, make_engine
from rollout.hf_engine import HFEngine

torch.set_num_threads(1)

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15]]


def tiny_model(seed: int = 0) -> transformers.Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=20,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    return transformers.Qwen2ForCausalLM(config).eval()


@torch.no_grad()
def greedy_by_full_recompute(model, prompt: list[int], num_tokens: int) -> list[int]:
    """Reference decoder: no cache, no padding, one full forward pass per token."""
    ids = list(prompt)
    for _ in range(num_tokens):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@torch.no_grad()
def logprobs_by_full_forward(
    model, prompt: list[int], response: list[int], temperature: float
) -> torch.Tensor:
    logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1]
    return (
        torch.log_softmax(logits / temperature, dim=-1).gather(-1, torch.tensor(response)[:, None]).squeeze(1)
    )


def wait_until_update_posted(engine: HFEngine) -> None:
    # update_weights notifies the engine's condition after posting; waiting on it is deterministic.
    with engine._cond:
        assert engine._cond.wait_for(lambda: engine._pending is not None, timeout=10)


def test_greedy_generation_equals_full_recompute_for_prompts_of_different_lengths():
    model = tiny_model()
    engine = HFEngine(model)
    outputs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=0.0))
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        assert output.response_ids == greedy_by_full_recompute(model, prompt, 12)
        assert output.finish_reason == "length"
        assert output.versions == [0] * 12


def test_chunked_batches_give_the_same_greedy_outputs_as_one_batch():
    engine = HFEngine(tiny_model(), max_batch_size=3)
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    chunked = engine.generate(PROMPTS * 2, params)
    whole = HFEngine(tiny_model()).generate(PROMPTS * 2, params)
    assert [out.response_ids for out in chunked] == [out.response_ids for out in whole]


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.8)])
def test_sampled_logprobs_equal_log_softmax_of_a_full_forward_pass(temperature, top_p):
    model = tiny_model()
    # Stop tokens end rows at different steps, so the batch shrinks while decoding.
    params = SamplingParams(max_new_tokens=16, temperature=temperature, top_p=top_p, stop_token_ids=(3, 7))
    outputs = HFEngine(model, seed=1).generate(PROMPTS * 4, params)
    assert len({len(out.response_ids) for out in outputs}) > 1
    for prompt, output in zip(PROMPTS * 4, outputs, strict=True):
        expected = logprobs_by_full_forward(model, prompt, output.response_ids, temperature)
        torch.testing.assert_close(torch.tensor(output.logprobs), expected, atol=1e-4, rtol=0)


def test_stop_token_ends_a_row_with_stop_and_keeps_the_eos_while_others_run_to_length():
    model = tiny_model()
    greedy = HFEngine(model).generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=0.0))
    eos = greedy[0].response_ids[2]
    first_eos = greedy[0].response_ids.index(eos)
    outputs = HFEngine(model).generate(
        PROMPTS, SamplingParams(max_new_tokens=10, temperature=0.0, stop_token_ids=(eos,))
    )
    assert outputs[0].response_ids == greedy[0].response_ids[: first_eos + 1]
    assert outputs[0].finish_reason == "stop"
    assert len(outputs[0].logprobs) == len(outputs[0].versions) == first_eos + 1
    for plain, stopped in zip(greedy, outputs, strict=True):
        if eos not in plain.response_ids:
            assert stopped.response_ids == plain.response_ids
            assert stopped.finish_reason == "length"


def test_same_seed_gives_same_samples_and_another_seed_differs():
    params = SamplingParams(max_new_tokens=16, temperature=1.0)
    first = HFEngine(tiny_model(), seed=7).generate(PROMPTS, params)
    second = HFEngine(tiny_model(), seed=7).generate(PROMPTS, params)
    other = HFEngine(tiny_model(), seed=8).generate(PROMPTS, params)
    assert [out.response_ids for out in first] == [out.response_ids for out in second]
    assert [out.response_ids for out in first] != [out.response_ids for out in other]


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_samples_do_not_depend_on_how_requests_were_batched(top_p):
    params = [SamplingParams(max_new_tokens=n, temperature=1.0, top_p=top_p) for n in (12, 3, 7, 9)]
    together = HFEngine(tiny_model(), seed=5).generate(PROMPTS, params)
    one_at_a_time = HFEngine(tiny_model(), seed=5, max_batch_size=1).generate(PROMPTS, params)
    two_rows = HFEngine(tiny_model(), seed=5, max_batch_size=2).generate(PROMPTS, params)
    assert [o.response_ids for o in together] == [o.response_ids for o in one_at_a_time]
    assert [o.response_ids for o in together] == [o.response_ids for o in two_rows]
    for a, b in zip(together, one_at_a_time, strict=True):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def test_weight_update_mid_generation_splits_versions_and_continues_the_prefix_with_new_weights():
    old_model, new_model = tiny_model(seed=0), tiny_model(seed=1)
    engine = HFEngine(tiny_model(seed=0), version=3)
    swap_at, max_new = 4, 10
    updater = threading.Thread(target=engine.update_weights, args=(new_model.state_dict(), 4))

    def on_step(num_generated: int) -> None:
        if num_generated == swap_at:
            updater.start()
            wait_until_update_posted(engine)

    engine._on_step = on_step
    outputs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=max_new, temperature=0.0))
    updater.join(timeout=10)

    assert engine.version == 4
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        assert output.versions == [3] * swap_at + [4] * (max_new - swap_at)
        prefix = output.response_ids[:swap_at]
        assert prefix == greedy_by_full_recompute(old_model, prompt, swap_at)
        assert output.response_ids[swap_at:] == greedy_by_full_recompute(
            new_model, prompt + prefix, max_new - swap_at
        )
        new_logprobs = logprobs_by_full_forward(
            new_model, prompt + prefix, output.response_ids[swap_at:], 1.0
        )
        torch.testing.assert_close(torch.tensor(output.logprobs[swap_at:]), new_logprobs, atol=1e-4, rtol=0)


def test_weight_update_between_generations_applies_at_once():
    engine = HFEngine(tiny_model(seed=0))
    engine.update_weights(tiny_model(seed=1).state_dict(), version=1)
    outputs = engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=5, temperature=0.0))
    assert engine.version == 1
    assert outputs[0].versions == [1] * 5
    assert outputs[0].response_ids == greedy_by_full_recompute(tiny_model(seed=1), PROMPTS[0], 5)


@pytest.mark.parametrize("breakage", ["missing", "unexpected", "shape"])
def test_bad_state_dict_raises_and_leaves_weights_and_version_unchanged(breakage):
    engine = HFEngine(tiny_model(seed=0), engine_id=2, version=5)
    before = {name: tensor.clone() for name, tensor in engine.model.state_dict().items()}
    state_dict = dict(tiny_model(seed=1).state_dict())
    if breakage == "missing":
        del state_dict["lm_head.weight"]
    elif breakage == "unexpected":
        state_dict["extra.weight"] = torch.zeros(3)
    else:
        state_dict["model.norm.weight"] = torch.zeros(65)
    with pytest.raises(ValueError, match=rf"engine 2: .*{breakage}.*unchanged"):
        engine.update_weights(state_dict, version=6)
    assert engine.version == 5
    for name, tensor in engine.model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_update_not_taken_within_timeout_raises_and_is_withdrawn():
    engine = HFEngine(tiny_model(seed=0), engine_id=1)
    errors: list[Exception] = []

    def on_step(num_generated: int) -> None:
        if num_generated == 2:  # the decode loop is busy here, so it cannot take the update
            try:
                engine.update_weights(tiny_model(seed=1).state_dict(), version=1, timeout_s=0.05)
            except TimeoutError as error:
                errors.append(error)

    engine._on_step = on_step
    outputs = engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=4, temperature=0.0))
    assert len(errors) == 1 and "engine 1" in str(errors[0]) and "version 1" in str(errors[0])
    assert engine.version == 0 and outputs[0].versions == [0] * 4


def test_load_counts_running_and_waiting_requests_and_tokens_while_generating():
    engine = HFEngine(tiny_model(), max_batch_size=3)
    seen: list[EngineLoad] = []
    engine._on_step = lambda num_generated: seen.append(engine.load()) if num_generated == 1 else None
    engine.generate(PROMPTS, SamplingParams(max_new_tokens=3, temperature=0.0))
    in_batch = PROMPTS[:3]
    # After the first token: 3 rows decode, the 4th waits for a free row.
    assert seen[0] == EngineLoad(
        running_requests=3,
        waiting_requests=1,
        tokens_in_flight=sum(len(p) for p in in_batch) + len(in_batch),
        decode_steps_total=1,
    )
    final = engine.load()
    assert (final.running_requests, final.waiting_requests, final.tokens_in_flight) == (0, 0, 0)


def test_make_engine_builds_the_hf_engine_from_a_local_checkpoint_and_rejects_unknown_types(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    engine = make_engine(EngineConfig(type="hf", model_path=str(tmp_path)), engine_id=5, version=2)
    assert isinstance(engine, HFEngine) and engine.engine_id == 5 and engine.version == 2
    params = SamplingParams(max_new_tokens=4, temperature=0.0)
    loaded, original = engine.generate(PROMPTS, params), HFEngine(model).generate(PROMPTS, params)
    assert [out.response_ids for out in loaded] == [out.response_ids for out in original]
    with pytest.raises(ValueError, match="EngineConfig.type='vllm2'"):
        EngineConfig(type="vllm2")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
    ],
)
def test_sampling_params_reject_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}="):
        SamplingParams(**{"max_new_tokens": 4, **kwargs})


# ---- continuous batching ----------------------------------------------------------------------------


def test_each_request_gets_its_own_max_new_tokens_and_matches_full_recompute():
    model = tiny_model()
    budgets = [1, 9, 3, 14]
    params = [SamplingParams(max_new_tokens=n, temperature=0.0) for n in budgets]
    outputs = HFEngine(model).generate(PROMPTS, params)
    for prompt, budget, output in zip(PROMPTS, budgets, outputs, strict=True):
        assert output.response_ids == greedy_by_full_recompute(model, prompt, budget)
        assert len(output.logprobs) == len(output.versions) == budget


def test_a_request_submitted_mid_generation_joins_between_decode_steps_and_decodes_exactly():
    model = tiny_model()
    engine = HFEngine(model)
    joined: list = []
    steps_at_join: list[int] = []

    def on_step(num_generated: int) -> None:
        if num_generated == 5 and not joined:  # the long request is running: join it
            steps_at_join.append(engine.load().decode_steps_total)
            joined.append(engine.submit(PROMPTS[1], SamplingParams(max_new_tokens=4, temperature=0.0)))

    engine._on_step = on_step
    long = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=20, temperature=0.0))
    long_out = long.result(timeout_s=30)
    short_out = joined[0].result(timeout_s=30)
    assert long_out.response_ids == greedy_by_full_recompute(model, PROMPTS[0], 20)
    assert short_out.response_ids == greedy_by_full_recompute(model, PROMPTS[1], 4)
    # The newcomer was prefilled in the step right after it arrived and left while the long one ran.
    assert joined[0].finished_at < long.finished_at
    assert engine.load().decode_steps_total == 20  # one forward per token of the long request


def test_short_requests_finish_and_leave_while_a_long_one_keeps_decoding():
    engine = HFEngine(tiny_model(), max_batch_size=2)
    engine.pause()  # queue everything first, so the schedule does not depend on thread timing
    long = engine.submit(PROMPTS[1], SamplingParams(max_new_tokens=40, temperature=1.0))
    shorts = [
        engine.submit(PROMPTS[i % 4], SamplingParams(max_new_tokens=2, temperature=1.0)) for i in range(6)
    ]
    engine.resume()
    outputs = [h.result(timeout_s=30) for h in shorts]
    assert not long.done()  # six short requests went through the second row while the long one ran
    assert all(len(o.response_ids) == 2 for o in outputs)
    assert len(long.result(timeout_s=30).response_ids) == 40


def test_streamed_chunks_add_up_to_the_final_output():
    engine = HFEngine(tiny_model(), seed=3)
    handle = engine.submit(PROMPTS[2], SamplingParams(max_new_tokens=7), stream=True)
    chunks = list(handle.stream(timeout_s=30))
    output = handle.result(timeout_s=1)
    assert [t for c in chunks for t in c.token_ids] == output.response_ids
    assert [x for c in chunks for x in c.logprobs] == output.logprobs
    assert [v for c in chunks for v in c.versions] == output.versions == [0] * 7


def test_abort_ends_running_and_waiting_requests_with_their_partial_output():
    model = tiny_model()
    engine = HFEngine(model, max_batch_size=2)
    handles: list = []

    def on_step(num_generated: int) -> None:
        if num_generated == 3:
            engine.abort([handles[0].request_id, handles[2].request_id, "no-such-request"])

    engine._on_step = on_step
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    handles.extend(engine.submit(p, params) for p in PROMPTS[:3])  # the third waits for a free row
    running, other, waiting = (h.result(timeout_s=30) for h in handles)
    assert running.finish_reason == "abort"
    assert running.response_ids == greedy_by_full_recompute(model, PROMPTS[0], 3)
    assert len(running.logprobs) == len(running.versions) == 3
    assert waiting.finish_reason == "abort" and waiting.response_ids == []
    assert other.finish_reason == "length" and other.response_ids == greedy_by_full_recompute(
        model, PROMPTS[1], 8
    )


def test_pause_holds_decoding_and_resume_continues_under_weights_loaded_while_paused():
    old_model, new_model = tiny_model(seed=0), tiny_model(seed=1)
    engine = HFEngine(tiny_model(seed=0), version=0)
    paused = threading.Event()

    def on_step(num_generated: int) -> None:
        if num_generated == 2 and not paused.is_set():
            paused.set()
            threading.Thread(target=engine.pause).start()

    engine._on_step = on_step
    handle = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=6, temperature=0.0))
    assert paused.wait(10)
    with engine._cond:
        assert engine._cond.wait_for(lambda: engine._parked, timeout=10)
    steps = engine.load().decode_steps_total
    engine.update_weights(new_model.state_dict(), version=1, timeout_s=10)  # applied while parked
    assert engine.load().decode_steps_total == steps and not handle.done()
    engine.resume()
    output = handle.result(timeout_s=30)
    prefix = greedy_by_full_recompute(old_model, PROMPTS[0], 2)
    assert output.versions == [0, 0, 1, 1, 1, 1]
    assert output.response_ids == prefix + greedy_by_full_recompute(new_model, PROMPTS[0] + prefix, 4)


def test_a_sample_spanning_two_updates_carries_three_versions_on_the_right_tokens():
    models = [tiny_model(seed=s) for s in range(3)]
    engine = HFEngine(tiny_model(seed=0))
    swaps = {3: 1, 5: 2}  # after token 3 -> v1, after token 5 -> v2

    def on_step(num_generated: int) -> None:
        if num_generated in swaps and engine.version < swaps[num_generated]:
            version = swaps.pop(num_generated)
            updater = threading.Thread(
                target=engine.update_weights, args=(models[version].state_dict(), version)
            )
            updater.start()
            wait_until_update_posted(engine)

    engine._on_step = on_step
    [output] = engine.generate([PROMPTS[3]], SamplingParams(max_new_tokens=8, temperature=0.0))
    assert output.versions == [0, 0, 0, 1, 1, 2, 2, 2]
    expected = greedy_by_full_recompute(models[0], PROMPTS[3], 3)
    expected += greedy_by_full_recompute(models[1], PROMPTS[3] + expected, 2)
    expected += greedy_by_full_recompute(models[2], PROMPTS[3] + expected, 3)
    assert output.response_ids == expected


def test_the_engine_thread_exits_when_idle_and_close_refuses_new_requests():
    engine = HFEngine(tiny_model())
    engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2))
    with engine._cond:
        assert engine._cond.wait_for(lambda: engine._thread is None, timeout=10)
    engine.close()
    with pytest.raises(RuntimeError, match="after close"):
        engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=2))


def test_a_failing_forward_fails_every_request_and_later_submits_loudly():
    engine = HFEngine(tiny_model(), engine_id=4)

    def on_step(num_generated: int) -> None:
        if num_generated == 2:
            raise RuntimeError("simulated device error")

    engine._on_step = on_step
    handles = [engine.submit(p, SamplingParams(max_new_tokens=5)) for p in PROMPTS[:2]]
    for handle in handles:
        with pytest.raises(RuntimeError, match="engine 4: request .* failed: .*simulated device error"):
            handle.result(timeout_s=30)
    with pytest.raises(RuntimeError, match="engine 4 failed earlier"):
        engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=2))


def test_result_wait_is_bounded_and_names_the_request():
    engine = HFEngine(tiny_model(), engine_id=6)
    engine.pause()
    handle = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=2), request_id="r1")
    with pytest.raises(TimeoutError, match="engine 6: request r1 not finished within 0.05s"):
        handle.result(timeout_s=0.05)
    with pytest.raises(ValueError, match="'r1' is already in flight"):
        engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=2), request_id="r1")
    engine.resume()
    assert len(handle.result(timeout_s=30).response_ids) == 2
