"""Tool calls, the calculator, its task and warm-up demonstrations, the multi-turn metrics, and the
trainer's use of the loss mask (token weights, loss gradient)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from areal_like.config import TaskConfig
from areal_like.core.tokenizer import build_char_tokenizer
from areal_like.core.types import PromptRecord
from areal_like.step_metrics import episode_step_metrics
from areal_like.tasks import make_task
from areal_like.tasks.calculator import (
    ALPHABET,
    WARMUP_TOOL_FRACTION,
    CalculatorEnv,
    CalculatorTask,
    calculator_reward,
    tool_call_text,
    warmup_demonstrations,
)
from rollout.chat import ChatFormat
from rollout.tools import Calculator, MalformedCall, TaggedJsonParser, ToolCall, ToolOutcome, run_tool
from trainer.algorithms import decoupled_ppo_loss, token_logprobs
from trainer.batch import ResponseLayout, SequenceSample, collate_packed

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = build_char_tokenizer(ALPHABET)


def test_tagged_json_parser_reads_every_call_and_names_what_is_malformed():
    parse = TaggedJsonParser().parse
    text = (
        '<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call> and <tool_call>{"name":"b"}</tool_call>'
    )
    assert parse(text) == [ToolCall("a", {"x": 1}), ToolCall("b", {})]
    assert parse("just an answer: 42") == []
    assert parse("<tool_call>{oops}</tool_call>")[0].reason.startswith("call is not JSON")
    assert parse('<tool_call>{"name": "a"')[0] == MalformedCall("<tool_call> without </tool_call>")
    assert (
        "arguments must be a JSON object"
        in parse('<tool_call>{"name": "a", "arguments": 3}</tool_call>')[0].reason
    )
    assert "needs" in parse("<tool_call>[1, 2]</tool_call>")[0].reason


@pytest.mark.parametrize(
    ("expression", "result"),
    [("123*456", "56088"), ("7/2", "3.5"), ("(2+3)*-4", "-20"), ("2**10", "1024"), ("10//3 + 10%3", "4")],
)
def test_calculator_evaluates_arithmetic_exactly(expression, result):
    assert Calculator()(expression=expression) == result


@pytest.mark.parametrize(
    ("expression", "error"),
    [
        ("__import__('os')", "only numbers"),
        ("2**1000", "exponent"),
        ("1+", "not an arithmetic"),
        ("", "non-empty"),
    ],
)
def test_calculator_refuses_anything_but_arithmetic(expression, error):
    with pytest.raises(ValueError, match=error):
        Calculator()(expression=expression)


def test_run_tool_turns_every_fault_into_counted_error_text():
    class SlowAsync:
        name, description = "slow", ""

        async def __call__(self) -> str:
            await asyncio.sleep(30)
            return "late"

    tools = {"calculator": Calculator(), "slow": SlowAsync()}
    run = lambda call: asyncio.run(run_tool(call, tools, timeout_s=0.2))  # noqa: E731
    assert run(ToolCall("calculator", {"expression": "6*7"})) == ToolOutcome("42", False)
    assert run(ToolCall("slow", {})) == ToolOutcome("error: slow timed out after 0.2s", True)
    assert run(ToolCall("calculator", {"expression": "1/0"})).text.startswith("error: calculator failed:")
    assert run(ToolCall("calculator", {"expr": "1"})).error
    assert run(ToolCall("nope", {})).text == "error: unknown tool nope; tools: calculator, slow"
    assert run(MalformedCall("bad")) == ToolOutcome("error: bad", True)


def test_calculator_env_runs_the_call_and_rewards_only_the_exact_final_answer():
    task = PromptRecord("c", "123*456=", "56088")

    async def episode(answer: str):
        env = CalculatorEnv(tool_timeout_s=1.0)
        assert await env.reset(task) == "123*456="
        tool = await env.step(tool_call_text("123*456"))
        final = await env.step(answer)
        return tool, final

    tool, final = asyncio.run(episode("56088"))
    assert (tool.observation, tool.tool_calls, tool.tool_errors, tool.done) == (["56088"], 1, 0, False)
    assert (final.reward, final.done) == (1.0, True)
    assert asyncio.run(episode("56089"))[1].reward == 0.0
    assert calculator_reward(" 56088<eos>junk", "56088") == 1.0


def test_calculator_prompts_have_fixed_width_operands_disjoint_splits_and_true_answers():
    task = make_task(TaskConfig(name="calculator", max_operand=999))
    train, held_out = task.make_prompts("train", 300, 1), task.make_prompts("eval", 100, 1)
    for record in train + held_out:
        a, b = map(int, re.fullmatch(r"(\d{3})\*(\d{3})=", record.text).groups())
        assert record.answer == str(a * b)
    assert not {r.text for r in train} & {r.text for r in held_out}
    assert task.make_prompts("train", 300, 1) == train
    with pytest.raises(ValueError, match="max_operand=9"):
        CalculatorTask(9)


def test_warmup_demonstrations_are_laid_out_exactly_as_rollouts_with_env_tokens_masked():
    records = CalculatorTask(99).make_prompts("train", 200, 0)
    demos = warmup_demonstrations(records, TOKENIZER, seed=3)
    chat = ChatFormat(TOKENIZER)
    eos = TOKENIZER.eos_token
    with_tool = 0
    for record, demo in zip(records, demos, strict=True):
        assert demo.prompt_ids == chat.prompt_ids(record.text)
        sampled = TOKENIZER.decode([t for t, m in zip(demo.response_ids, demo.loss_mask, strict=True) if m])
        env = TOKENIZER.decode([t for t, m in zip(demo.response_ids, demo.loss_mask, strict=True) if not m])
        if env:
            with_tool += 1
            expression = record.text.rstrip("=")
            assert sampled == f"{tool_call_text(expression)}{eos}{record.answer}{eos}"
            assert env == f"<tool_response>{record.answer}</tool_response>"
        else:  # a guess of the answer's length, not the answer
            assert len(sampled) == len(record.answer) + len(eos) and sampled.endswith(eos)
    expected = WARMUP_TOOL_FRACTION * len(records)
    assert 0.5 * expected < with_tool < 1.5 * expected  # WARMUP_TOOL_FRACTION of them, drawn at random


def test_episode_step_metrics_are_the_differences_of_run_totals_and_absent_for_single_turn():
    totals = {
        "rollout/episodes_total": 10.0,
        "rollout/episode_turns_total": 25.0,
        "rollout/tool_calls_total": 12.0,
        "rollout/tool_errors_total": 2.0,
        "rollout/env_errors_total": 0.0,
        "rollout/sampled_tokens_total": 900.0,
        "rollout/env_tokens_total": 100.0,
        "rollout/episode_generate_s_total": 3.0,
        "rollout/env_s_total": 1.0,
    }
    later = dict(totals, **{"rollout/episodes_total": 14.0, "rollout/tool_calls_total": 20.0})
    first, second = episode_step_metrics(totals, None), episode_step_metrics(later, totals)
    assert first["rollout/tool_calls_per_episode"] == 1.2 and first["rollout/turns_per_episode"] == 2.5
    assert first["rollout/env_time_fraction"] == 0.25 and first["rollout/env_token_fraction"] == 0.1
    assert (
        second["rollout/episodes"],
        second["rollout/tool_calls"],
        second["rollout/tool_calls_per_episode"],
    ) == (
        4.0,
        8.0,
        2.0,
    )
    idle = episode_step_metrics(later, later)  # no episode finished: counts 0, no ratios
    assert idle["rollout/episodes"] == 0.0 and "rollout/tool_calls_per_episode" not in idle
    assert episode_step_metrics({"reward/mean": 1.0}, None) == {}


def test_the_trainer_gives_environment_tokens_no_weight_and_no_gradient_in_packed_micro_batches():
    from trainer.config import TrainConfig
    from trainer.worker import TrainerRank, _Minibatch

    mask = np.array([1, 1, 0, 0, 0, 1, 1], dtype=np.int8)
    multi = SequenceSample(
        np.array([3, 4, 5]), np.arange(6, 13), -np.ones(7, np.float32), np.where(mask, 0, -1), mask
    )
    single = SequenceSample(
        np.array([3, 4]), np.array([7, 8, 9]), -np.ones(3, np.float32), np.zeros(3, np.int64)
    )
    samples = [multi, single]
    layout = ResponseLayout.of(samples)
    rank = object.__new__(TrainerRank)  # only the pieces _token_weights reads
    rank.config, rank.world_size, rank.device, rank.norm_tokens = TrainConfig(), 1, torch.device("cpu"), None
    rank.sp_rank = 0  # no sequence parallelism: every rank's sums count
    micro = collate_packed(samples, [0, 1], None)
    weights = rank._token_weights([_Minibatch([0, 1], [micro])], layout)
    assert torch.equal(weights[0, :7] > 0, torch.from_numpy(mask.astype(bool)))
    assert weights.sum().item() == pytest.approx(1.0)  # token_mean over the 4 + 3 sampled tokens

    logits = torch.randn(*micro.input_ids.shape, 20, requires_grad=True)
    logp = token_logprobs(logits, micro.targets)
    behav = micro.scatter(layout.behav_logp)
    loss, stats = decoupled_ppo_loss(
        logp, behav, behav, torch.ones_like(logp), micro.loss_mask, 0.2, token_weights=micro.scatter(weights)
    )
    loss.backward()
    assert stats.num_tokens == 7
    j = micro.sample_index.index(0)
    span = logits.grad[micro.rows[j], micro.starts[j] : micro.starts[j] + 7].abs().sum(-1)
    assert torch.equal(span > 0, torch.from_numpy(mask.astype(bool)))


def doc_example() -> dict:
    """The python block under "### Complete example" in docs/multiturn.md, executed."""
    text = (ROOT / "docs" / "multiturn.md").read_text()
    block = text.split("### Complete example", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    namespace: dict = {"__name__": "multiturn_doc_example"}
    exec(compile(block, "docs/multiturn.md", "exec"), namespace)
    return namespace


def test_the_documented_example_environments_work_as_documented():
    example = doc_example()
    task = PromptRecord("c", "what is the capital of peru?", "lima")

    async def capitals(country: str, answer: str):
        env = example["CapitalsEnv"](tool_timeout_s=1.0)
        prompt = await env.reset(task)
        call = f'<tool_call>{{"name": "lookup", "arguments": {{"country": "{country}"}}}}</tool_call>'
        return prompt, await env.step(call), await env.step(answer)

    prompt, tool, final = asyncio.run(capitals("peru", "Lima"))
    assert (
        "tools: lookup" in prompt
        and tool.observation == ["lima"]
        and (final.reward, final.done) == (1.0, True)
    )
    _, tool, _ = asyncio.run(capitals("atlantis", "?"))
    assert tool.tool_errors == 1 and tool.observation[0].startswith("error: lookup failed: KeyError")

    async def guesses(*actions):
        env = example["GuessEnv"]()
        await env.reset(PromptRecord("g", "guess my number (1-100):", "42"))
        return [await env.step(a) for a in actions]

    low, bad, right = asyncio.run(guesses("10", "many", "42"))
    assert (low.observation, low.reward, low.role) == ("higher", -0.1, "user")
    assert bad.observation == "say a number" and (right.reward, right.done) == (1.0, True)


def test_warm_up_adds_the_tag_tokens_trains_on_masked_demonstrations_and_runs_once(tmp_path):
    from areal_like.core.models import ModelBuildConfig, build_model, load_tokenizer
    from areal_like.tasks.warmup import warm_up

    init = build_model(
        ModelBuildConfig(hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1, alphabet=ALPHABET,
                         max_position_embeddings=160),
        str(tmp_path / "init"),
    )  # fmt: skip
    task = TaskConfig(name="calculator", max_operand=99, warmup_steps=3)
    out = warm_up(task, init, str(tmp_path), seed=0)
    tokenizer = load_tokenizer(out)
    assert len(tokenizer.encode("<tool_call></tool_response>", add_special_tokens=False)) == 2
    lines = (tmp_path / "warmup.jsonl").read_text().splitlines()
    assert len(lines) == 3
    stamp = (Path(out) / "config.json").stat().st_mtime
    assert (
        warm_up(task, init, str(tmp_path), seed=0) == out
        and (Path(out) / "config.json").stat().st_mtime == stamp
    )
    with pytest.raises(ValueError, match="task 'addition' has no warm-up demonstrations"):
        warm_up(TaskConfig(warmup_steps=1), init, str(tmp_path / "other"), seed=0)
