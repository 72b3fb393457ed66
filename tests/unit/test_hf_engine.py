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


def test_load_counts_running_requests_and_tokens_while_generating():
    engine = HFEngine(tiny_model())
    seen: list[EngineLoad] = []
    engine._on_step = lambda num_generated: seen.append(engine.load()) if num_generated == 1 else None
    engine.generate(PROMPTS, SamplingParams(max_new_tokens=3, temperature=0.0))
    prompt_tokens = sum(len(prompt) for prompt in PROMPTS)
    assert seen == [EngineLoad(running_requests=len(PROMPTS), tokens_in_flight=prompt_tokens + len(PROMPTS))]
    assert engine.load() == EngineLoad(running_requests=0, tokens_in_flight=0)


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
