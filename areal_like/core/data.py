"""Prompt files: local ``.jsonl`` (no extra dependency) or ``.parquet`` (needs pyarrow).

Every row needs a non-empty string prompt and a string (or number) answer. A malformed row either
stops the load with its file and 1-based line number (the default: nothing from the file is used)
or, with ``skip_malformed=True``, is skipped and counted. Blank jsonl lines are not rows.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from areal_like.core.types import PromptRecord

logger = logging.getLogger(__name__)

MAX_REPORTED_LINES = 20
"""How many skipped line numbers a ``PromptLoadResult`` keeps."""


@dataclass
class PromptLoadResult:
    """What ``load_prompts`` read from one file."""

    records: list[PromptRecord]
    """The well-formed prompts, in file order."""
    num_skipped: int = 0
    """Malformed rows skipped (only with ``skip_malformed=True``)."""
    skipped_lines: list[int] = field(default_factory=list)
    """1-based line (parquet: row) numbers of the first ``MAX_REPORTED_LINES`` skipped rows."""


class _MalformedRow(Exception):
    """A row that cannot become a PromptRecord; the message is the reason."""


def load_prompts(
    path: str, prompt_key: str = "prompt", answer_key: str = "answer", skip_malformed: bool = False
) -> PromptLoadResult:
    """Read prompts from a local ``.jsonl`` or ``.parquet`` file; ``prompt_id`` is "<basename>:<line>"."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"prompt file {path!r} does not exist")
    if path.endswith(".jsonl"):
        rows = _jsonl_rows(path)
    elif path.endswith(".parquet"):
        rows = _parquet_rows(path, (prompt_key, answer_key))
    else:
        raise ValueError(f"prompt file {path!r} has an unsupported extension; use .jsonl or .parquet")

    basename = os.path.basename(path)
    result = PromptLoadResult(records=[])
    for line_no, row in rows:
        try:
            prompt, answer = _parse_row(row, prompt_key, answer_key)
        except _MalformedRow as e:
            if not skip_malformed:
                raise ValueError(
                    f"{path}: line {line_no}: {e}; fix the line or pass skip_malformed=True"
                ) from None
            result.num_skipped += 1
            if len(result.skipped_lines) < MAX_REPORTED_LINES:
                result.skipped_lines.append(line_no)
            continue
        result.records.append(PromptRecord(prompt_id=f"{basename}:{line_no}", text=prompt, answer=answer))

    if result.num_skipped:
        logger.warning(
            "%s: skipped %d malformed rows (first line numbers: %s)",
            path, result.num_skipped, result.skipped_lines,
        )  # fmt: skip
    if not result.records:
        raise ValueError(f"prompt file {path!r} has no usable prompts ({result.num_skipped} malformed rows)")
    logger.info("loaded %d prompts from %s", len(result.records), path)
    return result


def _jsonl_rows(path: str) -> Iterator[tuple[int, object]]:
    """(line number, decoded JSON value) per non-blank line; undecodable lines yield a _MalformedRow."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                yield line_no, _MalformedRow("not valid UTF-8")
                continue
            if not line:
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                yield line_no, _MalformedRow(f"invalid JSON ({e.msg} at column {e.colno})")


def _parquet_rows(path: str, keys: tuple[str, str]) -> Iterator[tuple[int, object]]:
    """(row number, row dict) per parquet row, reading only the two key columns."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"reading {path!r} needs pyarrow; install it with `pip install pyarrow`") from e
    table = pq.read_table(path)
    missing = [key for key in keys if key not in table.column_names]
    if missing:
        raise ValueError(f"{path}: columns {missing} not found; the file has columns {table.column_names}")
    for index, row in enumerate(table.select(list(keys)).to_pylist()):
        yield index + 1, row


def _parse_row(row: object, prompt_key: str, answer_key: str) -> tuple[str, str]:
    """(prompt, answer) of one row; raises _MalformedRow with the reason."""
    if isinstance(row, _MalformedRow):
        raise row
    if not isinstance(row, dict):
        raise _MalformedRow(f"expected a JSON object, got {type(row).__name__}")
    for key in (prompt_key, answer_key):
        if key not in row:
            raise _MalformedRow(f"missing key {key!r} (keys: {sorted(row)})")
    prompt, answer = row[prompt_key], row[answer_key]
    if not isinstance(prompt, str):
        raise _MalformedRow(f"{prompt_key!r} is {type(prompt).__name__}, expected a string")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str):
        raise _MalformedRow(f"{answer_key!r} is {type(answer).__name__}, expected a string or a number")
    if not prompt.strip():
        raise _MalformedRow(f"{prompt_key!r} is empty")
    if not answer.strip():
        raise _MalformedRow(f"{answer_key!r} is empty")
    return prompt, answer
