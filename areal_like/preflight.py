"""Checks of a run's inputs before Ray starts and before anything is written.

``check_run(config)`` is the controller's first step. It loads the prompts (``load_prompt_records``)
and checks, in the driver:
- the algorithm: GRPO's group-relative advantages need ``rollout.group_size`` >= 2;
- the resources: GPUs, CUDA and vLLM for a GPU recipe, against this machine (a local Ray) or, once
  Ray is up, against the cluster (``check_cluster``), so no actor waits for what cannot come;
- the model: ``model.path`` is a directory, its config.json parses, its ``model_type`` is one the
  weight-reallocation plan maps when that or vLLM is used, its tokenizer loads; the context
  (``max_position_embeddings``, or ``rollout.vllm.max_model_len``) bounds a prompt plus
  ``rollout.max_new_tokens``;
- the prompts: each fits the context (one far longer than any tokenization of the context could be
  is judged on its length in characters and never tokenized); overlong ones are refused naming the
  file and line, or dropped and counted (``preflight.overlong_prompts``);
- the dataset: fewer training prompts than ``train.batch_groups`` would repeat prompts inside one
  batch; refused or warned (``preflight.small_dataset``);
- the code sandbox: a code reward needs bubblewrap unless ``task.sandbox`` is 'weak' (``job_env``
  hands the choice to every actor);
Every problem found is reported at once, as one ``ConfigError`` (the CLI exits 2) with the field or
the file and line, the value and the fix.

This module imports no torch, Ray or transformers at module level: ``PreflightConfig`` is part of
the run config.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from areal_like.config import Config
    from areal_like.core.types import PromptRecord
    from areal_like.prompts import PromptRecords

logger = logging.getLogger(__name__)

GROUP_BASELINE_ALGOS = ("grpo",)
"""Algorithms whose advantage is the reward minus its group's mean: a group of one learns nothing."""
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
"""config.json keys that give a model's context length, in the order they are looked up."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
"""A model directory with none of these has no tokenizer (transformers would build an empty one)."""
MAX_CHARS_PER_TOKEN = 64
"""No tokenizer packs more characters than this into one token on average: a prompt longer than
this many characters per token of context is overlong without being tokenized."""


@dataclass
class PreflightConfig:
    """What the checks before a run do with inputs that are usable but doubtful."""

    overlong_prompts: str = "refuse"
    """A prompt whose tokens plus rollout.max_new_tokens exceed the model's context: 'refuse' (stop
    before the run, naming the file and line) or 'filter' (drop it, count it in the log)."""
    small_dataset: str = "refuse"
    """Fewer training prompts than train.batch_groups (a batch would hold one prompt twice):
    'refuse' or 'warn' (log it and go on)."""

    def __post_init__(self) -> None:
        if self.overlong_prompts not in ("refuse", "filter"):
            raise ValueError(
                f"preflight.overlong_prompts={self.overlong_prompts!r}: allowed values are 'refuse', 'filter'"
            )
        if self.small_dataset not in ("refuse", "warn"):
            raise ValueError(
                f"preflight.small_dataset={self.small_dataset!r}: allowed values are 'refuse', 'warn'"
            )


@dataclass
class Preflight:
    """What the checks found: the prompts to use and the numbers behind them."""

    records: PromptRecords
    """Training and held-out prompts, overlong ones removed when ``overlong_prompts`` is 'filter'."""
    context_tokens: int | None
    """The model's context in tokens (None when its config names none)."""
    num_overlong: int
    """Prompts dropped as overlong (train and held-out)."""


def check_run(config: Config) -> Preflight:
    """Check everything a run needs before it starts; one ConfigError listing every problem."""
    from areal_like.config import ConfigError
    from areal_like.prompts import load_prompt_records

    problems: list[str] = []

    def attempt(check, *args):
        try:
            return check(*args)
        except ConfigError as err:
            problems.append(str(err))
            return None

    attempt(check_algorithm, config)
    attempt(check_vllm, config)
    attempt(check_local_gpus, config)
    attempt(check_sandbox, config)
    model = attempt(check_model, config)
    records = attempt(load_prompt_records, config.task, config.run.seed)
    num_overlong = 0
    if records is not None and model is not None:
        checked = attempt(check_prompt_lengths, records, config, *model)
        if checked is not None:
            records, num_overlong = checked
    if records is not None:
        attempt(check_dataset_size, records, config)
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(
            f"the run cannot start ({len(problems)} problem(s)); nothing was started or written:\n{listed}"
        )
    return Preflight(records, model[1] if model else None, num_overlong)


