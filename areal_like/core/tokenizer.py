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
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

DEFAULT_ALPHABET = "0123456789+-*/=() "
"""Digits, the four operators, '=', parentheses and space: enough for the arithmetic tasks."""

PAD_TOKEN, EOS_TOKEN, BOS_TOKEN = "<pad>", "<eos>", "<bos>"


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


def encode_checked(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Token ids of ``text`` (no special tokens added); ValueError naming any character not in the vocab."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if tokenizer.decode(ids) != text:
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
