"""The house rules of the package layout, read from the source with ``ast``.

- A wing (``intake/patient``, ``intake/staff``, ``intake/compliance``) never imports another
  wing: what two wings share lives in the domain or in ``intake/forms.py``.
- ``intake/`` never imports ``workers/``, save the shell's one hand-over (``create_app`` gives the
  outbox its publisher from ``workers.publish``).
- No import cycle between the modules of ``intake/`` and ``workers/``.

Every import statement that can run counts, at module level or inside a function: a function-
level import still ties the two modules together (the circles this layout removed were all
function-level ones), it only hides the circle from Python's import machinery. Imports under
``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WINGS = ("intake.patient", "intake.staff", "intake.compliance")
# (importer, imported): the shell wiring the outbox to the Celery app (intake.register_task_queue).
ALLOWED_INTAKE_TO_WORKERS = {("intake", "workers.publish")}


def module_files() -> dict[str, Path]:
    modules = {}
    for top in ("intake", "workers"):
        for path in (ROOT / top).rglob("*.py"):
            relative = path.relative_to(ROOT).with_suffix("")
            if "migrations" in relative.parts:
                continue  # Alembic scripts, loaded by Alembic, not imported
            parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
            modules[".".join(parts)] = path
    return modules


def _runs(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements outside ``if TYPE_CHECKING:`` blocks."""

    def visit(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for branch in child.orelse:
                    yield from visit_one(branch)
                continue
            yield from visit_one(child)

    def visit_one(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        else:
            yield from visit(node)

    yield from visit(tree)


def imports_of(name: str, path: Path, modules: Mapping[str, Path]) -> set[str]:
    """The modules of ``modules`` that module ``name`` imports."""

    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    is_package = path.name == "__init__.py"
    found: set[str | None] = set()
    for node in _runs(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {resolve(alias.name) for alias in node.names}
            continue
        base = node.module or ""
        if node.level:
            package = name.split(".")
            package = package if is_package else package[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join([*package, *([base] if base else [])])
        for alias in node.names:
            full = f"{base}.{alias.name}"
            found.add(full if full in modules else resolve(base))
    found.discard(None)
    found.discard(name)
    return {m for m in found if m is not None}


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def wing_of(module: str) -> str | None:
    return next((w for w in WINGS if module == w or module.startswith(w + ".")), None)


def test_no_wing_imports_another_wing():
    crossings = [
        f"{importer} imports {imported}"
        for importer, imported_set in import_graph().items()
        for imported in sorted(imported_set)
        if wing_of(importer) and wing_of(imported) and wing_of(imported) != wing_of(importer)
    ]
    assert crossings == []


def test_intake_never_imports_workers_but_for_the_shells_hand_over():
    reaching = {
        (importer, imported)
        for importer, imported_set in import_graph().items()
        for imported in imported_set
        if importer.split(".")[0] == "intake" and imported.split(".")[0] == "workers"
    }
    assert reaching - ALLOWED_INTAKE_TO_WORKERS == set()


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_checks_see_what_they_are_meant_to_see():
    """The graph holds known edges, function-level ones included, and a circle is found."""
    graph = import_graph()
    assert "intake.audit.chain" in graph["intake.requests.submit"]
    assert "workers.publish" in graph["intake"]  # inside register_task_queue
    assert "intake.forms" in graph["intake.staff.views"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