def check_algorithm(config: Config) -> None:
    from areal_like.config import ConfigError

    if config.train.algo in GROUP_BASELINE_ALGOS and config.rollout.group_size < 2:
        raise ConfigError(
            f"rollout.group_size={config.rollout.group_size} with train.algo={config.train.algo!r}: the "
            "advantage is a sample's reward minus its group's mean, so with one sample per prompt every "
            "advantage, the loss and the gradient are 0. Set rollout.group_size >= 2 (8-16 is typical) "
            "or train.algo=ppo"
        )


def gpus_needed(config: Config) -> int:
    """GPUs the run asks Ray for: one per trainer rank, plus one per engine unless colocated."""
    devices = config.placement.devices
    if devices == "cpu":
        return 0
    if devices == "colocated":
        return config.train.num_ranks
    return config.train.num_ranks + config.rollout.num_workers


def check_vllm(config: Config) -> None:
    from areal_like.config import ConfigError

    if config.rollout.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "rollout.engine='vllm' but vllm is not installed here (pip install -e .[gpu] on a CUDA "
            "machine); on a CPU machine use rollout.engine=hf and placement.devices=cpu "
            "(configs/quickstart.yaml)"
        )


def check_local_gpus(config: Config) -> None:
    """With a local Ray (no ray.address): CUDA and enough GPUs on this machine."""
    from areal_like.config import ConfigError

    needed = gpus_needed(config)
    if not needed or config.ray.address is not None:
        return
    visible, why = _local_gpus()
    if visible < needed:
        raise ConfigError(
            f"placement.devices={config.placement.devices!r} needs {needed} GPU(s) "
            f"(train.num_ranks={config.train.num_ranks}, rollout.num_workers={config.rollout.num_workers}) "
            f"but this machine has {visible} ({why}); Ray would wait for them forever. Run on a GPU "
            "machine, join a cluster with ray.address, or use placement.devices=cpu with rollout.engine=hf"
        )


def check_cluster(config: Config) -> None:
    """After ``ray.init`` on a cluster: enough GPUs in the cluster for the run (before any actor waits)."""
    import ray

    from areal_like.config import ConfigError

    needed = gpus_needed(config)
    available = int(ray.cluster_resources().get("GPU", 0))
    if needed > available:
        raise ConfigError(
            f"placement.devices={config.placement.devices!r} needs {needed} GPU(s) but the Ray cluster at "
            f"ray.address={config.ray.address!r} has {available}; add GPU nodes or lower train.num_ranks / "
            "rollout.num_workers"
        )


def _local_gpus() -> tuple[int, str]:
    """(GPUs CUDA shows this process, why when none)."""
    try:
        import torch
    except ImportError:
        return 0, "torch is not installed"
    if not torch.cuda.is_available():
        return 0, f"CUDA is not available to torch {torch.__version__}"
    return torch.cuda.device_count(), "visible to CUDA"


def check_sandbox(config: Config) -> None:
    """A code reward runs model output: refuse without bubblewrap unless the weak mode is chosen."""
    from areal_like.config import ConfigError
    from areal_like.tasks.sandbox import bubblewrap_path

    reward = config.task.reward_fn or ""
    uses_code = config.task.name == "code" or reward.startswith("areal_like.tasks.code_reward:")
    if uses_code and config.task.sandbox == "bwrap" and bubblewrap_path() is None:
        raise ConfigError(
            "task.sandbox='bwrap': the code reward runs model output under bubblewrap, and 'bwrap' is "
            "not on PATH (or cannot make user namespaces here): install it (Debian/Ubuntu: apt-get "
            "install -y bubblewrap), or set task.sandbox=weak for resource limits and audit hooks only "
            "(no file-system, PID or user isolation)"
        )


def job_env(config: Config) -> dict[str, str]:
    """Environment variables every actor of the run gets (Ray's runtime_env): the sandbox mode."""
    from areal_like.tasks.sandbox import ENV_VAR

    return {ENV_VAR: config.task.sandbox}


