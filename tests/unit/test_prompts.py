"""Prompts as users write them: prompt template, chat template, system prompt, overlong prompts dropped
and counted; and the config checks that go with them."""

from __future__ import annotations

import json
import logging

import pytest

from areal_like.config import ConfigError, TaskConfig, load_config
from areal_like.core.tokenizer import build_char_tokenizer, build_qwen_tokenizer, encode_checked
from areal_like.core.types import PromptRecord
from areal_like.prompts import PromptFormat, PromptRecords, load_prompt_records, tokenize_prompts
from rollout.config import RolloutConfig

BOXED = "{question}\nPlease reason step by step, and put your final answer within \\boxed{}."


@pytest.fixture(scope="module")
def qwen():
    return build_qwen_tokenizer()


@pytest.fixture(scope="module")
def qwen_dir(qwen, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("qwen_tokenizer")
    qwen.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def char_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("char_tokenizer")
    build_char_tokenizer().save_pretrained(path)
    return str(path)


def _records(*texts: str) -> list[PromptRecord]:
    return [PromptRecord(f"p:{i}", text, "#### 1") for i, text in enumerate(texts)]


def test_prompt_template_puts_the_question_in_and_keeps_other_braces(qwen):
    fmt = PromptFormat(prompt_template=BOXED)
    assert fmt.render(qwen, "What is 2+3?") == (
        "What is 2+3?\nPlease reason step by step, and put your final answer within \\boxed{}."
    )
    assert PromptFormat(prompt_template="Q: {prompt} A:").render(qwen, "1+1") == "Q: 1+1 A:"


def test_chat_template_wraps_the_user_message_with_the_generation_prompt(qwen):
    fmt = PromptFormat(prompt_template=BOXED, chat_template=True, system_prompt="Be brief.")
    assert fmt.render(qwen, "What is 2+3?") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+3?\nPlease reason step by "
        "step, and put your final answer within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n"
    )
    default_system = PromptFormat(chat_template=True).render(qwen, "hi")
    assert default_system.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")


# Qwen3's template closes an empty thinking block in the generation prompt when enable_thinking is false.
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def test_chat_template_kwargs_reach_the_template(tmp_path):
    tokenizer = build_qwen_tokenizer()
    tokenizer.chat_template = THINKING_TEMPLATE
    fmt = PromptFormat(chat_template=True)
    user = "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert fmt.render(tokenizer, "2+2?") == user
    no_thinking = PromptFormat(chat_template=True, chat_template_kwargs={"enable_thinking": False})
    assert no_thinking.render(tokenizer, "2+2?") == user + "<think>\n\n</think>\n\n"
    # from the run config
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"question": "2+2?", "answer": "#### 4"}) + "\n")
    overrides = [f"task.train_path={path}", f"task.eval_path={path}", "task.chat_template=true"]
    overrides += ["task.chat_template_kwargs.enable_thinking=false", "run.dir=/tmp/r"]
    config = load_config("configs/gsm8k_cpu.yaml", overrides)
    assert PromptFormat.from_task(config.task) == PromptFormat(
        "{question}", True, "Solve the problem.", 96, {"enable_thinking": False}
    )


def test_tokenized_prompts_carry_the_text_sent_and_its_ids(qwen, qwen_dir):
    fmt = PromptFormat(chat_template=True, system_prompt="Solve.")
    sets = tokenize_prompts(PromptRecords(_records("1+1?"), _records("2+2?"), "m:f", fmt), qwen_dir)
    sent = "<|im_start|>system\nSolve.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert sets.eval[0].text == sent and sets.eval[0].answer == "#### 1"
    assert sets.eval_ids[0] == qwen.encode(sent, add_special_tokens=False)
    assert sets.eval_ids[0][0] == 151_644 and sets.eval_ids[0][-3:] == [151_644, 77091, 198]
    assert qwen.decode(sets.eval_ids[0]) == sent  # what eval.jsonl shows is what the engine got


