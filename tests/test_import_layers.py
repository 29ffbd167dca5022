"""The import contract of ``cdlm``: layers and no cycles, read from the source with ``ast`` (nothing is imported).

Every ``.py`` file under ``cdlm/`` is parsed and every import is an edge, wherever it is written: module level,
inside functions and methods, under ``if TYPE_CHECKING:``, relative imports resolved against the file's package.
Lazy imports by name are edges too: a string literal that is exactly a cdlm module path, or ``"module:attribute"``
with a cdlm module (the ``lazy_exports`` tables, the decoding-method and task registries, the CLI's command and
config tables). ``from package import name`` goes to the module ``package.name`` when that is a module, and to the
module a package ``__init__`` re-exports ``name`` from (``lazy_exports`` tables and ``from .child import name``), so
a re-export does not hide a dependency.

Layers, highest first; a module may import from its own layer group and from lower layers only:

5. entry points and test support: ``cdlm.cli``, ``cdlm.__main__``, ``cdlm.testing`` (tiny models for tests and
   doc examples; library code never imports it), ``cdlm.data`` (Python files shipped among the data: the
   maintainer's data-building scripts and the task glue lm-eval loads from its YAML files).
4. ``cdlm.eval_harness``
3. ``cdlm.alignment`` and ``cdlm.decoding``: siblings that do not import each other (``ALLOWED_SIDEWAYS`` lists the
   exceptions, each with its reason).
2. ``cdlm.models``
1. shared utilities: the ``cdlm`` package itself, ``cdlm.errors``, ``cdlm._lazy``, ``cdlm.textio``,
   ``cdlm.run_identity``, ``cdlm.runs``, ``cdlm.progress``. They may import each other (cycles aside).

A new top-level module or package must be placed in ``LAYERS`` (the test fails until it is).

Cycles: every strongly connected component of the module graph must be a single module; each edge inside a larger
component is reported. Left out of this check: imports under ``if TYPE_CHECKING:`` (they never run, and they are
how an annotation names a type without a cycle) and under ``if __name__ == "__main__":`` (they run only when the
file is the script ``__main__``, not the module others import). Function-local and by-name imports count: they run
later, but a module that needs its own importer is still not a unit. Package ``__init__`` modules need no
exemption: one that re-exports its children (eagerly or through ``lazy_exports``) is in a cycle only if a module
below it imports from it, and a module may not import a re-exported name through its own ancestor package (it names
the defining module), which is checked separately with its own message. Importing what an ``__init__`` defines
itself (``cdlm.cli.__main__`` -> ``cdlm.cli.main``) is an ordinary edge.

``KNOWN`` holds the violations that exist today while they are being fixed: the test fails on any violation not in
it, and on any entry of it that no longer exists (shrink it as fixes land).
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cdlm"

# top-level name under cdlm (module or package; "" is the cdlm package itself) -> (rank, layer group)
LAYERS: dict[str, tuple[int, str]] = {
    "cli": (5, "entry"),
    "__main__": (5, "entry"),
    "testing": (5, "entry"),
    "data": (5, "entry"),
    "eval_harness": (4, "eval_harness"),
    "alignment": (3, "alignment"),
    "decoding": (3, "decoding"),
    "models": (2, "models"),
    "": (1, "shared"),
    "errors": (1, "shared"),
    "_lazy": (1, "shared"),
    "textio": (1, "shared"),
    "run_identity": (1, "shared"),
    "runs": (1, "shared"),
    "progress": (1, "shared"),
}

# (importer module, imported module) -> why a sibling layer may be imported. Empty: none is needed today.
ALLOWED_SIDEWAYS: dict[tuple[str, str], str] = {}

# Violations being fixed right now (issue 23): each must still exist, and nothing else may appear.
KNOWN: set[str] = {
    # decoding: the algorithm modules import their registry class from methods.py, whose classes import them back
    "cycle: cdlm.decoding.contrastive_decoding -> cdlm.decoding.methods",
    "cycle: cdlm.decoding.contrastive_input -> cdlm.decoding.methods",
    "cycle: cdlm.decoding.contrastive_search -> cdlm.decoding.methods",
    "cycle: cdlm.decoding.methods -> cdlm.decoding.contrastive_decoding",
    "cycle: cdlm.decoding.methods -> cdlm.decoding.contrastive_input",
    "cycle: cdlm.decoding.methods -> cdlm.decoding.contrastive_search",
    # eval_harness: task.py holds both the Task base class the tasks import and the registry naming the tasks
    "cycle: cdlm.eval_harness.openended -> cdlm.eval_harness.task",
    "cycle: cdlm.eval_harness.task -> cdlm.eval_harness.openended",
    "cycle: cdlm.eval_harness.task -> cdlm.eval_harness.tasks.gsm8k",
    "cycle: cdlm.eval_harness.task -> cdlm.eval_harness.tasks.gsm8k_cot",
    "cycle: cdlm.eval_harness.task -> cdlm.eval_harness.tasks.hellaswag",
    "cycle: cdlm.eval_harness.tasks.gsm8k -> cdlm.eval_harness.task",
    "cycle: cdlm.eval_harness.tasks.gsm8k_cot -> cdlm.eval_harness.tasks.gsm8k",
    "cycle: cdlm.eval_harness.tasks.hellaswag -> cdlm.eval_harness.task",
}


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    file: str
    line: int
    guard: str = ""  # "TYPE_CHECKING" or "__main__" when the import sits under such an ``if``
    via_reexport: bool = False  # ``from package import name`` where the package ``__init__`` re-exports ``name``

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def module_files() -> dict[str, Path]:
    """cdlm module name -> file, for every ``.py`` file under ``cdlm/``."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _guard(test: ast.expr) -> str:
    """ "TYPE_CHECKING" for ``if TYPE_CHECKING:``, "__main__" for ``if __name__ == "__main__":``, else ""."""
    if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    ):
        return "TYPE_CHECKING"
    if (
        isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and len(test.comparators) == 1
        and isinstance(test.comparators[0], ast.Constant)
        and test.comparators[0].value == "__main__"
    ):
        return "__main__"
    return ""


