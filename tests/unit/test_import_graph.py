"""The layers of docs/architecture.md hold: rlhf's modules import each other without a cycle.

Read from the source with `ast` (nothing is imported), counting every import: at module level, inside
functions, under `if TYPE_CHECKING:`. `from rlhf.x import y` is an edge to rlhf.x.y when y is a module,
else to rlhf.x.
"""

import ast
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import rlhf

PACKAGE = Path(rlhf.__file__).parent

# Edges of cycles that are already there, each to be removed by the module's owner; the test fails on any other.
KNOWN: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("rlhf",) + path.relative_to(PACKAGE).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _targets(module: str, path: Path, node: ast.Import | ast.ImportFrom, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: from the module's package, one level up per extra dot
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]


def _imports(statements: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, however deeply nested in blocks (imports are statements: expressions need no visit)."""
    for node in statements:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            yield from _imports(getattr(node, field, []))


@lru_cache(maxsize=1)
def import_graph() -> dict[str, frozenset[str]]:
    """module -> the rlhf modules it imports."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in _imports(ast.parse(path.read_text(), str(path)).body):
            for target in _targets(module, path, node, modules):
                while target and target not in modules:  # `import rlhf.x.name` of a non-module: its module
                    target = target.rpartition(".")[0]
                if target and target != module and (module, target) not in KNOWN:
                    graph[module].add(target)
    return {module: frozenset(targets) for module, targets in graph.items()}


def find_cycle(graph: dict[str, set[str]] | dict[str, frozenset[str]]) -> list[str] | None:
    """A cycle as [a, b, ..., a], or None: depth-first search for an edge back to a module on the current path."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph[node]):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start)
        if cycle:
            return cycle
    return None


def test_the_rlhf_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_graph_sees_imports_inside_functions_and_submodules():
    graph = import_graph()
    assert "rlhf.plan" in graph["rlhf.report"] and "rlhf.report" in graph["rlhf.pipeline"]
    assert "rlhf.config" in graph["rlhf.cli"]  # imported inside the command functions
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
