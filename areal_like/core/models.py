"""Tiny Qwen2 causal LMs built from scratch, and local-only loaders.

``build_model`` writes a standard Hugging Face model directory (config.json, safetensors weights,
generation_config.json, tokenizer files) that ``AutoModelForCausalLM``/``AutoTokenizer`` and vLLM
load as an ordinary Qwen2 checkpoint. Loaders pass ``local_files_only=True``: nothing reaches a hub.

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

from areal_like.core.tokenizer import DEFAULT_ALPHABET, check_alphabet

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)


@dataclass
class ModelBuildConfig:
    """Shape and seed of a randomly initialised Qwen2 model with a character tokenizer."""

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

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"ModelBuildConfig.{name}={value}; must be a positive integer")
        if self.max_position_embeddings < 2:
            raise ValueError(
                f"ModelBuildConfig.max_position_embeddings={self.max_position_embeddings}; "
                "must be >= 2 (room for a prompt and a response token)"
            )
        if self.hidden_size % self.num_heads != 0 or (self.hidden_size // self.num_heads) % 2 != 0:
            raise ValueError(
                f"ModelBuildConfig.hidden_size={self.hidden_size} with num_heads={self.num_heads} gives "
                f"head dim {self.hidden_size / self.num_heads}; pick hidden_size = num_heads * an even number"
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


def make_model(cfg: ModelBuildConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A randomly initialised float32 Qwen2 model (seeded by ``cfg.seed``) and its char tokenizer."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from areal_like.core.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer(cfg.alphabet)
    tokenizer.model_max_length = cfg.max_position_embeddings
    model_config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        use_sliding_window=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    # Seed a forked RNG so the caller's global torch RNG stream is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = Qwen2ForCausalLM(model_config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
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
        "built Qwen2 model: %d params, vocab %d, %d layers, hidden %d, seed %d -> %s",
        num_params, len(tokenizer), cfg.num_layers, cfg.hidden_size, cfg.seed, out_dir,
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
