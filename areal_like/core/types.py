"""Typed records that cross actor boundaries in the RL loop.

Producers and consumers:
- ``PromptRecord``: made by the dataset loaders and tasks (``areal_like.core.data``, ``areal_like.tasks``),
  held by the prompt dispatcher, handed to rollout workers inside a ``PromptGroup``.
- ``PromptGroup``: made by the dispatcher when the staleness gate admits a prompt, consumed by a
  rollout worker, which generates ``num_samples`` responses for it.
- ``GenerationOutput``: returned by a generation engine for one request; also the whole response of
  a multi-turn episode (``rollout.episode``), whose environment tokens carry ``loss_mask`` 0.
- ``Trajectory``: made by a rollout worker (one per response or episode), written to the datastore
  as columns (see ``TRAJECTORY_COLUMNS``), read back by trainer ranks.

Shape legend: P = prompt length, R = response length (tokens).
Multi-turn responses interleave model-sampled tokens (loss mask 1) with environment tokens (tool
results, chat-template glue; loss mask 0). Environment tokens carry placeholder values that the
mask excludes: behaviour log-prob 0.0 and version ``ENV_TOKEN_VERSION``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datastore.types import SampleWrite

# Datastore column names under which a trajectory is stored.
TRAJECTORY_COLUMNS = ("prompt_ids", "response_ids", "behav_logprobs", "versions", "reward", "loss_mask")

ENV_TOKEN_VERSION = -1
"""Version recorded for an environment token (no policy produced it); the trainer's log-linear
proximal approximation leaves tokens with a negative version untouched."""


@dataclass(frozen=True)
class PromptRecord:
    """One prompt with its ground truth, as loaded from a dataset or made by a task."""

    prompt_id: str
    """Stable id (file name + line, or task name + index); used in logs and reports."""
    text: str
    """Prompt text fed to the tokenizer."""
    answer: str
    """Ground truth the reward function compares against."""


@dataclass(frozen=True)
class PromptGroup:
    """A prompt admitted for generation: ``num_samples`` responses will be sampled for it."""

    group_id: int
    """Unique over the whole run (the dispatcher's counter, checkpointed)."""
    prompt: PromptRecord
    prompt_ids: tuple[int, ...]
    """Token ids of the prompt [P]."""
    num_samples: int
    admitted_version: int
    """Policy version at admission (the staleness gate's clock)."""


@dataclass
class GenerationOutput:
    """One finished request from a generation engine."""

    response_ids: list[int]
    """Generated token ids [R], eos included when the model stopped."""
    logprobs: list[float]
    """Behaviour log-prob of each generated token under the sampling distribution [R]."""
    versions: list[int]
    """Policy version of the weights that produced each token [R], set by the engine."""
    finish_reason: str
    """'stop' (eos), 'length' (max_new_tokens reached) or 'abort'; an episode adds 'turns',
    'timeout' and 'error' (see ``rollout.episode``)."""
    loss_mask: list[int] | None = None
    """1 on tokens the engine sampled, 0 on environment tokens [R]; None = every token sampled."""


@dataclass
class Trajectory:
    """One sampled response with its reward, as written to the datastore."""

    group_id: int
    index: int
    """Position of this sample within its group, 0..group_size-1."""
    group_size: int
    prompt_ids: np.ndarray
    """int64 [P]"""
    response_ids: np.ndarray
    """int64 [R]"""
    behav_logprobs: np.ndarray
    """float32 [R]"""
    versions: np.ndarray
    """int64 [R] policy version per response token."""
    reward: float
    finish_reason: str
    engine_id: int = 0
    reward_status: str = "ok"
    """'ok', 'error' (the reward function raised) or 'timeout'."""
    loss_mask: np.ndarray | None = None
    """int8 [R] 1 on model-sampled tokens, 0 on environment tokens; None = all sampled (single-turn)."""

    def __post_init__(self) -> None:
        num = len(self.response_ids)
        assert len(self.behav_logprobs) == len(self.versions) == num, (num, len(self.versions))
        assert self.loss_mask is None or len(self.loss_mask) == num, (num, len(self.loss_mask))

    @property
    def sample_id(self) -> str:
        return f"{self.group_id}:{self.index}"

    @property
    def sampled_versions(self) -> np.ndarray:
        """Versions of the model-sampled tokens only: staleness is about what a policy produced."""
        if self.loss_mask is None:
            return self.versions
        return self.versions[np.asarray(self.loss_mask, dtype=bool)]

    @property
    def min_version(self) -> int:
        """Version of the oldest sampled token (-1 when nothing was sampled)."""
        versions = self.sampled_versions
        return int(versions.min()) if len(versions) else -1

    @property
    def max_version(self) -> int:
        versions = self.sampled_versions
        return int(versions.max()) if len(versions) else -1

    def sample_write(self) -> SampleWrite:
        """The trajectory as the datastore stores it: its columns plus the metadata readers select on."""
        return SampleWrite(
            sample_id=self.sample_id,
            group_id=self.group_id,
            group_size=self.group_size,
            columns=self.columns(),
            min_version=self.min_version,
            max_version=self.max_version,
            length=len(self.prompt_ids) + len(self.response_ids),
        )

    def columns(self) -> dict[str, np.ndarray]:
        """The trajectory as datastore columns (names in ``TRAJECTORY_COLUMNS``)."""
        return {
            "prompt_ids": self.prompt_ids,
            "response_ids": self.response_ids,
            "behav_logprobs": self.behav_logprobs,
            "versions": self.versions,
            "reward": np.asarray([self.reward], dtype=np.float32),
            "loss_mask": (
                np.ones(len(self.response_ids), dtype=np.int8)
                if self.loss_mask is None
                else np.asarray(self.loss_mask, dtype=np.int8)
            ),
        }