_BODIES = ("body", "orelse", "handlers", "finalbody", "cases")


def _statements(tree: ast.Module):
    """Yield ``(statement, guard)`` for every statement at any depth; ``guard`` names the innermost special ``if``."""
    stack = [(statement, "") for statement in reversed(tree.body)]
    while stack:
        node, guard = stack.pop()
        yield node, guard
        inner = _guard(node.test) if isinstance(node, ast.If) else ""
        for field in reversed(_BODIES):
            for child in reversed(getattr(node, field, None) or ()):
                stack.append((child, inner if inner and field == "body" else guard))


def _expressions(statement: ast.AST):
    """Every expression node of a statement itself (not of the statements nested in it)."""
    for field, value in ast.iter_fields(statement):
        if field not in _BODIES:
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, ast.AST):
                    yield from ast.walk(item)


def _module_of_string(text: str, modules: dict[str, Path]) -> str | None:
    name = text.partition(":")[0]
    return name if name.startswith("cdlm") and name in modules else None


def _exports(tree: ast.Module, package: str, modules: dict[str, Path]) -> dict[str, str]:
    """Names a package ``__init__`` re-exports -> the module defining them (lazy tables and ``from`` imports)."""
    exports = {}
    for statement, _ in _statements(tree):
        for node in _expressions(statement):
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values):
                    if isinstance(key, ast.Constant) and isinstance(value, ast.Constant):
                        target = _module_of_string(str(value.value), modules)
                        if target is not None:
                            exports[str(key.value)] = target
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            base = _resolve_from(node, package, True)
            if base in modules:
                for alias in node.names:
                    exports.setdefault(alias.asname or alias.name, base)
    return exports


