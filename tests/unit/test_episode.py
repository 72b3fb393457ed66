"""Multi-turn episodes on a real HF engine: token in, token out, the loss mask through to the trainer's
micro-batches, a weight update inside a turn, environment and tool faults, limits and aborts."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch
import transformers

from areal_like.core.tokenizer import DEFAULT_ALPHABET, build_char_tokenizer
from areal_like.core.types import ENV_TOKEN_VERSION, PromptGroup, PromptRecord
from rollout.engine import SamplingParams
from rollout.env import EpisodeConfig, StepResult
from rollout.episode import EpisodeOutput, EpisodeRunner
from rollout.hf_engine import HFEngine
from rollout.rewards import RewardResult
from rollout.samples import EpisodeShape, build_group_writes
from rollout.tools import ToolCall, ToolEnv
from trainer.batch import ResponseLayout, SequenceSample, collate, collate_packed

torch.set_num_threads(1)

ALPHABET = DEFAULT_ALPHABET + 'abcdefghijklmnopqrstuvwxyz<>_{}":,.'
TOKENIZER = build_char_tokenizer(ALPHABET)
TASK = PromptRecord("t:0", "12+34=", "46")
HERE = __name__


def tiny_model(seed: int = 0) -> transformers.Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=len(TOKENIZER),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        max_position_embeddings=256,
    )
    return transformers.Qwen2ForCausalLM(config).eval()


class RecordingEngine(HFEngine):
    """The HF engine, keeping every turn it was asked for (context ids) and its handle."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.turns: list[tuple[list[int], object]] = []

    def submit(self, prompt_ids, params, request_id=None, stream=False):
        handle = super().submit(prompt_ids, params, request_id, stream)
        self.turns.append((list(prompt_ids), handle))
        return handle


class ScriptedEnv:
    """Three turns: a tool result, then a user message, then done; rewards 0.5 and 1.0."""

    instances: list[ScriptedEnv] = []

    def __init__(self) -> None:
        self.actions: list[str] = []
        ScriptedEnv.instances.append(self)

    async def reset(self, task: PromptRecord) -> str:
        return task.text

    async def step(self, action: str) -> StepResult:
        self.actions.append(action)
        if len(self.actions) == 1:
            return StepResult(observation="5", reward=0.5, role="tool", tool_calls=1)
        if len(self.actions) == 2:
            return StepResult(observation="67", role="user")
        return StepResult(observation="", reward=1.0, done=True)


def runner_for(engine, env: str, max_turns=4, **episode) -> EpisodeRunner:
    config = EpisodeConfig(env=f"{HERE}:{env}", max_turns=max_turns, **episode)
    return EpisodeRunner(engine, TOKENIZER, config)


def wait_until_update_posted(engine: HFEngine) -> None:
    with engine._cond:
        assert engine._cond.wait_for(lambda: engine._pending is not None, timeout=10)


def test_three_turn_episode_trains_exactly_the_sampled_and_environment_tokens_across_a_weight_update():
    ScriptedEnv.instances.clear()
    engine = RecordingEngine(tiny_model(0), seed=3)
    new_weights = tiny_model(1).state_dict()
    updater = threading.Thread(target=lambda: engine.update_weights(new_weights, version=1))

    def on_step(num_generated: int) -> None:  # inside turn two, after 3 of its tokens
        in_turn_two = len(ScriptedEnv.instances[-1].actions) == 1
        if in_turn_two and num_generated == 3 and engine.version == 0 and updater.ident is None:
            updater.start()
            wait_until_update_posted(engine)

    engine._on_step = on_step
    runner = runner_for(engine, "ScriptedEnv")
    params = SamplingParams(max_new_tokens=8, temperature=1.0)  # no stop token: 8 tokens a turn
    try:
        output = runner.submit(TASK, params).result(timeout_s=60)
    finally:
        if updater.ident is not None:
            updater.join(timeout=10)
        runner.close()
    assert isinstance(output, EpisodeOutput)
    assert (output.finish_reason, output.reward, output.stats.num_turns) == ("stop", 1.5, 3)

    prompt = TOKENIZER.encode("12+34=", add_special_tokens=False)
    observations = [
        TOKENIZER.encode("<tool_response>5</tool_response>", add_special_tokens=False),
        TOKENIZER.encode("67", add_special_tokens=False),
    ]
    turns = [handle.result(0) for _, handle in engine.turns]
    assert len(turns) == 3
    expected, mask, context = [], [], list(prompt)
    for k, turn in enumerate(turns):
        assert engine.turns[k][0] == context, f"turn {k} was not given exactly the trajectory so far"
        expected += turn.response_ids
        mask += [1] * len(turn.response_ids)
        if k < 2:
            expected += observations[k]
            mask += [0] * len(observations[k])
        context = prompt + expected
    assert output.prompt_ids == prompt
    assert output.response_ids == expected and output.loss_mask == mask
    # the environment read the text of what was sampled, nothing else
    env = ScriptedEnv.instances[-1]
    assert env.actions == [TOKENIZER.decode(t.response_ids, skip_special_tokens=True) for t in turns]
    # behaviour log-probs and versions: the engine's on sampled tokens, placeholders on env tokens
    sampled = [i for i, m in enumerate(mask) if m]
    assert [output.logprobs[i] for i in sampled] == [lp for t in turns for lp in t.logprobs]
    assert all(output.versions[i] == ENV_TOKEN_VERSION for i, m in enumerate(mask) if not m)
    assert (
        set(turns[0].versions) == {0} and set(turns[1].versions) == {0, 1} and set(turns[2].versions) == {1}
    )
    assert turns[1].versions == [0] * 3 + [1] * 5

    # through the datastore columns into the trainer's padded and packed micro-batches
    group = PromptGroup(9, TASK, tuple(prompt), 1, admitted_version=0)
    shapes = [EpisodeShape(output.prompt_ids, output.stats.num_turns)]
    (write,) = build_group_writes(group, [output], [RewardResult(1.5, "ok")], [1.0], 0, shapes)
    assert (write.min_version, write.max_version) == (0, 1)  # staleness of the oldest sampled token
    c = write.columns
    sample = SequenceSample(
        c["prompt_ids"], c["response_ids"], c["behav_logprobs"], c["versions"], c["loss_mask"]
    )
    other = SequenceSample(
        np.array([3, 4]), np.array([5, 6, 7]), np.zeros(3, np.float32), np.zeros(3, np.int64)
    )
    layout = ResponseLayout.of([other, sample])
    assert layout.loss_mask[1, : len(mask)].tolist() == mask and layout.mask[1, : len(mask)].sum() == len(
        mask
    )
    for micro in (collate([other, sample], [0, 1]), collate_packed([other, sample], [0, 1], None)):
        j = micro.sample_index.index(1)
        row, start, length = micro.rows[j], micro.starts[j], micro.lengths[j]
        assert micro.targets[row, start : start + length].tolist() == expected
        assert micro.loss_mask[row, start : start + length].tolist() == mask
        assert micro.loss_mask.sum() == sum(mask) + 3  # nothing else of the row counts, padding neither


