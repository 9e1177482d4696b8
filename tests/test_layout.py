"""The package's shape: no import cycles (function-level imports included), no module much over 500
lines, click and rich only in the CLI and its views. Pure static reading, no imports."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "llamajobs"
MAX_LINES = 550


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every llamajobs module this one imports, at any depth in its code (`from a import b` counts b
    when b is a module, else a), except for annotations only."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text())
    # Imports under `if TYPE_CHECKING:` are for annotations only: never run, so never a cycle.
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                   for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(name, path, known) for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_much_over_500_lines():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def third_party(path: Path) -> set[str]:
    """The top-level packages a module imports from outside llamajobs, at any depth in its code."""
    tree = ast.parse(path.read_text())
    used = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    used |= {node.module.split(".")[0] for node in ast.walk(tree)
             if isinstance(node, ast.ImportFrom) and node.module and not node.level}
    return used - {"llamajobs"}


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    """`start` and every module its imports reach, transitively."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(edges.get(name, ()))
    return seen


def test_click_and_rich_only_in_the_cli_and_views():
    for name, path in modules().items():
        if name.startswith("llamajobs.cli") or name.split(".")[-1] == "views":  # llamajobs.views, sweep.views
            continue
        used = third_party(path)
        assert not used & {"click", "rich"}, f"{name} imports {used & {'click', 'rich'}}"


# The login node's planning and rendering: the training worker needs none of it (its FLOPs per token are
# the catalog's, its DeepSpeed config a dict built by worker/zero_config.py).
NOT_IN_THE_WORKER = ("llamajobs.estimate", "llamajobs.render")


def _planner_or_renderer(name: str) -> bool:
    return any(name == banned or name.startswith(banned + ".") for banned in NOT_IN_THE_WORKER)


def test_no_worker_module_imports_the_estimator_the_renderer_or_jinja():
    edges, mods = graph(), modules()
    for name in (n for n in mods if n.startswith("llamajobs.worker")):
        assert not [target for target in edges[name] if _planner_or_renderer(target)], name
        assert "jinja2" not in third_party(mods[name]), name


def test_the_training_worker_reaches_neither_the_estimator_nor_the_renderer():
    """What `python -m llamajobs.worker` imports, followed through every module it reaches."""
    mods = modules()
    reached = reachable(graph(), "llamajobs.worker.__main__")
    assert {"llamajobs.worker.train", "llamajobs.worker.zero", "llamajobs.catalog"} <= reached  # (the walk works)
    assert sorted(name for name in reached if _planner_or_renderer(name)) == []
    assert sorted(name for name in reached if "jinja2" in third_party(mods[name])) == []


# What an engine does differently is its Strategy class's (worker/parallel.py, zero.py): the loop and the
# checkpointer ask the hooks, never the engine's facts or name (train.ENGINES alone maps names to classes).
ENGINE_FACTS = {"deepspeed", "fsdp", "engine", "zero_stage", "offload_optimizer", "offload_params", "offload"}
ENGINE_NAMES = {"deepspeed", "fsdp", "pp"}


def test_the_loop_and_the_checkpointer_never_branch_on_an_engine():
    for name in ("llamajobs.worker.train", "llamajobs.worker.checkpoint"):
        tree = ast.parse(modules()[name].read_text())
        engines = [node for node in ast.walk(tree) if isinstance(node, ast.AnnAssign)
                   and isinstance(node.target, ast.Name) and node.target.id == "ENGINES"]
        table = {id(n) for node in engines for n in ast.walk(node)}
        lookup = {id(n) for node in ast.walk(tree) if isinstance(node, ast.Subscript)
                  and isinstance(node.value, ast.Name) and node.value.id == "ENGINES" for n in ast.walk(node)}
        asked = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                 and node.attr in ENGINE_FACTS and id(node) not in lookup]
        named = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
                 and node.value in ENGINE_NAMES and id(node) not in table]
        assert (asked, named) == ([], []), name