def check_model(config: Config) -> tuple[object, int | None]:
    """(tokenizer, context length in tokens or None) of ``model.path``, or of the model ``model.build``
    describes (built in memory: nothing is written)."""
    from areal_like.config import ConfigError

    cfg = config.model
    if cfg.path is None:
        from areal_like.core.models import make_tokenizer  # the tokenizer build_model will write

        context = cfg.build.max_position_embeddings
        return make_tokenizer(cfg.build), _engine_context(config, context)
    path = cfg.path
    if not os.path.isdir(path):
        raise ConfigError(
            f"model.path={path!r} is not a directory; give a local Hugging Face model directory "
            "(config.json, weights, tokenizer), or model.path=null to build a small model from model.build"
        )
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ConfigError(f"model.path={path!r} has no config.json; is it a Hugging Face model directory?")
    try:
        with open(config_file) as f:
            model_config = json.load(f)
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{config_file}: line {err.lineno}, column {err.colno}: {err.msg}; the model's config.json is "
            "not valid JSON (re-export or re-download the model)"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{config_file}: cannot be read: {err}") from None
    if not isinstance(model_config, dict):
        raise ConfigError(f"{config_file}: holds a {type(model_config).__name__}, expected a JSON object")
    check_model_family(config, model_config.get("model_type"))
    fix = "the directory needs the tokenizer files saved with the model (tokenizer.json or vocab files)"
    if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise ConfigError(f"model.path={path!r}: the tokenizer does not load: no tokenizer file; {fix}")
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:  # fault boundary: any loader error becomes the user's message
        raise ConfigError(
            f"model.path={path!r}: the tokenizer does not load ({type(err).__name__}: {str(err)[:300]}); "
            + fix
        ) from None
    if len(tokenizer) < 2:
        raise ConfigError(f"model.path={path!r}: the tokenizer loads with {len(tokenizer)} token(s); {fix}")
    text_config = model_config.get("text_config")
    sources = [model_config, text_config] if isinstance(text_config, dict) else [model_config]
    model_context = next(
        (int(c[k]) for c in sources for k in CONTEXT_KEYS if isinstance(c.get(k), int)), None
    )
    return tokenizer, _engine_context(config, model_context)


def check_model_family(config: Config, model_type: object) -> None:
    """The weight-reallocation plan and vLLM's weight check map the tensors of Qwen2 and dense Qwen3
    only; another family is refused now rather than at the first weight sync or the last check."""
    from areal_like.config import ConfigError
    from areal_like.core.realloc.qwen2 import MODEL_TYPES

    if model_type in MODEL_TYPES or not (config.realloc.enabled or config.rollout.engine == "vllm"):
        return
    fix = "set realloc.enabled=false (whole state dicts to the engines)"
    fix = fix + " and rollout.engine=hf" if config.rollout.engine == "vllm" else fix
    raise ConfigError(
        f"model.path={config.model.path!r}: model_type {model_type!r} is not one the weight-reallocation "
        f"plan and the vLLM engine's weight check know ({', '.join(MODEL_TYPES)}: Qwen2, Qwen2.5, dense "
        f"Qwen3); use such a model, or {fix}"
    )


def _engine_context(config: Config, model_context: int | None) -> int | None:
    limit = config.rollout.vllm.max_model_len if config.rollout.engine == "vllm" else None
    known = [c for c in (model_context, limit) if c is not None]
    return min(known) if known else None


