"""Imports inside the package go strictly downward: from the strategies to the training state, the checkpoints and
the controller, down to the engine. A static check of the import graph (``ast`` over ``lightning_localsgd/``): no
module imports from a layer above its own, the graph has no cycle (function-level imports included), and no function
imports another module of the package (a lazy import that hides a cycle) except those listed with a reason.
Imports under ``if TYPE_CHECKING:`` (for annotations only) never run and are left out."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Optional

PACKAGE = Path(__file__).resolve().parents[2] / "lightning_localsgd"

#: The layers, top to bottom (module names relative to the package, "" is the package itself): a module imports from
#: its own layer or the ones below, never from one above; inside a layer the no-cycle check keeps the order.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("entry points", ("__main__", "cli", "")),
    ("strategies (the Lightning glue)", ("strategies", "strategies.ddp", "strategies.fsdp", "strategies.deepspeed",
                                         "strategies.base")),
    ("training state, checkpoints, preemption", ("state", "checkpoint", "async_checkpoint", "preemption")),
    ("the controller and its transport's interface", ("controller", "syncs")),
    ("arguments, refusals, federation, data position, inner-strategy internals, planner",
     ("config", "support", "background", "federation", "run_secret", "data", "zero", "fsdp2", "planner", "costmodel")),
    ("the engine (no Lightning)", ("engine", "engine.codecs", "engine.comm", "engine.layout", "engine.outer",
                                   "engine.presets", "engine.reducers", "engine.schedules", "engine.screen",
                                   "engine.fragment", "engine.warmup")),
    ("leaves", ("_compat", "_versions", "addresses", "checkpoint_io", "data_shares", "integrity", "reliability", "tensors",
                "topology", "validation")),
]

#: Installed under the package's name from outside ``lightning_localsgd/``: ``examples/`` is
#: ``lightning_localsgd.examples`` (the CLI's default model and data), imported by the CLI only.
OUTSIDE = ("examples",)

#: Function-level imports of a module of the package, ``(importer, imported): reason``. None: a lazy import hiding a
#: cycle goes (what the lower module needs moves into it, or into a new small module below both).
LAZY_IMPORTS: dict[tuple[str, str], str] = {}

Graph = dict[str, list[tuple[str, bool, int]]]


def import_graph(package: Path = PACKAGE) -> Graph:
    """For every module of ``package`` (by its name relative to the package): ``(imported module, inside a function,
    line)`` for each import of a module of the package, ``examples`` for one of :data:`OUTSIDE`."""
    files = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def module_of(dotted: str) -> str:
        parts = dotted.split(".") if dotted else []
        if parts and parts[0] in OUTSIDE:
            return parts[0]
        while parts and ".".join(parts) not in files:
            parts = parts[:-1]  # `from .x import name`: name is an attribute of module x
        return ".".join(parts)

    graph: Graph = {}
    for name, path in files.items():
        here = name.split(".") if name else []
        package_parts = here if path.name == "__init__.py" else here[:-1]
        found: list[tuple[str, bool, int]] = []

        def visit(node: ast.AST, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and ast.unparse(child.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                    for other in child.orelse:
                        visit(ast.Module(body=[other], type_ignores=[]), in_function)
                    continue  # imports for annotations only, never run: no import at run time, no cycle
                if isinstance(child, ast.ImportFrom):
                    if child.level:
                        base = package_parts[:len(package_parts) - (child.level - 1)]
                        prefix = ".".join(base + ([child.module] if child.module else []))
                    elif (child.module or "").split(".")[0] == "lightning_localsgd":
                        prefix = child.module.removeprefix("lightning_localsgd").lstrip(".")
                    else:
                        continue
                    for alias in child.names:  # `from . import x` imports module x; `from .x import y`, module x
                        found.append((module_of(f"{prefix}.{alias.name}".lstrip(".")), in_function, child.lineno))
                elif isinstance(child, ast.Import):
                    for alias in child.names:
                        if alias.name.split(".")[0] == "lightning_localsgd":
                            found.append((module_of(alias.name.removeprefix("lightning_localsgd").lstrip(".")),
                                          in_function, child.lineno))
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

        visit(ast.parse(path.read_text()), False)
        graph[name] = found
    return graph


def _layer(module: str) -> int:
    return next(i for i, (_, members) in enumerate(LAYERS) if module in members)


def unplaced_modules(graph: Graph) -> list[str]:
    placed = {m for _, members in LAYERS for m in members}
    return sorted(set(graph) - placed)


def upward_imports(graph: Graph) -> list[str]:
    return [f"{name or '__init__'}:{line} imports {imported} ({LAYERS[_layer(imported)][0]}) from a module of "
            f"'{LAYERS[_layer(name)][0]}'"
            for name, imports in graph.items() for imported, _, line in imports
            if imported in graph and not unplaced_modules({name: [], imported: []})
            and _layer(imported) < _layer(name)]


def import_cycle(graph: Graph) -> Optional[list[str]]:
    """One cycle of the graph (``[a, b, ..., a]``), or ``None``."""
    edges = {name: sorted({m for m, _, _ in imports if m in graph and m != name}) for name, imports in graph.items()}
    done: set[str] = set()

    def walk(name: str, path: list[str]) -> Optional[list[str]]:
        for imported in edges[name]:
            if imported in path:
                return [*path[path.index(imported):], imported]
            if imported not in done:
                cycle = walk(imported, [*path, imported])
                if cycle is not None:
                    return cycle
        done.add(name)
        return None

    for name in graph:
        cycle = walk(name, [name]) if name not in done else None
        if cycle is not None:
            return cycle
    return None


def unlisted_lazy_imports(graph: Graph) -> list[str]:
    return [f"{name or '__init__'}:{line} imports {imported} inside a function"
            for name, imports in graph.items() for imported, in_function, line in imports
            if in_function and imported not in OUTSIDE and (name, imported) not in LAZY_IMPORTS]


def test_every_module_has_one_layer():
    graph = import_graph()
    assert not unplaced_modules(graph), f"put these modules into a layer of LAYERS: {unplaced_modules(graph)}"
    placed = [m for _, members in LAYERS for m in members]
    assert len(placed) == len(set(placed)) and set(placed) <= set(graph), "LAYERS names a module twice or a lost one"


def test_no_module_imports_from_a_layer_above_it():
    upward = upward_imports(import_graph())
    assert not upward, "imports going up (move what the lower module needs into it):\n" + "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    cycle = import_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(m or "__init__" for m in cycle)


def test_no_function_level_import_inside_the_package_but_the_listed_ones():
    graph = import_graph()
    lazy = unlisted_lazy_imports(graph)
    assert not lazy, ("import these at module level (if that goes up a layer, move what the lower module needs into "
                      "it), or list them with a reason in LAZY_IMPORTS:\n" + "\n".join(lazy))
    present = {(name, m) for name, imports in graph.items() for m, in_function, _ in imports if in_function}
    assert set(LAZY_IMPORTS) <= present, f"LAZY_IMPORTS lists imports that are gone: {set(LAZY_IMPORTS) - present}"


def test_the_checks_see_an_upward_import_a_cycle_and_a_lazy_import(tmp_path):
    """On a small package that breaks each rule, each check reports it (they cannot pass by seeing nothing)."""
    package = tmp_path / "lightning_localsgd"
    (package / "strategies").mkdir(parents=True)
    (package / "__init__.py").write_text("from .strategies import base\nfrom . import examples\n")
    (package / "strategies" / "__init__.py").write_text("")
    (package / "strategies" / "base.py").write_text("from ..state import TrainingState\nimport torch\n")
    (package / "state.py").write_text("import os\n\n\ndef f():\n    from .strategies.base import x\n")
    (package / "engine.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .strategies "
                                       "import base\nfrom lightning_localsgd.state import y\n")
    graph = import_graph(package)
    assert graph == {"": [("strategies.base", False, 1), ("examples", False, 2)], "engine": [("state", False, 4)],
                     "state": [("strategies.base", True, 5)], "strategies": [],
                     "strategies.base": [("state", False, 1)]}
    assert upward_imports(graph) == [
        "engine:4 imports state (training state, checkpoints, preemption) from a module of 'the engine (no Lightning)'",
        "state:5 imports strategies.base (strategies (the Lightning glue)) from a module of 'training state, "
        "checkpoints, preemption'"]
    assert import_cycle(graph) in (["state", "strategies.base", "state"], ["strategies.base", "state", "strategies.base"])
    assert unlisted_lazy_imports(graph) == ["state:5 imports strategies.base inside a function"]
