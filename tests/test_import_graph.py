"""The import graph of the source tree: no cycles among service/ modules, and the layering.

Layers, lowest first: ``model/`` (the network, its data and training) imports neither
``engines/`` nor ``service/``; ``engines/`` (inference backends) does not import
``service/``. Imports are read from the source (``ast``), every one of them: at module
level, inside functions (a lazy import is still a dependency), but not those under
``if TYPE_CHECKING:`` (annotations only). No cycle either, lazy imports included: a
function-level import that closes a cycle only hides it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "engines", "service")


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    module_level: bool
    line: int


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if "migrations" not in path.parts  # run by Alembic, not imported
    }


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(name: str) -> str | None:
    """The project module `name` is, or the closest package holding it; ``None`` outside."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path) -> Iterator[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(node: ast.AST, module_level: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    target = _resolve(alias.name)
                    if target is not None:
                        yield Import(module, target, module_level, child.lineno)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")
                    anchor = ".".join(parts[: len(parts) - child.level + 1])
                    base = f"{anchor}.{base}" if base else anchor
                for alias in child.names:
                    target = _resolve(f"{base}.{alias.name}") or _resolve(base)
                    if target is not None:
                        yield Import(module, target, module_level, child.lineno)
            inner = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            yield from visit(child, module_level and not inner)

    yield from visit(tree, True)


IMPORTS = [imp for module, path in MODULES.items() for imp in _imports(module, path)]


def _top(module: str) -> str:
    return module.partition(".")[0]


def test_the_graph_is_read() -> None:
    """The parser sees the tree: known edges are found (guards against an empty graph)."""
    edges = {(i.importer, i.imported) for i in IMPORTS}
    assert ("service.worker", "service.store") in edges
    assert ("engines.pytorch", "model.inference") in edges
    assert ("service.store.repository", "service.store.leases") in edges
    assert len(MODULES) > 80 and len(edges) > 200


@pytest.mark.parametrize(
    ("layer", "forbidden"), [("model", ("engines", "service")), ("engines", ("service",))]
)
def test_layering(layer: str, forbidden: tuple[str, ...]) -> None:
    wrong = [
        f"{i.importer}:{i.line} imports {i.imported}"
        for i in IMPORTS
        if _top(i.importer) == layer and _top(i.imported) in forbidden
    ]
    assert wrong == []


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return found


def test_no_import_cycles_among_service_modules() -> None:
    edges: dict[str, set[str]] = {}
    for i in IMPORTS:
        if i.importer == i.imported:
            continue
        if _top(i.importer) == "service" and _top(i.imported) == "service":
            # A package's own __init__ re-exporting its modules is not a cycle with them.
            if i.imported.startswith(i.importer + ".") or i.importer.startswith(i.imported + "."):
                continue
            edges.setdefault(i.importer, set()).add(i.imported)
    assert _cycles(edges) == []


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
