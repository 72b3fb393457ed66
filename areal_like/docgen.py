"""The configuration reference (docs/configuration.md), generated from the config dataclasses.

Field docs are the string literals written under each field (read from the source with ``ast``, as
Python keeps no runtime record of them). ``python -m areal_like.docgen`` rewrites the page;
``--check`` exits 1 when the committed page is out of date (a test runs that check).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import sys
import textwrap
import typing

from areal_like.config import Config

DOC_PATH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "configuration.md"
)


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under the fields of dataclass ``cls``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    class_def = tree.body[0]
    assert isinstance(class_def, ast.ClassDef), f"{cls.__name__}: source does not start with a class"
    body = class_def.body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def _type_name(tp) -> str:
    text = getattr(tp, "__name__", None) if not typing.get_args(tp) else None
    text = text or str(tp).replace("typing.", "").replace("NoneType", "None")
    return text.replace("|", "\\|")  # a markdown table cell


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
        return "(required)" if str(value) == "???" else f"`{value!r}`"
    return "(section)" if field.default_factory is not dataclasses.MISSING else "(required)"


def render(root: type = Config) -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from the config dataclasses by `python -m areal_like.docgen`; do not edit by hand.",
        "Set any key in a YAML recipe or as a `key=value` override, e.g. `rollout.max_staleness=4`.",
        "",
    ]

    def section(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        rows: list[str] = []
        children: list[tuple[type, str]] = []
        for field in dataclasses.fields(cls):
            tp = hints[field.name]
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                children.append((tp, f"{prefix}{field.name}."))
                continue
            key, meaning = f"{prefix}{field.name}", docs.get(field.name, "")
            rows.append(f"| `{key}` | {_type_name(tp)} | {_default(field)} | {meaning} |")
        if rows:
            title = prefix.rstrip(".") or "top level"
            doc = inspect.cleandoc(cls.__doc__ or "")
            lines.extend(
                [f"## `{title}`", "", doc, "", "| key | type | default | meaning |", "|---|---|---|---|"]
            )
            lines.extend(rows)
            lines.append("")
        for child, child_prefix in children:
            section(child, child_prefix)

    section(root, "")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if "--check" in argv:
        current = ""
        if os.path.exists(DOC_PATH):
            with open(DOC_PATH) as f:
                current = f.read()
        if current != text:
            print(
                f"{DOC_PATH} is out of date: run `python -m areal_like.docgen` and commit it", file=sys.stderr
            )
            return 1
        return 0
    os.makedirs(os.path.dirname(DOC_PATH), exist_ok=True)
    with open(DOC_PATH, "w") as f:
        f.write(text)
    print(DOC_PATH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
