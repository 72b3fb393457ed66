"""The run configuration: one typed dataclass per component, loaded from YAML with overrides.

``load_config(path, overrides)`` merges, in order: the schema defaults, the YAML recipe, then
``key=value`` overrides; it fails before any work starts when a key is unknown, a value has the wrong
type, or a component's ``__post_init__`` rejects it, with the key, the value and what is allowed.
Config modules import no torch, Ray or engines: a config is data.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from areal_like.core.models import ModelBuildConfig
from areal_like.core.realloc.config import ReallocConfig
from areal_like.placement import PlacementConfig
from areal_like.preflight import PreflightConfig
from datastore.config import DataStoreConfig
from rollout.chat import check_template_kwargs
from rollout.config import RolloutConfig
from rollout.rewards import RewardPoolConfig
from trainer.config import TrainConfig


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message names the key and the fix."""


@dataclass
class RunSection:
    """Where the run lives and how often it is saved."""

    dir: str = MISSING
    """Run directory: config.yaml, metrics.jsonl, eval.jsonl, checkpoints/, curves.png."""
    seed: int = 1
    """Seed for model init, prompt order and sampling."""
    save_checkpoints: bool = True
    """False: never write checkpoints (throughput benchmarks, throwaway runs); such a run cannot resume."""
    checkpoint_every: int = 10
    """Save a checkpoint every this many train steps (and always at the last step); 0 = only at the end."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep on disk (the newest intact one is never deleted)."""
    async_checkpoint: bool = False
    """True: a save blocks the loop only while each trainer rank copies its state to host memory;
    the files are written in the background while training goes on (needs host memory for one more
    copy of every rank's model and optimizer state). A crash mid-write leaves the previous
    checkpoint as the one a resume takes."""
    resume: bool = True
    """Resume from the run directory's latest checkpoint when there is one."""
    tensorboard: bool = True
    """Write TensorBoard event files into run.dir/tensorboard."""
    plot: bool = True
    """Write the learning-curve PNG (curves.png) at the end of the run."""
    wandb_project: str | None = None
    """Also log metrics to this Weights & Biases project (needs the wandb package); None = off."""
    log_every: int = 1
    """Print a progress line every this many steps."""
    actor_timeout_s: float = 1800.0
    """Longest wait for one actor call (train step, weight export, checkpoint, eval); past it the run
    stops with an error naming the actors that did not answer."""

    def __post_init__(self) -> None:
        if self.checkpoint_every < 0:
            raise ValueError(
                f"run.checkpoint_every={self.checkpoint_every}: must be >= 0 (0 = only at the end)"
            )
        if self.keep_checkpoints < 1:
            raise ValueError(f"run.keep_checkpoints={self.keep_checkpoints}: must be >= 1")
        if self.log_every < 1:
            raise ValueError(f"run.log_every={self.log_every}: must be >= 1")
        if self.actor_timeout_s <= 0:
            raise ValueError(f"run.actor_timeout_s={self.actor_timeout_s}: must be > 0 seconds")


@dataclass
class RayConfig:
    """The Ray cluster the run uses."""

    address: str | None = None
    """None starts a local Ray instance; 'auto' or 'HOST:PORT' joins a running cluster."""
    num_cpus: int | None = None
    """Logical CPUs of a local instance (None = the machine's cores). All actors ask for 0 CPUs."""


@dataclass
class ModelConfig:
    """The policy model: a local Hugging Face directory, or a small model built from ``build``."""

    path: str | None = None
    """Local HF model directory (config.json, safetensors, tokenizer). None builds one into
    run.dir/init_model from ``model.build`` (no hub is ever contacted)."""
    build: ModelBuildConfig = field(default_factory=ModelBuildConfig)
    """Architecture of the model built when ``path`` is null."""


