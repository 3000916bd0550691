"""The import graph: layers import only downward, so the packages form no cycle.

Every module of ``tuner``, ``evaluators`` and ``search_spaces`` (and the benchmarks) is parsed with ``ast``; every
import counts, at the top of a module or inside a function (``TYPE_CHECKING`` blocks too). From the bottom up:

0. the engine ``tuner.evoprune`` and the demo model ``tuner.demo`` (and the ``tuner`` package's ``__init__``);
0b. ``tuner.mllm`` (multimodal LLMs prepared with the engine: prompts rewritten to the pruned token count);
1. ``tuner.errors``, ``tuner.timing``, ``tuner.registry``, ``tuner.signals``;
2. ``tuner.latency`` (budgets, measurement, the budget rule);
3. ``evaluators`` (accuracy tasks) and ``search_spaces``, and the offline LLaVA demo's builder and trainer
   (``tuner.demo.mllm``, ``tuner.demo.train_mllm``: they speak the LLaVA tasks' prompts);
4. ``tuner.storage``, ``tuner.options`` and ``tuner.workers`` (dead trials, local worker processes);
5. ``tuner.measure`` and ``tuner.study``;
6. ``tuner.export``, ``tuner.plots``, ``tuner.figures`` and ``tuner.tables``;
7. ``tuner.api``, ``tuner.progress``, ``tuner.dashboard`` and ``tuner.report``;
8. ``tuner.cli``, and ``tuner.__main__`` at the top.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tuner", "evaluators", "search_spaces")

LAYERS: list[tuple[str, ...]] = [
    ("tuner", "tuner.evoprune", "tuner.demo"),
    ("tuner.mllm",),
    ("tuner.errors", "tuner.timing", "tuner.registry", "tuner.signals"),
    ("tuner.latency",),
    # The offline LLaVA demo's builder and trainer speak the LLaVA tasks' prompts (evaluators.mllm): that layer.
    ("evaluators", "search_spaces", "tuner.demo.mllm", "tuner.demo.train_mllm"),
    ("tuner.storage", "tuner.options", "tuner.workers"),
    ("tuner.measure", "tuner.study"),
    ("tuner.export", "tuner.plots", "tuner.figures", "tuner.tables"),
    ("tuner.api", "tuner.progress", "tuner.dashboard", "tuner.report"),
    ("tuner.cli",),
    ("tuner.__main__",),
]
"""Each layer's modules (a name covers its submodules), from the bottom up."""

RUNNER = ("tuner.study", "tuner.api", "tuner.cli", "tuner.export", "tuner.plots", "tuner.progress", "tuner.storage",
          "tuner.figures", "tuner.tables", "tuner.dashboard", "tuner.report")  # fmt: skip


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    """Every module of the three packages, by dotted name."""
    return {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> Iterator[tuple[str, int]]:
    """``(imported module, line)`` for every import in the file; ``from a import b`` yields ``a.b`` when that is a
    module of the project, else ``a``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                yield (candidate if candidate in known else base), node.lineno


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def project_edges() -> list[tuple[str, str, int]]:
    """``(importer, imported, line)`` for every import of one project module by another."""
    modules = project_modules()
    known = set(modules)
    edges = []
    for importer, path in modules.items():
        for imported, line in imports_of(path, known):
            if any(within(imported, package) for package in PACKAGES):
                edges.append((importer, imported, line))
    return edges


def layer_of(module: str) -> int:
    """The layer of a module: that of the longest layer name it falls under."""
    best, found = -1, -1
    for index, names in enumerate(LAYERS):
        for name in names:
            if within(module, name) and len(name) > best:
                best, found = len(name), index
    assert found >= 0, f"{module} is in no layer: add it to LAYERS"
    return found


def violations(rule: str, importers: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{rule}: {importer} imports {imported} (line {line})"
        for importer, imported, line in project_edges()
        if any(within(importer, name) for name in importers) and any(within(imported, name) for name in forbidden)
    ]


def test_every_module_has_a_layer_and_imports_only_its_own_or_lower_layers() -> None:
    problems = [
        f"{importer} (layer {layer_of(importer)}) imports {imported} (layer {layer_of(imported)}, line {line})"
        for importer, imported, line in project_edges()
        if layer_of(imported) > layer_of(importer)
    ]
    assert not problems, "\n".join(problems)


def test_the_engine_imports_nothing_of_the_rest() -> None:
    problems = [
        f"{importer} imports {imported} (line {line})"
        for importer, imported, line in project_edges()
        if within(importer, "tuner.evoprune") and not within(imported, "tuner.evoprune")
    ]
    assert not problems, "\n".join(problems)


def test_evaluators_and_spaces_do_not_import_the_runner() -> None:
    assert not violations("tasks import the runner", ("evaluators", "search_spaces"), RUNNER)


def test_latency_imports_no_task_and_no_runner() -> None:
    forbidden = ("evaluators", "search_spaces", "tuner.study", "tuner.api", "tuner.cli", "tuner.options")
    assert not violations("latency imports above itself", ("tuner.latency", "tuner.timing"), forbidden)


@pytest.mark.parametrize("folder", [*PACKAGES, "benchmarks"])
def test_only_the_main_module_imports_the_cli(folder: str) -> None:
    known = set(project_modules())
    problems = [
        f"{path.relative_to(ROOT)} imports {imported} (line {line})"
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path != ROOT / "tuner" / "__main__.py"
        for imported, line in imports_of(path, known)
        if within(imported, "tuner.cli")
    ]
    assert not problems, "\n".join(problems)


def test_the_checker_sees_function_level_and_from_imports() -> None:
    # The parser itself: a function-level import and a ``from package import module`` both count.
    sample = ROOT / "tuner" / "cli.py"
    found = {imported for imported, _ in imports_of(sample, set(project_modules()))}
    assert "tuner.api" in found  # imported inside the run command
    assert "tuner.errors" in found
