"""The product packages form layers, and imports point only down (or within a layer).

Layers, lowest first (docs/architecture.md draws them):
1. ``datastore``: the streaming store; knows nothing of RL or of this project.
2. ``areal_like.core``: records, model/tokenizer loading, digests, parameter reallocation; no Ray.
3. ``rollout`` and ``trainer``: the two meshes; neither imports the other.
4. ``areal_like`` (everything outside ``core``): CLI, config composition, controller, placement...

Each rule is checked on the import statements of every module (read with ``ast``, so imports
inside functions and under ``TYPE_CHECKING`` count too). A second test imports every config module
in a fresh interpreter and checks that neither torch nor Ray was loaded.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCT_PACKAGES = ("datastore", "areal_like", "rollout", "trainer")

# What each layer may import from the product packages (its own layer is always allowed, except
# that the two meshes in layer 3 are kept apart by name).
ALLOWED = {
    "datastore": {"datastore"},
    "core": {"datastore", "core"},
    "rollout": {"datastore", "core", "rollout"},
    "trainer": {"datastore", "core", "trainer"},
    "top": {"datastore", "core", "rollout", "trainer", "top"},
}
# Third-party modules a layer must not import at all.
FORBIDDEN_THIRD_PARTY = {"core": {"ray"}}
# Config modules: composing a config must load neither torch nor Ray.
CONFIG_MODULES = (
    "areal_like.config",
    "areal_like.placement",
    "areal_like.core.models",
    "areal_like.core.realloc.config",
    "datastore.config",
    "rollout.config",
    "trainer.config",
)


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    imported: str
    rule: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: imports {self.imported}: {self.rule}"


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name, or None for modules outside the product packages."""
    parts = module.split(".")
    if parts[0] == "areal_like":
        return "core" if len(parts) > 1 and parts[1] == "core" else "top"
    return parts[0] if parts[0] in PRODUCT_PACKAGES else None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in a file, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name in PRODUCT_PACKAGES:  # ``from areal_like import launch``: the names are modules
                found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, name))
    return found


def check_file(path: Path) -> list[Violation]:
    own = layer_of(module_name(path))
    assert own is not None
    violations = []
    for line, imported in imported_modules(path):
        top = imported.split(".")[0]
        if top in FORBIDDEN_THIRD_PARTY.get(own, set()):
            rule = f"layer '{own}' must not import {top}"
            violations.append(Violation(str(path.relative_to(ROOT)), line, imported, rule))
            continue
        target = layer_of(imported)
        if target is None or imported == "areal_like":
            continue  # third party, or the (empty) top-level package namespace
        if target not in ALLOWED[own]:
            rule = f"layer '{own}' may import only {sorted(ALLOWED[own])}, not '{target}'"
            violations.append(Violation(str(path.relative_to(ROOT)), line, imported, rule))
    return violations


def product_files() -> list[Path]:
    return sorted(p for pkg in PRODUCT_PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_no_product_module_imports_up_a_layer():
    violations = [v for path in product_files() for v in check_file(path)]
    assert not violations, "imports that point up a layer:\n" + "\n".join(map(str, violations))


def test_the_checker_names_the_file_line_and_rule_of_an_upward_import(tmp_path, monkeypatch):
    # A core module that reaches up into the controller, and one that imports Ray: both caught.
    fake_root = tmp_path
    (fake_root / "areal_like" / "core").mkdir(parents=True)
    bad = fake_root / "areal_like" / "core" / "bad.py"
    bad.write_text("import os\n\nfrom areal_like.controller import RLController\nimport ray.util\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake_root)
    violations = check_file(bad)
    assert [(v.line, v.imported) for v in violations] == [(3, "areal_like.controller"), (4, "ray.util")]
    assert "layer 'core' may import only" in violations[0].rule and "'top'" in violations[0].rule
    assert str(violations[0]).startswith("areal_like/core/bad.py:3: imports areal_like.controller")


def test_the_two_meshes_do_not_import_each_other(tmp_path, monkeypatch):
    (tmp_path / "rollout").mkdir()
    bad = tmp_path / "rollout" / "x.py"
    bad.write_text("def f():\n    from trainer.worker import TrainerRank\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert [v.imported for v in check_file(bad)] == ["trainer.worker"]


@pytest.mark.parametrize("module", CONFIG_MODULES)
def test_importing_a_config_module_loads_neither_torch_nor_ray(module):
    code = (
        f"import sys, {module}\n"
        "heavy = [m for m in ('torch', 'ray') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import {module} loaded {out.stdout.strip()}"
