"""The project's layout (README "Layout"): no import cycle anywhere, the decode-time library imports nothing of
training, and no private name is imported across modules. Read from the source with the stdlib's ast, so every
import counts, those inside functions too."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cmsd", "jobs", "workers")
TRAINING = "cmsd.train"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imports(path: Path, name: str, modules: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(the project module imported, the names taken from it, the line) for each import in the file. `from X import
    y` imports the module X.y where there is one, else X; a relative import is resolved against the file's package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append((sub, [], node.lineno) if sub in modules else (base, [alias.name], node.lineno))
    return [(target, names, line) for target, names, line in out if target in modules and target != name]


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """Module -> the project modules it imports, and every cross-module import of a private name."""
    modules = project_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    private = []
    for name, path in modules.items():
        for target, names, line in imports(path, name, modules):
            graph[name].add(target)
            private += [f"{path.relative_to(ROOT)}:{line} imports {target}.{n}" for n in names
                        if n.startswith("_") and not n.startswith("__")]
    return graph, private


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, colouring modules as it goes)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph()[0])
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_decode_time_modules_import_no_training():
    graph, _ = import_graph()
    decode_side = [m for m in graph if m.startswith("cmsd") and not (m == TRAINING or m.startswith(TRAINING + "."))]
    wrong = [f"{m} imports {t}" for m in decode_side for t in sorted(graph[m]) if t.startswith(TRAINING)]
    assert not wrong, wrong


def test_no_private_name_is_imported_across_modules():
    _, private = import_graph()
    assert not private, private


def defined_names(path: Path) -> set[str]:
    """The names a module defines at its top level (functions, classes, assignments, imports)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return names


def test_every_import_of_the_project_resolves():
    """Each import of a project module, from anywhere in the tree (scripts and tests too, inside functions too),
    names a module that exists and names it defines: a file moved or a name renamed leaves no stale import."""
    modules = project_modules()
    files = dict(modules)
    files.update({module_name(p): p for folder in ("scripts", "tests") for p in sorted((ROOT / folder).rglob("*.py"))})
    stale: set[str] = set()
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                wanted = [(alias.name, None) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                wanted = [(node.module, alias.name) for alias in node.names]
            else:
                continue
            for module, attr in wanted:
                if module.split(".")[0] not in PACKAGES:
                    continue
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                if module not in modules:
                    stale.add(f"{where}: no module {module}")
                elif attr and f"{module}.{attr}" not in modules and attr not in defined_names(modules[module]):
                    stale.add(f"{where}: {module} has no {attr}")
    assert not stale, sorted(stale)


def test_importing_cmsd_loads_no_training_code():
    code = ("import sys, cmsd, cmsd.decode, cmsd.models; "
            "print(sorted(m for m in sys.modules if m.startswith('cmsd.train')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_no_source_file_of_the_packages_is_ignored_by_git():
    """A module git ignores would be missing from every clone (CI's too) while the tests pass here."""
    files = [str(p.relative_to(ROOT)) for p in project_modules().values()]
    out = subprocess.run(["git", "check-ignore", "--no-index", *files], cwd=ROOT, capture_output=True, text=True)
    if out.returncode == 128:
        pytest.skip(f"not a git checkout: {out.stderr.strip()}")
    assert out.stdout.split() == [], "ignored by git"
