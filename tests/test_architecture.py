"""The package's layering: its import graph has no cycles, and a module imports
another of the package inside a function only where it is a command-line tool
that answers `--help` before torch loads (docs/architecture.md)."""

import ast
import re
from pathlib import Path
from typing import Dict, List, Set

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "llama"

# Command-line tools: their package imports (which bring in torch) wait until
# the arguments are parsed. family.py is read by `python -m llama.tiny` before
# torch loads, so it reaches the checkpoint reader (torch) inside the two
# functions that read shards. No other module imports the package inside a function.
LAZY_IMPORTERS = {"cli", "convert_hf", "demo", "quantize", "reshard", "serve", "tiny", "family"}


def _imported(node: ast.AST, modules: Set[str]) -> List[str]:
    """The package modules an import statement names."""
    names = []
    if isinstance(node, ast.Import):
        names = [a.name.split(".")[1] for a in node.names if a.name.startswith("llama.")]
    elif isinstance(node, ast.ImportFrom):
        module = node.module or ""
        if node.level == 0 and module == "llama":
            names = [a.name for a in node.names]
        elif node.level == 0 and module.startswith("llama."):
            names = [module.split(".")[1]]
        elif node.level == 1:
            names = [module.split(".")[0]] if module else [a.name for a in node.names]
    return [n for n in names if n in modules]


def import_graph():
    """(module -> modules imported at the top, module -> modules imported inside functions)."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    top: Dict[str, Set[str]] = {m: set() for m in modules}
    inner: Dict[str, Set[str]] = {m: set() for m in modules}

    def walk(module: str, node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (inner if in_function else top)[module].update(set(_imported(child, modules)) - {module})
            walk(module, child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    for module in modules:
        walk(module, ast.parse((PACKAGE / f"{module}.py").read_text()), False)
    return top, inner


def _cycle(graph: Dict[str, Set[str]]):
    """One import cycle as a list of modules, or None."""
    state: Dict[str, int] = {}
    path: List[str] = []

    def visit(module):
        state[module] = 1
        path.append(module)
        for other in sorted(graph[module]):
            if state.get(other) == 1:
                return path[path.index(other):] + [other]
            if other not in state:
                found = visit(other)
                if found:
                    return found
        state[module] = 2
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module)
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycles():
    top, inner = import_graph()
    every = {m: top[m] | inner[m] for m in top}
    assert _cycle(every) is None, " -> ".join(_cycle(every))


def test_only_command_line_tools_import_the_package_inside_functions():
    _, inner = import_graph()
    offenders = {m: sorted(names) for m, names in inner.items() if names and m not in LAZY_IMPORTERS}
    assert offenders == {}


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_docs_architecture_names_files_that_exist_and_every_module():
    text = (REPO / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:llama/)?[\w./]+\.(?:py|c|h))`", text))
    assert named, "docs/architecture.md names no files"
    missing = sorted(path for path in named if not (REPO / path).is_file())
    assert missing == []
    unnamed = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py" and f"llama/{p.name}" not in named)
    assert unnamed == [], "modules docs/architecture.md does not place in a layer"