def test_overlong_prompts_are_dropped_counted_and_logged(qwen, qwen_dir, caplog):
    short, long = "1+1?", "How many apples are there? " * 20
    fmt = PromptFormat(max_prompt_tokens=10)
    with caplog.at_level(logging.WARNING, logger="areal_like.prompts"):
        sets = tokenize_prompts(
            PromptRecords(_records(short, long, long), _records(short), "m:f", fmt), qwen_dir
        )
    assert [r.text for r in sets.train] == [short] and len(sets.train_ids) == 1
    assert sets.num_overlong == {"train": 2, "eval": 0}
    assert "dropped 2 of 3 longer than task.max_prompt_tokens=10" in caplog.text


def test_no_prompt_within_the_limit_is_a_config_error(qwen_dir):
    fmt = PromptFormat(max_prompt_tokens=2)
    with pytest.raises(ConfigError, match=r"every one of the 1 train prompts .*max_prompt_tokens=2"):
        tokenize_prompts(PromptRecords(_records("one two three"), _records("x"), "m:f", fmt), qwen_dir)


def test_chat_template_without_one_in_the_tokenizer_names_the_fix(char_dir):
    fmt = PromptFormat(chat_template=True)
    with pytest.raises(ConfigError, match="has no chat template; build the model with model.build.tokenizer"):
        tokenize_prompts(PromptRecords(_records("1+1="), _records("2+2="), "m:f", fmt), char_dir)


def test_load_prompt_records_takes_the_format_from_the_task_config(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text(json.dumps({"question": "2+2?", "answer": "#### 4"}) + "\n")
    cfg = TaskConfig(
        name="math",
        train_path=str(path),
        eval_path=str(path),
        prompt_key="question",
        chat_template=True,
        system_prompt="S",
        prompt_template=BOXED,
        max_prompt_tokens=99,
    )
    records = load_prompt_records(cfg, seed=0)
    assert records.format == PromptFormat(BOXED, True, "S", 99)
    assert records.train[0].text == "2+2?"


def test_encode_checked_accepts_text_that_only_nfc_changes(qwen):
    decomposed = "cafe\u0301"
    assert encode_checked(qwen, decomposed) == qwen.encode("café", add_special_tokens=False)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task.prompt_template=Solve this"], r"task.prompt_template='Solve this' has no '\{question\}'"),
        (["task.system_prompt=Be brief."], "task.system_prompt='Be brief.' needs task.chat_template=true"),
        (["task.max_prompt_tokens=0"], "task.max_prompt_tokens=0"),
        (["task.chat_template_kwargs.enable_thinking=false"], "needs task.chat_template=true"),
        (
            ["task.chat_template=true", "task.chat_template_kwargs.add_generation_prompt=false"],
            "task.chat_template_kwargs: add_generation_prompt set by the run itself",
        ),
    ],
)
def test_prompt_fields_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/quickstart.yaml", ["run.dir=/tmp/r", *overrides])


@pytest.mark.parametrize(("top_p", "engine"), [(0.9, "vllm")])
def test_vllm_with_top_p_below_one_is_refused_naming_the_fields(top_p, engine):
    with pytest.raises(ValueError, match=r"rollout.top_p=0.9 with rollout.engine='vllm'.*top-p truncation"):
        RolloutConfig(engine=engine, top_p=top_p)


def test_top_p_below_one_stays_allowed_on_the_hf_engine_and_vllm_at_one():
    assert RolloutConfig(engine="hf", top_p=0.9).top_p == 0.9
    assert RolloutConfig(engine="vllm", top_p=1.0).engine == "vllm"


def test_gsm8k_recipes_use_the_qwen_prompt_setup_and_existing_data():
    import os

    cpu = load_config("configs/gsm8k_cpu.yaml")
    assert cpu.model.path is None and cpu.model.build.tokenizer == "qwen"
    assert cpu.task.chat_template and cpu.task.reward_fn == "areal_like.tasks.gsm8k:gsm8k_reward"
    assert os.path.isfile(cpu.task.train_path) and os.path.isfile(cpu.task.eval_path)
    for name, devices in (("gsm8k_1gpu", "colocated"), ("gsm8k_split", "split")):
        gpu = load_config(f"configs/{name}.yaml")
        assert gpu.placement.devices == devices and gpu.realloc.placement == devices
        assert gpu.rollout.engine == "vllm" and gpu.rollout.vllm.enforce_eager is False  # CUDA graphs
        assert gpu.model.path and gpu.task.chat_template and gpu.task.prompt_template == BOXED