def check_prompt_lengths(
    records: PromptRecords, config: Config, tokenizer, context: int | None
) -> tuple[PromptRecords, int]:
    """Prompts whose tokens plus ``rollout.max_new_tokens`` exceed ``context``: refused (ConfigError
    naming each, up to 5) or dropped; returns the records to use and how many were dropped."""
    from areal_like.config import ConfigError

    max_new = config.rollout.max_new_tokens
    if context is None:
        logger.warning("preflight: the model's config names no context length; prompt lengths not checked")
        return records, 0
    room = context - max_new
    if room < 1:
        raise ConfigError(
            f"rollout.max_new_tokens={max_new} leaves no room for a prompt in the model's context of "
            f"{context} tokens; lower rollout.max_new_tokens"
        )
    overlong = {
        "train": _overlong(records.train, tokenizer, room, config, "train"),
        "eval": _overlong(records.eval, tokenizer, room, config, "eval"),
    }
    found = [(split, r, n) for split, items in overlong.items() for r, n in items]
    if not found:
        return records, 0
    if config.preflight.overlong_prompts == "refuse":
        shown = "; ".join(_where(config, split, r, n) for split, r, n in found[:5])
        more = f" (and {len(found) - 5} more)" if len(found) > 5 else ""
        raise ConfigError(
            f"{len(found)} prompt(s) do not fit the model's context of {context} tokens with "
            f"rollout.max_new_tokens={max_new} (at most {room} prompt tokens): {shown}{more}. Shorten or "
            "remove them, or set preflight.overlong_prompts=filter to drop such prompts and count them"
        )
    dropped = {split: {id(r) for r, _ in items} for split, items in overlong.items()}
    train = [r for r in records.train if id(r) not in dropped["train"]]
    held_out = [r for r in records.eval if id(r) not in dropped["eval"]]
    logger.warning(
        "preflight: dropped %d training and %d held-out prompts longer than %d tokens "
        "(preflight.overlong_prompts=filter), e.g. %s",
        len(records.train) - len(train), len(records.eval) - len(held_out), room,
        _where(config, *found[0]),
    )  # fmt: skip
    if not train:
        raise ConfigError(f"every training prompt is longer than {room} tokens; nothing is left to train on")
    return dataclasses.replace(records, train=train, eval=held_out), len(found)


def _overlong(
    items: list[PromptRecord], tokenizer, room: int, config: Config, split: str
) -> list[tuple[PromptRecord, int | None]]:
    """(record, its token count, or None when judged by its length alone) of each prompt over ``room``;
    ConfigError for a prompt the tokenizer cannot encode."""
    from areal_like.config import ConfigError

    found: list[tuple[PromptRecord, int | None]] = []
    to_count: list[PromptRecord] = []
    for record in items:
        if len(record.text) > room * MAX_CHARS_PER_TOKEN:
            found.append((record, None))  # far too long: never tokenized (a 10 MB line stays cheap)
        else:
            to_count.append(record)
    if to_count:
        ids = tokenizer([r.text for r in to_count], add_special_tokens=False)["input_ids"]
        found.extend((r, len(t)) for r, t in zip(to_count, ids, strict=True) if len(t) > room)
        for record, text in zip(to_count, tokenizer.batch_decode(ids), strict=True):
            if text != record.text:  # what tokenize_prompts refuses later, after Ray started
                unknown = sorted(set(record.text) - set(text))[:10]
                raise ConfigError(
                    f"{_where(config, split, record, None)}: the tokenizer cannot encode the prompt "
                    f"(characters {unknown} are dropped or changed); use a model whose tokenizer covers "
                    "them, or fix the prompt"
                )
    return found


def _where(config: Config, split: str, record: PromptRecord, num_tokens: int | None) -> str:
    """Where a prompt comes from (file and line for file prompts) and how long it is."""
    path = config.task.train_path if split == "train" else config.task.eval_path
    name, _, line = record.prompt_id.rpartition(":")
    place = f"{path} line {line}" if path and line.isdigit() else f"{split} prompt {record.prompt_id!r}"
    size = f"{num_tokens} tokens" if num_tokens is not None else f"{len(record.text):,} characters"
    return f"{place} ({size})"


def check_dataset_size(records: PromptRecords, config: Config) -> None:
    from areal_like.config import ConfigError

    num_prompts, batch_groups = len(records.train), config.train.batch_groups
    if num_prompts >= batch_groups:
        return
    source = f"task.train_path={config.task.train_path!r}" if config.task.train_path else "the task"
    message = (
        f"{source} gives {num_prompts} training prompts, fewer than train.batch_groups={batch_groups}: "
        "every batch would hold some prompts twice (one group per prompt). Add prompts or lower "
        "train.batch_groups"
    )
    if config.preflight.small_dataset == "refuse":
        raise ConfigError(f"{message}, or set preflight.small_dataset=warn to train anyway")
    logger.warning("preflight: %s (preflight.small_dataset=warn: going on)", message)
