"""The import graph, read from the source: one import path per name, and a core without Dagster."""

from __future__ import annotations

import ast
import re
import sys
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCES = [p for d in ("mloc_dagster", "tests", "bench") for p in sorted((REPO / d).rglob("*.py"))]


def module_file(module: str) -> Path | None:
    base = REPO.joinpath(*module.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


@cache
def defined_names(module: str) -> frozenset[str]:
    """Names a module binds itself at top level (def, class, assignment, `import x`), not the
    names it imports from another module."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(module_file(module).read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return frozenset(names)


def imports(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, name) of every import in a file, at any depth (name None for `import m`)."""
    out: list[tuple[int, str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out += [(node.lineno, node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, None) for a in node.names]
    return out


def test_every_name_is_imported_from_the_module_that_defines_it():
    """No re-export shims: `from mloc_dagster.x import name` names the module where `name` is
    defined (or a submodule of package x), so every name has one import path."""
    wrong = []
    for path in SOURCES:
        for line, module, name in imports(path):
            if not module.startswith("mloc_dagster") or name is None or module_file(module) is None:
                continue
            if name not in defined_names(module) and module_file(f"{module}.{name}") is None:
                wrong.append(f"{path.relative_to(REPO)}:{line}: {name} is not defined in {module}")
    assert not wrong, "\n".join(wrong)


IMPORT_LINE = re.compile(r"^\s*from (mloc_dagster[\w.]*) import ([\w, ]+?)\s*$")


def test_code_in_strings_and_scripts_imports_from_the_defining_module_too():
    """Child-process code in string literals (tests, benches) and Python in shell scripts is not
    seen by the parser above: its `from mloc_dagster.x import a, b` lines are checked as text."""
    wrong = []
    for path in SOURCES + sorted((REPO / "scripts").glob("*.sh")):
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            if (m := IMPORT_LINE.match(line)) and module_file(m[1]) is not None:
                for name in (n.strip().split(" as ")[0] for n in m[2].split(",")):
                    if name not in defined_names(m[1]) and module_file(f"{m[1]}.{name}") is None:
                        wrong.append(f"{path.relative_to(REPO)}:{line_no}: {name} is not defined in {m[1]}")
    assert not wrong, "\n".join(wrong)


def test_the_core_imports_neither_dagster_nor_the_layers_above_it():
    """`mloc_dagster/core/` is plain Python: no Dagster, and nothing from assets, resources,
    sensors, the CLI or the run service (only other core modules and the plain `paths`)."""
    allowed = ("mloc_dagster.core", "mloc_dagster.paths")
    wrong = [f"{path.relative_to(REPO)}:{line}: imports {module}"
             for path in sorted((REPO / "mloc_dagster" / "core").rglob("*.py"))
             for line, module, _ in imports(path)
             if module.split(".")[0] in ("dagster", "dagster_k8s", "dagster_postgres", "dagster_pipes")
             or (module.startswith("mloc_dagster") and not module.startswith(allowed))]
    assert not wrong, "\n".join(wrong)


# The house, bottom to top (docs/architecture.md). A module imports only from its own floor or below,
# at module level or inside a function: lazy imports are no way around the order.
LAYERS = [
    ("mloc_dagster.paths", "mloc_dagster.core"),
    ("mloc_dagster.partitions", "mloc_dagster.resources", "mloc_dagster.execution", "mloc_dagster.operations"),
    ("mloc_dagster.assets",),
    ("mloc_dagster.runs",),
    ("mloc_dagster.sensors",),
    ("mloc_dagster.definitions",),
    ("mloc_dagster.cli",),
]


def floor(module: str) -> int | None:
    return next((i for i, prefixes in enumerate(LAYERS) for p in prefixes
                 if module == p or module.startswith(p + ".")), None)


def upward_imports(root: Path) -> list[str]:
    wrong = []
    for path in sorted((root / "mloc_dagster").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        own = floor(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
        for line, module, _ in imports(path):
            if module.startswith("mloc_dagster") and own is not None and (other := floor(module)) is not None \
                    and other > own:
                wrong.append(f"{path.relative_to(root)}:{line}: imports {module} (a floor above)")
    return wrong


def test_no_import_goes_up_a_floor(tmp_path):
    assert floor("mloc_dagster.core.state.runs") == 0 and floor("mloc_dagster.cli.main") == len(LAYERS) - 1
    assert all(floor(".".join(p.relative_to(REPO).with_suffix("").parts)) is not None
               for p in (REPO / "mloc_dagster").rglob("*.py") if p.name != "__init__.py"), "a module outside LAYERS"
    (tmp_path / "mloc_dagster" / "runs").mkdir(parents=True)  # the check can fail: a lazy upward import
    (tmp_path / "mloc_dagster" / "runs" / "x.py").write_text("def f():\n    from mloc_dagster.sensors.y import z\n")
    assert upward_imports(tmp_path) == ["mloc_dagster/runs/x.py:2: imports mloc_dagster.sensors.y (a floor above)"]
    assert upward_imports(REPO) == []


def module_graph() -> dict[str, set[str]]:
    """mloc_dagster module → the mloc_dagster modules it imports at module level (imports inside a
    function run when it is called and are left out)."""
    graph: dict[str, set[str]] = {}
    for path in sorted((REPO / "mloc_dagster").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        graph[name] = {node.module for node in ast.parse(path.read_text()).body
                       if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                       and node.module.startswith("mloc_dagster") and module_file(node.module) is not None}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` (empty when there is none)."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str]:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return []
        for dep in sorted(graph.get(node, ())):
            if cycle := visit(dep, path + [node]):
                return cycle
        done.add(node)
        return []

    return next((c for c in (visit(n, []) for n in sorted(graph)) if c), [])


def test_no_module_level_import_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check can fail
    assert find_cycle(module_graph()) == []


def test_the_checks_see_a_shim_and_an_upward_import(tmp_path, monkeypatch):
    """The checks above can fail: a module that imports a name only to pass it on is caught."""
    pkg = tmp_path / "mloc_dagster"
    (pkg / "core").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "core" / "real.py").write_text("def thing():\n    return 1\n")
    (pkg / "core" / "shim.py").write_text("from mloc_dagster.core.real import thing\n")
    caller = pkg / "caller.py"
    caller.write_text("from mloc_dagster.core.shim import thing\nfrom mloc_dagster.core.real import thing as t\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    defined_names.cache_clear()
    try:
        assert "thing" not in defined_names("mloc_dagster.core.shim")
        assert "thing" in defined_names("mloc_dagster.core.real")
        assert [m for _, m, n in imports(caller) if n == "thing" and "thing" not in defined_names(m)] == [
            "mloc_dagster.core.shim"]
    finally:
        defined_names.cache_clear()
