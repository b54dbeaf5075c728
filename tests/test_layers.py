"""Layers: pyrovae's modules import downwards only, and no private name crosses a module.

Read from the source, not by importing it: every ``import`` / ``from ... import`` of a pyrovae
module counts, those inside functions included (they hide a cycle at import time, not at run
time); only those under ``if TYPE_CHECKING:`` (never run) are left out.

- no import cycle between pyrovae's modules (Pyro's rule: ``infer`` uses ``poutine`` and
  ``distributions``, never the reverse);
- no ``_private`` name of one pyrovae module imported by another (``from .x import _y``) or used
  through it (``x._y``): what crosses a module boundary has a public name. Private *modules*
  (``_checks``, ``_batching``, ...) are shared helpers and may be imported; their names are public.

Each test was checked to fail with a cycle or a private import put in on purpose.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pyrovae"
MODULES = {p.stem: p for p in sorted(PACKAGE.glob("*.py")) if p.stem != "__init__"}


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _statements(tree: ast.AST):
    """Every statement node, walking into functions and classes, not into ``if TYPE_CHECKING``."""
    for child in ast.iter_child_nodes(tree):
        if _is_type_checking(child):
            for other in child.orelse:
                yield other
                yield from _statements(other)
            continue
        yield child
        yield from _statements(child)


def _imports(tree: ast.AST) -> list[tuple[str, str | None, int]]:
    """``(module, name, line)`` per pyrovae import: ``name`` is what ``from module import name``
    takes (``None`` for a whole module)."""
    out = []
    for node in _statements(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 or (node.level == 0 and (node.module or "").split(".")[0] == "pyrovae"):
                parts = (node.module or "").split(".")
                if node.level == 0:
                    parts = parts[1:]
                if parts and parts[0]:
                    out += [(parts[0], a.name, node.lineno) for a in node.names]
                else:  # from . import x / from pyrovae import x
                    out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "pyrovae" and len(parts) > 1:
                    out.append((parts[1], None, node.lineno))
    return out


def _parsed() -> dict[str, ast.AST]:
    return {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def import_graph(trees: dict[str, ast.AST]) -> dict[str, set[str]]:
    """module -> the pyrovae modules it imports (the package ``__init__`` left out)."""
    return {
        name: {m for m, _, _ in _imports(tree) if m in MODULES and m != name}
        for name, tree in trees.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle ``[a, b, ..., a]`` of ``graph``, or ``None``."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        path.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return None


def private_uses(trees: dict[str, ast.AST]) -> list[str]:
    """``module:line what`` for each private name of another pyrovae module imported or used."""
    found = []
    for name, tree in trees.items():
        aliases: set[str] = set()  # local names bound to a pyrovae module
        for module, imported, line in _imports(tree):
            if imported is None:
                aliases.add(module)
            elif imported in MODULES:
                aliases.add(imported)  # from .x import module? (rare) / from . import x
            elif imported.startswith("_") and not imported.startswith("__") and module != name:
                found.append(f"{name}:{line} from {module} import {imported}")
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.value.id != name
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                found.append(f"{name}:{node.lineno} {node.value.id}.{node.attr}")
    return sorted(found)


def test_the_scanner_sees_imports_inside_functions_and_skips_type_checking():
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "from . import distributed\n"
        "if TYPE_CHECKING:\n    from .vae import VAE\n"
        "def f():\n    from .gaps import _fitted\n    return distributed._barrier\n"
    )
    assert {m for m, _, _ in _imports(tree)} == {"distributed", "gaps"}
    assert private_uses({"importance": tree}) == [
        "importance:6 from gaps import _fitted", "importance:7 distributed._barrier",
    ]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_modules_import_downwards_only():
    graph = import_graph(_parsed())
    assert len(graph) > 20  # (the scan found the package)
    cycle = find_cycle(graph)
    assert cycle is None, (
        "import cycle between pyrovae modules (imports inside functions count): "
        + " -> ".join(cycle)
        + "; move the shared code into a module below both"
    )


def test_no_private_name_crosses_a_module():
    uses = private_uses(_parsed())
    assert not uses, (
        "private names used outside their module (give them a public name where they are "
        "defined, or move the code):\n  " + "\n  ".join(uses)
    )