class FaultyTools(ToolEnv):
    """Calls a hanging tool, then a raising one, then one returning garbage, then answers."""

    last: FaultyTools

    def __init__(self, tool_timeout_s: float) -> None:
        self.release = threading.Event()
        tools = (
            _tool("hang", lambda: self.release.wait(60) and "late"),
            _tool("boom", lambda: 1 / 0),
            _tool("garbage", lambda: 42),
        )
        super().__init__(tools=tools, parser=ScriptedParser(), tool_timeout_s=tool_timeout_s)
        FaultyTools.last = self

    def score(self, answer: str, task: PromptRecord) -> float:
        return 1.0


class ScriptedParser:
    """A pluggable parser that reads the turn number, not the (random) text: hang, boom, garbage."""

    def __init__(self) -> None:
        self.calls = iter([[ToolCall("hang", {})], [ToolCall("boom", {})], [ToolCall("garbage", {})]])

    def parse(self, text: str):
        return next(self.calls, [])


def _tool(name, fn):
    class Named:
        description = name

        def __call__(self, **_):
            return fn()

    tool = Named()
    tool.name = name
    return tool


def test_a_hanging_a_raising_and_a_garbage_tool_each_end_their_turn_with_a_counted_error():
    engine = HFEngine(tiny_model(), seed=1)
    runner = runner_for(engine, "FaultyTools", env_args={"tool_timeout_s": 0.3})
    start = time.monotonic()
    try:
        output = runner.submit(TASK, SamplingParams(max_new_tokens=4)).result(timeout_s=30)
    finally:
        FaultyTools.last.release.set()
        runner.close()
    assert time.monotonic() - start < 10, "the episode waited for the hanging tool"
    assert (output.finish_reason, output.reward, output.stats.num_turns) == ("stop", 1.0, 4)
    assert (output.stats.tool_calls, output.stats.tool_errors, output.stats.env_errors) == (3, 3, 0)
    env_text = TOKENIZER.decode(
        [t for t, m in zip(output.response_ids, output.loss_mask, strict=True) if not m]
    )
    assert "error: hang timed out after 0.3s" in env_text
    assert "error: boom failed:" in env_text and "division by zero" in env_text  # (capitals not in vocab)
    assert "error: garbage returned int, not text" in env_text


class RaisingResetEnv:
    def reset(self, task):
        raise RuntimeError("no world today")

    def step(self, action):
        raise AssertionError("never stepped")


def test_an_environment_whose_reset_fails_gives_one_turn_on_the_task_text_scored_as_an_error():
    runner = runner_for(HFEngine(tiny_model()), "RaisingResetEnv")
    try:
        output = runner.submit(TASK, SamplingParams(max_new_tokens=3)).result(timeout_s=30)
    finally:
        runner.close()
    assert (output.finish_reason, output.reward, output.reward_status) == ("error", 0.0, "error")
    assert output.prompt_ids == TOKENIZER.encode(TASK.text, add_special_tokens=False)
    assert output.stats.env_errors == 1 and output.loss_mask == [1, 1, 1]


