from __future__ import annotations

from areal_like.docgen import DOC_PATH, field_docs, render
from rollout.config import RolloutConfig


def test_configuration_reference_is_up_to_date():
    with open(DOC_PATH) as f:
        committed = f.read()
    assert committed == render(), (
        "docs/configuration.md is stale: run `python -m areal_like.docgen` and commit"
    )


def test_every_config_field_has_a_docstring():
    text = render()
    assert "| `rollout.max_staleness` | int | `1` |" in text
    for line in text.splitlines():
        if line.startswith("| `"):
            assert not line.rstrip().endswith("|  |"), f"config field without a docstring: {line}"


def test_field_docs_reads_the_string_under_each_field():
    assert "eta" in field_docs(RolloutConfig)["max_staleness"]