@dataclass
class TaskConfig:
    """The prompts and the verifiable reward."""

    name: str = "addition"
    """Built-in task ('addition', 'calculator', 'math', 'code'); sets the default reward and generates
    prompts when no files are given."""
    max_operand: int = 9
    """addition, calculator: largest operand (calculator: >= 20; operands start at 10)."""
    num_operands: int = 2
    """addition: operands per prompt."""
    modulus: int | None = None
    """addition: the answer is the sum modulo this (10 keeps every answer one digit); None = the plain sum."""
    num_train_prompts: int = 2000
    """Generated training prompts (ignored when train_path is set)."""
    num_eval_prompts: int = 20
    """Generated held-out prompts (ignored when eval_path is set)."""
    train_path: str | None = None
    """Local .jsonl/.parquet with one prompt per record (keys prompt_key, answer_key)."""
    eval_path: str | None = None
    """Local .jsonl/.parquet of held-out prompts."""
    prompt_key: str = "prompt"
    """Field of the prompt text in prompt files."""
    answer_key: str = "answer"
    """Field of the ground-truth answer in prompt files."""
    skip_malformed: bool = False
    """False: a malformed line in a prompt file stops the run naming the line. True: skip and count."""
    reward_fn: str | None = None
    """Reward function as 'package.module:function' (fn(response, answer) -> float); None = the task's."""
    reward_timeout_s: float = 5.0
    """Per-sample reward timeout; a timeout or an exception scores 0 and is counted."""
    reward_workers: int = 1
    """Reward worker processes per rollout worker."""
    reward_pool: RewardPoolConfig = field(default_factory=RewardPoolConfig)
    """Guards against a slow or broken reward function: concurrent timeouts, a batch budget, the
    failure warning and the stop on an all-error batch."""
    sandbox: str = "bwrap"
    """Isolation of model-written code (the code reward): 'bwrap' (bubblewrap namespaces, read-only
    file system, unprivileged uid; the run refuses to start without bwrap) or 'weak' (resource
    limits and audit hooks only). Set for every actor as AREAL_LIKE_SANDBOX."""
    prompt_template: str = "{question}"
    """The user message made from a record's prompt text, which replaces '{question}' (or its alias
    '{prompt}'); other braces stay literal, e.g.
    "{question}\\nPlease reason step by step, and put your final answer within \\\\boxed{}."."""
    chat_template: bool = False
    """Wrap the user message in the tokenizer's chat template with the generation prompt (Qwen's
    ChatML: a system turn, the user turn, then the opening of the assistant turn); needs a tokenizer
    with one (``model.build.tokenizer: qwen`` or a local instruct model)."""
    system_prompt: str | None = None
    """System message before the user message (needs ``chat_template``); None = none, so the
    template's default applies (Qwen2.5: 'You are Qwen, created by Alibaba Cloud. ...')."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Variables the chat template reads besides the messages, handed to ``apply_chat_template``;
    e.g. {enable_thinking: false} for Qwen3's template (no thinking block). Needs ``chat_template``."""
    max_prompt_tokens: int | None = None
    """Drop prompts longer than this many tokens (after the templates) from both sets, counted in
    the log; None keeps every prompt."""
    warmup_steps: int = 0
    """Supervised warm-up steps on the task's demonstrations before RL (calculator: the tool-call
    format, see areal_like/tasks/calculator.py), written once to run.dir/warmup_model; 0 = none."""

    def __post_init__(self) -> None:
        for name in (
            "max_operand",
            "num_operands",
            "num_train_prompts",
            "num_eval_prompts",
            "reward_workers",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"task.{name}={getattr(self, name)}: must be >= 1")
        if self.reward_timeout_s <= 0:
            raise ValueError(f"task.reward_timeout_s={self.reward_timeout_s}: must be > 0")
        if self.sandbox not in ("bwrap", "weak"):
            raise ValueError(f"task.sandbox={self.sandbox!r}: allowed values are 'bwrap', 'weak'")
        if "{question}" not in self.prompt_template and "{prompt}" not in self.prompt_template:
            raise ValueError(
                f"task.prompt_template={self.prompt_template!r} has no '{{question}}' placeholder for the "
                "prompt text; e.g. '{question}\\nPut your final answer after ####.'"
            )
        if self.system_prompt is not None and not self.chat_template:
            raise ValueError(
                f"task.system_prompt={self.system_prompt!r} needs task.chat_template=true (a system "
                "message exists only in a chat template); set it, or put the text in task.prompt_template"
            )
        if self.chat_template_kwargs and not self.chat_template:
            raise ValueError(
                f"task.chat_template_kwargs={dict(self.chat_template_kwargs)} needs task.chat_template=true "
                "(they are variables of the chat template)"
            )
        check_template_kwargs("task.chat_template_kwargs", self.chat_template_kwargs)
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"task.max_prompt_tokens={self.max_prompt_tokens}: must be >= 1 or null")
        if self.warmup_steps < 0:
            raise ValueError(f"task.warmup_steps={self.warmup_steps}: must be >= 0 (0 = no warm-up)")