class RaisingEnv:
    async def reset(self, task):
        return task.text

    async def step(self, action):
        raise RuntimeError("environment bug")


class HangingEnv:
    async def reset(self, task):
        return task.text

    async def step(self, action):
        await asyncio.sleep(60)


@pytest.mark.parametrize("env", ["RaisingEnv", "HangingEnv"])
def test_an_environment_that_raises_or_hangs_ends_the_episode_as_an_error_and_is_counted(env):
    runner = runner_for(HFEngine(tiny_model()), env, step_timeout_s=0.3)
    try:
        output = runner.submit(TASK, SamplingParams(max_new_tokens=3)).result(timeout_s=30)
    finally:
        runner.close()
    assert (output.finish_reason, output.reward_status, output.stats.env_errors) == ("error", "error", 1)
    assert len(output.response_ids) == 3 and output.loss_mask == [1, 1, 1]


class SlowEnv:
    """Answers every turn after a while with a user message; never done."""

    async def reset(self, task):
        return task.text

    async def step(self, action):
        await asyncio.sleep(0.2)
        return StepResult(observation="1", role="user")


def test_abort_ends_an_episode_waiting_for_its_environment_with_its_tokens_so_far():
    runner = runner_for(HFEngine(tiny_model()), "SlowEnv", max_turns=50)
    try:
        handle = runner.submit(TASK, SamplingParams(max_new_tokens=2))
        time.sleep(0.5)
        runner.abort([handle.request_id])
        output = handle.result(timeout_s=10)
    finally:
        runner.close()
    assert output.finish_reason == "abort" and output.stats.num_turns >= 1
    assert len(output.response_ids) == len(output.loss_mask) == len(output.versions)


def test_turn_and_token_limits_end_episodes_and_the_last_observation_is_never_appended():
    engine = HFEngine(tiny_model())
    by_turns = runner_for(engine, "SlowEnv", max_turns=2)
    by_tokens = runner_for(engine, "SlowEnv", max_turns=50, max_total_tokens=9)
    try:
        turns = by_turns.submit(TASK, SamplingParams(max_new_tokens=2)).result(timeout_s=30)
        tokens = by_tokens.submit(TASK, SamplingParams(max_new_tokens=2)).result(timeout_s=30)
    finally:
        by_turns.close()
        by_tokens.close()
    assert turns.finish_reason == "turns" and turns.loss_mask == [1, 1, 0, 1, 1]
    assert tokens.finish_reason == "length" and len(tokens.response_ids) <= 9
    assert tokens.loss_mask[-1] == 1  # ends with the model's turn, not an unanswered observation


def test_wall_clock_limit_aborts_the_running_turn_and_keeps_its_tokens():
    engine = HFEngine(tiny_model())
    engine._on_step = lambda n: time.sleep(0.05)
    runner = runner_for(engine, "SlowEnv", max_episode_s=0.5)
    try:
        output = runner.submit(TASK, SamplingParams(max_new_tokens=200)).result(timeout_s=30)
    finally:
        runner.close()
    assert output.finish_reason == "timeout"
    assert 0 < len(output.response_ids) < 200 and all(output.loss_mask)


QWEN_LIKE_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role == 'tool' %}"
    "<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_template_observations_are_the_template_text_between_the_models_eos_and_its_next_turn():
    from rollout.chat import ChatFormat

    tok = build_char_tokenizer(ALPHABET + "|\n")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = QWEN_LIKE_TEMPLATE
    chat = ChatFormat(tok)
    assert chat.uses_template
    encode = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    assert chat.prompt_ids("1+1=") == encode("<|im_start|>user\n1+1=<|im_end|>\n<|im_start|>assistant\n")
    after_eos = "\n<|im_start|>user\n<tool_response>\n2\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    assert chat.observation_ids(["2"], "tool", after_stop=True) == encode(after_eos)
    assert chat.observation_ids(["2"], "tool", after_stop=False) == encode("<|im_end|>" + after_eos)
    # the template's own variables reach every rendering (here a marker after the generation prompt)
    marker = "<|im_start|>assistant\n{% if think is defined %}!{% endif %}{% endif %}"
    tok.chat_template = QWEN_LIKE_TEMPLATE.replace("<|im_start|>assistant\n{% endif %}", marker)
    marked = ChatFormat(tok, template_kwargs={"think": True})
    assert marked.prompt_ids("1") == encode("<|im_start|>user\n1<|im_end|>\n<|im_start|>assistant\n!")
    assert marked.observation_ids(["2"], "tool", after_stop=True) == encode(after_eos + "!")
    plain = ChatFormat(TOKENIZER)
    assert not plain.uses_template
    assert plain.observation_ids(["2", "3"], "tool", True) == TOKENIZER.encode(
        "<tool_response>2</tool_response><tool_response>3</tool_response>", add_special_tokens=False
    )