def _resolve_from(node: ast.ImportFrom, module: str, package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    if not package:
        parts.pop()
    if node.level > 1:
        parts = parts[: len(parts) - (node.level - 1)]
    return ".".join([*parts, node.module] if node.module else parts)


def import_graph() -> tuple[list[Edge], dict[str, Path]]:
    modules = module_files()
    texts = {name: path.read_text() for name, path in modules.items()}
    trees = {name: ast.parse(text, filename=str(modules[name])) for name, text in texts.items()}
    exports = {name: _exports(trees[name], name, modules) for name, path in modules.items() if is_package(path)}
    edges = []
    for name, tree in trees.items():
        path = modules[name]
        file = str(path.relative_to(ROOT))
        by_name = '"cdlm.' in texts[name] or "'cdlm." in texts[name]  # worth reading string literals

        def add(target: str, node: ast.AST, guard: str, via_reexport: bool = False) -> None:
            if target != name:
                edges.append(Edge(name, target, file, node.lineno, guard, via_reexport))

        for node, guard in _statements(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("cdlm"):
                        add(alias.name, node, guard)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve_from(node, name, is_package(path))
                if not base.startswith("cdlm"):
                    continue
                for alias in node.names:
                    child = f"{base}.{alias.name}"
                    if child in modules:
                        add(child, node, guard)
                    elif alias.name in exports.get(base, {}):
                        add(base, node, guard, via_reexport=True)
                        add(exports[base][alias.name], node, guard)
                    else:
                        add(base, node, guard)
            elif by_name and not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):  # docstrings
                for constant in _expressions(node):
                    if isinstance(constant, ast.Constant) and isinstance(constant.value, str):
                        target = _module_of_string(constant.value, modules)
                        if target is not None:
                            add(target, constant, guard)
    return edges, modules


def layer_of(module: str) -> tuple[int, str] | None:
    top = module.split(".")[1] if "." in module else ""
    return LAYERS.get(top)


def violations(edges: list[Edge], modules: dict[str, Path]) -> dict[str, list[str]]:
    """Violation key -> the ``file:line`` evidence."""
    found: dict[str, list[str]] = defaultdict(list)
    for module in modules:
        if layer_of(module) is None:
            found[f"unplaced: {module} (add its top-level name to LAYERS)"].append(
                str(modules[module].relative_to(ROOT))
            )
    for edge in edges:
        source, target = layer_of(edge.source), layer_of(edge.target)
        if source is None or target is None:
            continue
        (source_rank, source_group), (target_rank, target_group) = source, target
        upward = target_rank > source_rank
        sideways = target_rank == source_rank and target_group != source_group
        if upward or (sideways and (edge.source, edge.target) not in ALLOWED_SIDEWAYS):
            found[f"layer: {edge.source} -> {edge.target}"].append(edge.where)
        if edge.via_reexport and edge.source.startswith(edge.target + "."):
            found[f"re-export: {edge.source} imports through its own package {edge.target}"].append(edge.where)
    for component in cycles(edges, modules):
        members = ", ".join(sorted(component))
        for e in cycle_edges(edges, modules):
            if e.source in component and e.target in component:
                found[f"cycle: {e.source} -> {e.target}"].append(f"{e.where} (cycle of {members})")
    return {key: sorted(set(evidence)) for key, evidence in found.items()}


def cycle_edges(edges: list[Edge], modules: dict[str, Path]) -> list[Edge]:
    """Edges that count for cycles: all but imports under ``if TYPE_CHECKING:`` or ``if __name__ == "__main__":``."""
    return [e for e in edges if not e.guard and e.target in modules]


def cycles(edges: list[Edge], modules: dict[str, Path]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for edge in cycle_edges(edges, modules):
        graph[edge.source].add(edge.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []
    counter = 0
    for start in sorted(modules):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(component)
    return components


def _report(found: dict[str, list[str]], keys) -> str:
    return "\n".join(f"  {key}\n" + "".join(f"      at {where}\n" for where in found[key]) for key in sorted(keys))


def test_imports_respect_the_layers_and_form_no_cycles():
    edges, modules = import_graph()
    found = violations(edges, modules)
    new = set(found) - KNOWN
    fixed = KNOWN - set(found)
    message = ""
    if new:
        message += "new import-contract violations:\n" + _report(found, new)
    if fixed:
        message += "fixed (remove from KNOWN in tests/test_import_layers.py):\n" + "".join(
            f"  {key}\n" for key in sorted(fixed)
        )
    assert not message, message


def test_the_reader_sees_every_kind_of_import(tmp_path, monkeypatch):
    """The checker finds function-local, relative, re-exported and by-name imports; TYPE_CHECKING is no cycle."""
    files = {
        "__init__.py": "",
        "models/__init__.py": (
            "from cdlm._lazy import lazy_exports\n"
            '__getattr__, __dir__ = lazy_exports(__name__, {"loader": "cdlm.models.load"})\n'
        ),
        "models/load.py": "def f():\n    from ..eval_harness import data\n",
        "models/other.py": "from cdlm.models import loader\n",
        "decoding/__init__.py": "",
        "decoding/a.py": (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cdlm.eval_harness.task import Rule\n"
            "def g():\n    from . import b\n"
        ),
        "decoding/b.py": 'REGISTRY = {"a": "cdlm.decoding.a:Thing"}\n',
        "eval_harness/__init__.py": "",
        "eval_harness/data.py": "def h():\n    from cdlm.models import load\n",
        "eval_harness/task.py": "from cdlm.decoding.a import Thing\n",
        "eval_harness/run.py": 'if __name__ == "__main__":\n    import cdlm.eval_harness.go\n',
        "eval_harness/go.py": "from cdlm.eval_harness.run import main\n",
        "stray.py": "",
    }
    for name, text in files.items():
        (tmp_path / "cdlm" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "cdlm" / name).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "cdlm")
    edges, modules = import_graph()
    found = violations(edges, modules)
    assert set(found) == {
        "unplaced: cdlm.stray (add its top-level name to LAYERS)",
        "layer: cdlm.models.load -> cdlm.eval_harness.data",
        "layer: cdlm.decoding.a -> cdlm.eval_harness.task",
        "re-export: cdlm.models.other imports through its own package cdlm.models",
        "cycle: cdlm.eval_harness.data -> cdlm.models.load",
        "cycle: cdlm.models.load -> cdlm.eval_harness.data",
        "cycle: cdlm.decoding.a -> cdlm.decoding.b",
        "cycle: cdlm.decoding.b -> cdlm.decoding.a",
    }
    assert found["layer: cdlm.models.load -> cdlm.eval_harness.data"] == ["cdlm/models/load.py:2"]
    assert found["cycle: cdlm.decoding.b -> cdlm.decoding.a"] == [
        "cdlm/decoding/b.py:1 (cycle of cdlm.decoding.a, cdlm.decoding.b)"
    ]
    assert ("cdlm.models.other", "cdlm.models.load") in {(e.source, e.target) for e in edges}