@dataclass
class EvalConfig:
    """Held-out evaluation with greedy decoding through the rollout engines."""

    every_steps: int = 0
    """Evaluate every this many steps; 0 = only before the first and after the last step."""
    enabled: bool = True
    """Run the before/after evaluation at all."""

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            raise ValueError(f"eval.every_steps={self.every_steps}: must be >= 0")


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    ray: RayConfig = field(default_factory=RayConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    datastore: DataStoreConfig = field(default_factory=DataStoreConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    realloc: ReallocConfig = field(default_factory=ReallocConfig)
    preflight: PreflightConfig = field(default_factory=PreflightConfig)

    def __post_init__(self) -> None:
        samples = self.train.batch_groups * self.rollout.group_size
        if self.train.batch_groups % self.train.num_ranks:
            raise ValueError(
                f"train.batch_groups={self.train.batch_groups} is not divisible by train.num_ranks="
                f"{self.train.num_ranks}: each rank trains on whole groups; pick a multiple of num_ranks"
            )
        if self.train.ppo_minibatches > samples:
            raise ValueError(
                f"train.ppo_minibatches={self.train.ppo_minibatches} exceeds the {samples} samples of a "
                "batch "
                "(train.batch_groups * rollout.group_size)"
            )
        self._check_devices()
        if self.train.reward.overlong_tokens >= self.rollout.max_new_tokens:
            raise ValueError(
                f"train.reward.overlong_tokens={self.train.reward.overlong_tokens} must be below "
                f"rollout.max_new_tokens={self.rollout.max_new_tokens}"
            )

    def _check_devices(self) -> None:
        devices, engine = self.placement.devices, self.rollout.engine
        if engine == "vllm" and devices == "cpu":
            raise ValueError(
                "rollout.engine='vllm' needs GPUs: set placement.devices='split' (engines and trainer on "
                "different GPUs) or 'colocated' (they share them)"
            )
        if devices == "colocated":
            if engine != "vllm":
                raise ValueError("placement.devices='colocated' needs rollout.engine='vllm' (it sleeps)")
            if self.rollout.num_workers != self.train.num_ranks:
                raise ValueError(
                    f"placement.devices='colocated': rollout.num_workers={self.rollout.num_workers} must "
                    f"equal train.num_ranks={self.train.num_ranks} (one engine per trainer GPU)"
                )
        wrong_path = self.realloc.backend != "nccl" or self.realloc.placement != devices
        if self.realloc.enabled and devices != "cpu" and wrong_path:
            raise ValueError(
                f"realloc.enabled with placement.devices={devices!r} needs realloc.backend='nccl' and "
                f"realloc.placement={devices!r} (got {self.realloc.backend!r}, {self.realloc.placement!r})"
            )
        if self.realloc.enabled and devices == "cpu" and self.realloc.placement == "colocated":
            raise ValueError("realloc.placement='colocated' needs GPUs: set placement.devices='colocated'")

    @property
    def max_concurrent_groups(self) -> int:
        return self.rollout.max_concurrent_groups or self.train.batch_groups


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for key in node:
        path = f"{prefix}{key}"
        keys.append(path)
        child = (
            OmegaConf.select(node, str(key), throw_on_missing=False) if OmegaConf.is_config(node) else None
        )
        if OmegaConf.is_dict(child):
            keys.extend(_all_keys(child, prefix=path + "."))
    return keys


def _unknown_key_error(schema: Any, key: str, source: str) -> ConfigError:
    known = _all_keys(schema)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    section = key.rsplit(".", 1)[0] if "." in key else ""
    siblings = sorted(
        k.rsplit(".", 1)[-1] for k in known if (k.rsplit(".", 1)[0] if "." in k else "") == section
    )
    return ConfigError(
        f"unknown config key '{key}' in {source}.{hint} Keys allowed here: {', '.join(siblings)}"
    )


def _merge(schema: Any, update: Any, source: str) -> Any:
    try:
        return OmegaConf.merge(schema, update)
    except ConfigKeyError as err:
        raise _unknown_key_error(schema, str(err.full_key), source) from None
    except ValidationError as err:
        raise ConfigError(
            f"invalid value for '{err.full_key}' in {source}: {err.msg.splitlines()[0]}"
        ) from None


def load_config(path: str | None, overrides: list[str] | None = None, schema_class: type = Config):
    """Schema defaults <- YAML file <- ``key=value`` overrides, validated into ``schema_class``
    (the run ``Config`` unless another dataclass, e.g. the SFT config, is given)."""
    schema = OmegaConf.structured(schema_class)
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(
                f"config file not found: {path!r} (recipes live in configs/, e.g. configs/quickstart.yaml)"
            )
        try:
            recipe = OmegaConf.load(path)
        except Exception as err:  # yaml errors carry the line number
            raise ConfigError(f"cannot parse config file {path!r}: {err}") from None
        schema = _merge(schema, recipe, f"config file {path!r}")
    dotlist = []
    for item in overrides or []:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.max_steps=20)")
        dotlist.append(item)
    if dotlist:
        try:
            parsed = OmegaConf.from_dotlist(dotlist)
        except OmegaConfBaseException as err:
            raise ConfigError(f"cannot parse overrides {dotlist}: {err}") from None
        schema = _merge(schema, parsed, "overrides")
    missing = sorted(OmegaConf.missing_keys(schema))
    if missing:
        raise ConfigError(
            f"config keys without a value: {', '.join(missing)} (set them in the recipe or as key=value)"
        )
    try:
        return OmegaConf.to_object(schema)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    except OmegaConfBaseException as err:
        raise ConfigError(str(err).splitlines()[0]) from None


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))
