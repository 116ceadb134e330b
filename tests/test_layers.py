"""canon's modules import one way: each layer only from the layers below it, and no cycles.

Layers, bottom to top: devices/errors/files/lazy/validation -> registry -> models -> data ->
transfer.torchvision -> recipes -> evaluation -> engine -> transfer/visualize ->
reproduce/bench -> cli. The package itself (`canon/__init__.py`) is the public API over all of
them and imports lazily (canon.lazy), by name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "canon"
LAYERS = [
    ("canon.devices", "canon.errors", "canon.files", "canon.lazy", "canon.torchrun",
     "canon.validation"),
    ("canon.registry",),
    ("canon.models",),
    ("canon.data",),
    # torchvision's weights in canon's models: below the engine, which starts runs from them
    ("canon.transfer.torchvision",),
    ("canon.recipes",),
    ("canon.evaluation",),
    ("canon.engine",),
    ("canon.transfer", "canon.visualize"),
    ("canon.reproduce", "canon.bench"),
    ("canon.cli", "canon.__main__"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    for level, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return level
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The canon modules `path` imports anywhere in it (a function's import counts too),
    relative imports resolved against its package."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package.pop()
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            anchor = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
            base = ".".join(part for part in (anchor, node.module) if part)
            # `from canon.data import datasets` imports the submodule canon.data.datasets
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name.startswith("canon"):
                found.add(name)
    return found


MODULES = {module_name(p): p for p in SOURCE.rglob("*.py")}
GRAPH = {
    name: imports_of(path, set(MODULES)) - {name}
    for name, path in MODULES.items() if name != "canon"
}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_module_imports_from_a_layer_above_it(module: str) -> None:
    upward = sorted(
        imported for imported in GRAPH[module]
        if imported != "canon" and layer_of(imported) > layer_of(module)
    )
    assert not upward, f"{module} imports from a layer above it: {upward}"


def test_no_import_cycles() -> None:
    visiting: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> None:
        if module in visiting:
            cycle = [*visiting[visiting.index(module) :], module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        visiting.append(module)
        for imported in sorted(GRAPH.get(module, ())):
            visit(imported)
        visiting.pop()
        done.add(module)

    for module in sorted(GRAPH):
        visit(module)


def test_no_module_imports_the_package_facade() -> None:
    """`import canon` is the users' API; canon's own modules import what they use directly
    (canon.__version__ aside)."""
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "canon":
                assert [a.name for a in node.names] == ["__version__"], module
