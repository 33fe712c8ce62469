"""The house rules, read from the source (AST import graph), so a change cannot quietly break them.

``pipeline/`` is in layers, lowest first (``LAYERS``): a module imports only from its own package or a lower layer;
``teacher`` and ``students`` share a layer and never import each other; no import cycle between files or folders;
no ``_private`` name imported from another module. ``stages/`` and ``scripts/`` may import any layer; ``pipeline/``
never imports ``stages/``.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from tests.helpers import PROJECT

LAYERS = [  # lowest first; packages on one line share a layer and never import each other
    ("core",),
    ("data", "sweep"),
    ("evaluation",),
    ("teacher", "students"),
    ("inference",),
    ("reporting",),
    ("demo",),
    ("workflows",),
    ("orchestration",),
]
LEVEL = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names imported from it, line) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path, root).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path, root)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base]) if base else ".".join(up)
            names = [a.name for a in node.names]
            modules = [f"{base}.{n}" for n in names if (root / f"{base}.{n}".replace(".", "/")).is_dir()
                       or (root / (f"{base}.{n}".replace(".", "/") + ".py")).is_file()]
            found += [(m, [], node.lineno) for m in modules] or [(base, names, node.lineno)]
    return found


def project_graph(root: Path) -> dict[str, list[tuple[str, list[str], int]]]:
    """Module -> its imports of ``pipeline`` / ``stages`` modules, for every file under ``root``'s packages."""
    graph = {}
    for folder in ("pipeline", "stages"):
        for path in sorted((root / folder).rglob("*.py")):
            graph[module_name(path, root)] = [i for i in imports(path, root)
                                              if i[0].split(".")[0] in ("pipeline", "stages")]
    return graph


def package_of(module: str) -> str | None:
    """The package of ``pipeline`` a module belongs to (a module directly in ``pipeline/`` is its own package)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "pipeline" and len(parts) > 1 else None


def violations(root: Path) -> list[str]:
    graph = project_graph(root)
    found = []
    for module, deps in graph.items():
        mine = package_of(module)
        if mine is not None and mine not in LEVEL:
            found.append(f"{module}: pipeline.{mine} is in no layer of tests/test_layers.py")
            continue
        for dep, names, line in deps:
            where = f"{module}:{line} imports {dep}"
            theirs = package_of(dep)
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and dep != module:
                found.append(f"{where}: private name(s) {private} imported from another module")
            if mine is None:  # stages/ may import any layer
                continue
            if dep.split(".")[0] == "stages":
                found.append(f"{where}: pipeline/ never imports stages/")
            elif theirs is None or theirs == mine:
                continue
            elif theirs not in LEVEL:
                found.append(f"{where}: pipeline.{theirs} is in no layer")
            elif LEVEL[theirs] > LEVEL[mine]:
                found.append(f"{where}: layer {theirs} is above {mine}")
            elif LEVEL[theirs] == LEVEL[mine]:
                found.append(f"{where}: {mine} and {theirs} share a layer and never import each other")
    return found + cycles(graph)


def cycles(graph: dict[str, list[tuple[str, list[str], int]]]) -> list[str]:
    """Import cycles between files, and between folders (a folder imports another when any of its files does)."""
    def find(edges: dict[str, set[str]]) -> list[list[str]]:
        found, state = [], {}

        def visit(node: str, stack: list[str]) -> None:
            state[node] = 1
            for nxt in sorted(edges.get(node, ())):
                if state.get(nxt) == 1:
                    found.append([*stack[stack.index(nxt):], nxt])
                elif nxt not in state:
                    visit(nxt, [*stack, nxt])
            state[node] = 2

        for node in sorted(edges):
            if node not in state:
                visit(node, [node])
        return found

    files = {m: {d for d, _, _ in deps if d in graph and d != m} for m, deps in graph.items()}
    folders: dict[str, set[str]] = {}
    for m, deps in files.items():
        folders.setdefault(m.rsplit(".", 1)[0], set()).update(d.rsplit(".", 1)[0] for d in deps)
    for folder, deps in folders.items():
        deps.discard(folder)
    return ([f"file import cycle: {' -> '.join(c)}" for c in find(files)]
            + [f"folder import cycle: {' -> '.join(c)}" for c in find(folders)])


def test_the_project_keeps_the_house_rules():
    assert violations(PROJECT) == []


PLANTED = {  # rule -> files planted into a copy of the source, and what the finding says
    "peers": ({"pipeline/teacher/leak.py": "from pipeline.students.vocab import Vocabulary\n"}, "share a layer"),
    "downward": ({"pipeline/core/leak.py": "from pipeline.reporting.tables import markdown_table\n"},
                 "layer reporting is above core"),
    "demo": ({"pipeline/students/leak.py": "from pipeline.demo import render\n"}, "layer demo is above students"),
    "private": ({"pipeline/data/leak.py": "from pipeline.core.rundir import _private\n"}, "private name"),
    "stages": ({"pipeline/reporting/leak.py": "import stages.cli\n"}, "never imports stages"),
    "file cycle": ({"pipeline/data/leak.py": "from pipeline.data.leak2 import x\n",
                    "pipeline/data/leak2.py": "from pipeline.data.leak import y\n"}, "file import cycle"),
    "unlayered": ({"pipeline/misc/__init__.py": "", "pipeline/misc/leak.py": "import os\n"}, "in no layer"),
    "loose module": ({"pipeline/loose.py": "import os\n"}, "pipeline.loose is in no layer"),
}


@pytest.mark.parametrize("rule", sorted(PLANTED))
def test_a_planted_violation_is_found(tmp_path, rule):
    """Each rule fails on a copy of the source with one violating file planted in it."""
    for folder in ("pipeline", "stages"):
        shutil.copytree(PROJECT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    files, expected = PLANTED[rule]
    for name, source in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(source)
    found = violations(tmp_path)
    assert any(expected in line for line in found), found
