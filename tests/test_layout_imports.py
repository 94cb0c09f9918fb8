"""The import graph of every `mm1` module, read statically (ast): it has no cycle, counting imports
inside functions too, so a lazy import cannot hide one; and `mm1.data` imports mm1 modules at the top
of a file only (a lazy import there must keep a heavy optional dependency lazy and say so)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
LAZY_OK = "optional dependency"  # the comment that allows an mm1 import inside a function


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under `root` (a package is its __init__)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for each import of a module in `modules`.
    `from pkg import x` is an edge to `pkg.x` when that is a module, else to `pkg` itself."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nested = {
        id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found += [(t, node.lineno, id(node) in nested) for t in targets if t in modules and t != name]
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = module_files(root)
    return {name: {t for t, _, _ in imports(name, path, modules)} for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_mm1_modules_import_each_other_without_cycles() -> None:
    graph = import_graph(SRC)
    assert len(graph) > 100 and "mm1.data.mixture" in graph["mm1.data.loader"]  # the graph is real
    assert "mm1.train.probe" in graph["mm1.train.trainer"]  # a function-level import is an edge too
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle_hidden_in_a_function(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import thing\n")
    (pkg / "b.py").write_text("def thing():\n    from pkg import a\n    return a\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    assert cycles(import_graph(tmp_path)) == [["pkg.a", "pkg.b"]]


def test_mm1_data_imports_mm1_modules_at_the_top_of_a_file_only() -> None:
    modules = module_files(SRC)
    lazy = []
    for name, path in modules.items():
        if name.startswith("mm1.data"):
            lines = path.read_text(encoding="utf-8").splitlines()
            lazy += [
                f"{path.relative_to(SRC)}:{line}"
                for t, line, inside in imports(name, path, modules)
                if inside and LAZY_OK not in lines[line - 1]
            ]
    assert lazy == [], f"move these imports to the top of the file, or say '{LAZY_OK}' in the line: {lazy}"
