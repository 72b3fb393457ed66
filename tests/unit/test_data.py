from __future__ import annotations

import json
import logging
import sys

import pytest

from areal_like.core.data import MAX_REPORTED_LINES, load_prompts
from areal_like.core.types import PromptRecord


def write_lines(tmp_path, lines: list[str], name: str = "prompts.jsonl") -> str:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


GOOD = json.dumps({"prompt": "1+1=", "answer": "2"})


def test_well_formed_jsonl_loads_with_file_and_line_ids(tmp_path):
    path = write_lines(tmp_path, [GOOD, "", "   ", json.dumps({"prompt": "2+2=", "answer": 4, "extra": 1})])
    result = load_prompts(path)
    assert result.records == [
        PromptRecord(prompt_id="prompts.jsonl:1", text="1+1=", answer="2"),
        PromptRecord(prompt_id="prompts.jsonl:4", text="2+2=", answer="4"),
    ]
    assert result.num_skipped == 0 and result.skipped_lines == []


def test_custom_keys_are_read(tmp_path):
    path = write_lines(tmp_path, [json.dumps({"question": "q", "solution": 1.5})])
    assert load_prompts(path, prompt_key="question", answer_key="solution").records[0].answer == "1.5"


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"prompt": "x"}), "missing key 'answer'"),
        (json.dumps({"prompt": 3, "answer": "3"}), "'prompt' is int"),
        (json.dumps({"prompt": "x", "answer": None}), "'answer' is NoneType"),
        (json.dumps({"prompt": "x", "answer": True}), "'answer' is bool"),
        (json.dumps({"prompt": "  ", "answer": "1"}), "'prompt' is empty"),
    ],
)
def test_malformed_line_raises_with_file_line_and_reason(tmp_path, bad_line, reason):
    path = write_lines(tmp_path, [GOOD, bad_line, GOOD])
    with pytest.raises(ValueError, match="prompts.jsonl: line 2: ") as excinfo:
        load_prompts(path)
    assert reason in str(excinfo.value)


def test_invalid_utf8_is_a_malformed_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(GOOD.encode() + b"\n\xff\xfe\n")
    with pytest.raises(ValueError, match="line 2: not valid UTF-8"):
        load_prompts(str(path))


def test_skip_malformed_counts_skipped_lines_and_warns_once(tmp_path, caplog):
    lines = [GOOD if i % 3 == 0 else "{bad" for i in range(60)]
    path = write_lines(tmp_path, lines)
    with caplog.at_level(logging.WARNING, logger="areal_like.core.data"):
        result = load_prompts(path, skip_malformed=True)
    assert len(result.records) == 20 and result.num_skipped == 40
    expected_lines = [i + 1 for i in range(60) if i % 3 != 0][:MAX_REPORTED_LINES]
    assert result.skipped_lines == expected_lines
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 40 malformed rows" in warnings[0].getMessage()


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        load_prompts(str(tmp_path / "nowhere.jsonl"))


def test_file_without_prompts_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no usable prompts"):
        load_prompts(write_lines(tmp_path, ["", "  "]))
    with pytest.raises(ValueError, match=r"no usable prompts \(2 malformed"):
        load_prompts(write_lines(tmp_path, ["{bad", "{bad"]), skip_malformed=True)


def test_unsupported_extension_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=".jsonl or .parquet"):
        load_prompts(write_lines(tmp_path, [GOOD], name="prompts.csv"))


def test_parquet_without_pyarrow_names_the_package(tmp_path, monkeypatch):
    path = tmp_path / "prompts.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        load_prompts(str(path))


def test_parquet_rows_load_like_jsonl(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = str(tmp_path / "prompts.parquet")
    pq.write_table(pa.table({"prompt": ["1+1=", ""], "answer": ["2", "0"]}), path)
    result = load_prompts(path, skip_malformed=True)
    assert result.records == [PromptRecord(prompt_id="prompts.parquet:1", text="1+1=", answer="2")]
    assert result.skipped_lines == [2]
