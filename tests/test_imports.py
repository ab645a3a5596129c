"""The package's imports run one way: no module imports one that (through others) imports it back, and every
module imports on its own, first, in a fresh interpreter (as `python -c "import finetune.<module>"` does)."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import finetune

SOURCE = Path(finetune.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(SOURCE.rglob("*.py"))}


def imported(path: Path) -> set[str]:
    """The package's modules that `path` imports anywhere in it (function-local imports too: a circle dodged by
    importing late is still a circle). `from finetune.models import X` imports `finetune.models.X` when that is a
    module, else the package `finetune.models`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names
            }
    return found & MODULES.keys()


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """A cycle of `graph` as the list of its modules, the first one repeated at the end; None if there is none."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        for successor in sorted(graph.get(node, ())):
            if cycle := visit(successor, [*path, node]):
                return cycle
        done.add(node)
        return None

    return next((cycle for node in sorted(graph) if (cycle := visit(node, []))), None)


def test_the_cycle_finder_names_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_module_imports_itself_through_others():
    graph = {name: imported(path) for name, path in MODULES.items()}
    assert "finetune.builders" in graph["finetune.train"]  # the walk sees the imports
    cycle = find_cycle(graph)
    assert cycle is None, f"import circle: {' -> '.join(cycle)}"


# One interpreter, each module imported first: the package's modules are dropped from sys.modules before each
# import (the libraries stay loaded: 5 s for all, instead of a torch import per module).
EACH_FIRST = """
import importlib, sys
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "finetune" or m.startswith("finetune.")]:
        del sys.modules[loaded]
    importlib.import_module(name)
"""


def test_every_module_imports_first_in_a_fresh_interpreter():
    result = subprocess.run([sys.executable, "-c", EACH_FIRST, *sorted(MODULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
