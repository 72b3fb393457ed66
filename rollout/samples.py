"""From finished requests to datastore writes: trajectories, per-sample metadata, dynamic sampling.

Pure functions over records, used by the rollout worker (``rollout/worker.py``) once every sample
of a prompt group has finished and been scored:
- ``build_group_writes`` turns the group's outputs and rewards into ``SampleWrite`` records: the
  training columns of ``Trajectory`` (with the loss mask of multi-turn episodes) plus one
  ``sample_meta`` column (``SAMPLE_META_DTYPE``) that says which engine made the sample, its token
  versions and lengths, its turns, why it ended and how long it took. Trainers ignore the
  column; analysis reads it back with ``SampleMetadata.from_column``.
- ``rewards_all_equal`` is the dynamic-sampling rule (DAPO): a group whose rewards are all equal
  has zero advantage everywhere, so it teaches nothing and is dropped (and counted) before it
  reaches the datastore; the staleness gate then frees its slot, so the batch is refilled.
- ``ForcedLengths`` and ``forced_length`` (throughput benchmarks only, never a config key): eos is
  ignored and every response runs to a lognormal length fixed by its (group id, index).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

from areal_like.core.types import GenerationOutput, PromptGroup, Trajectory
from datastore.types import SampleWrite
from rollout.rewards import RewardResult

META_COLUMN = "sample_meta"
"""Datastore column holding each sample's ``SampleMetadata`` as a structured array [1]."""

SAMPLE_META_DTYPE = np.dtype(
    [
        ("engine_id", np.int32),
        ("group_id", np.int64),
        ("index", np.int32),
        ("prompt_len", np.int32),
        ("response_len", np.int32),
        ("version_min", np.int64),
        ("version_max", np.int64),
        ("num_versions", np.int32),
        ("admitted_version", np.int64),
        ("finish_reason", "U8"),
        ("reward_status", "U8"),
        ("latency_s", np.float32),
        ("num_turns", np.int32),
        ("env_tokens", np.int32),
    ]
)


@dataclass(frozen=True)
class SampleMetadata:
    """What is known about how one sample was made (one row of ``SAMPLE_META_DTYPE``)."""

    engine_id: int
    """The engine (= rollout worker id) that generated every token of the sample."""
    group_id: int
    index: int
    """Position of the sample in its group."""
    prompt_len: int
    response_len: int
    version_min: int
    """Policy version of the oldest response token (-1 for an empty response)."""
    version_max: int
    num_versions: int
    """Distinct versions among the sampled response tokens: > 1 means a weight update interrupted it."""
    admitted_version: int
    """Policy version when the staleness gate admitted the group."""
    finish_reason: str
    """'stop' (eos), 'length' (max_new_tokens) or 'abort'."""
    reward_status: str
    """'ok', 'error' or 'timeout' (see ``RewardResult``)."""
    latency_s: float
    """Seconds from submit to the engine until the request (or the whole episode) finished."""
    num_turns: int = 1
    """Model turns of the episode (1 for single-turn)."""
    env_tokens: int = 0
    """Response tokens the environment appended (loss mask 0); 0 for single-turn."""

    def column(self) -> np.ndarray:
        """This record as a structured array [1] of ``SAMPLE_META_DTYPE``."""
        return np.array([tuple(getattr(self, f.name) for f in fields(self))], dtype=SAMPLE_META_DTYPE)

    @classmethod
    def from_column(cls, column: np.ndarray) -> SampleMetadata:
        row = column[0]
        return cls(**{f.name: row[f.name].item() for f in fields(cls)})


def build_group_writes(
    group: PromptGroup,
    outputs: list[GenerationOutput],
    scores: list[RewardResult],
    latencies_s: list[float],
    engine_id: int,
    episodes: list[EpisodeShape] | None = None,
) -> list[SampleWrite]:
    """One ``SampleWrite`` per sample of ``group``: training columns plus the ``sample_meta`` column.

    ``episodes`` (multi-turn only): each sample's own prompt ids and turn count; the outputs then
    carry a ``loss_mask`` (0 on environment tokens). None: every prompt is the group's."""
    assert len(outputs) == len(scores) == len(latencies_s) == group.num_samples, (
        len(outputs),
        len(scores),
        group.num_samples,
    )
    assert episodes is None or len(episodes) == group.num_samples
    writes = []
    for index, (output, score, latency_s) in enumerate(zip(outputs, scores, latencies_s, strict=True)):
        shape = episodes[index] if episodes is not None else EpisodeShape(group.prompt_ids, 1)
        loss_mask = None if output.loss_mask is None else np.asarray(output.loss_mask, dtype=np.int8)
        trajectory = Trajectory(
            group_id=group.group_id,
            index=index,
            group_size=group.num_samples,
            prompt_ids=np.asarray(shape.prompt_ids, dtype=np.int64),
            response_ids=np.asarray(output.response_ids, dtype=np.int64),
            behav_logprobs=np.asarray(output.logprobs, dtype=np.float32),
            versions=np.asarray(output.versions, dtype=np.int64),
            reward=score.value,
            finish_reason=output.finish_reason,
            engine_id=engine_id,
            reward_status=score.status,
            loss_mask=loss_mask,
        )
        meta = SampleMetadata(
            engine_id=engine_id,
            group_id=group.group_id,
            index=index,
            prompt_len=len(shape.prompt_ids),
            response_len=len(output.response_ids),
            version_min=trajectory.min_version,
            version_max=trajectory.max_version,
            num_versions=len(set(trajectory.sampled_versions.tolist())),
            admitted_version=group.admitted_version,
            finish_reason=output.finish_reason,
            reward_status=score.status,
            latency_s=latency_s,
            num_turns=shape.num_turns,
            env_tokens=0 if loss_mask is None else int((loss_mask == 0).sum()),
        )
        write = trajectory.sample_write()
        write.columns[META_COLUMN] = meta.column()
        writes.append(write)
    return writes


@dataclass(frozen=True)
class EpisodeShape:
    """What a multi-turn sample has of its own: the prompt the environment's ``reset`` gave it."""

    prompt_ids: Sequence[int]
    """Prompt token ids [P] of this sample (an episode's first observation, chat-formatted)."""
    num_turns: int
    """Model turns in the episode."""


def rewards_all_equal(scores: list[RewardResult]) -> bool:
    """The dynamic-sampling filter: True when every sample of a group got the same reward."""
    return len({score.value for score in scores}) <= 1


@dataclass(frozen=True)
class ForcedLengths:
    """Throughput benchmarks: ignore eos and force every response to a length drawn from a lognormal
    (``forced_length``), capped at ``rollout.max_new_tokens``. A benchmark passes it to
    ``run_training``, which hands it to every rollout worker; training runs never set it (they
    sample until eos or max_new_tokens)."""

    median: int
    """Median forced length in tokens; at most ``rollout.max_new_tokens``."""
    sigma: float = 1.0
    """Spread of the forced lengths (sigma of log length); with 1.0, ~2% of responses reach a cap
    8x the median."""

    def __post_init__(self) -> None:
        if self.median < 1:
            raise ValueError(f"ForcedLengths.median={self.median}: must be >= 1 token")
        if self.sigma < 0:
            raise ValueError(f"ForcedLengths.sigma={self.sigma}: must be >= 0 (0 = every length the median)")

    def check_cap(self, max_new_tokens: int) -> None:
        """Refuse a median above the cap (most responses would be cut to the cap)."""
        if self.median > max_new_tokens:
            raise ValueError(
                f"ForcedLengths.median={self.median}: must be in [1, rollout.max_new_tokens="
                f"{max_new_tokens}]; lower the median or raise rollout.max_new_tokens"
            )


def forced_length(median: int, sigma: float, cap: int, group_id: int, index: int) -> int:
    """A response length from a lognormal with ``median`` and ``sigma``, in [1, cap], fixed by the
    sample's (group id, index) so that every run and every placement gets the same length mix."""
    rng = np.random.default_rng((group_id, index))
    length = int(round(median * float(np.exp(sigma * rng.standard_normal()))))
    return min(max(length, 1), cap)
