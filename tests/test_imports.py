"""fedlm's import graph: no cycles, and every arrow points down the layers of DESIGN.md.

grimp (the graph library behind import-linter) reads every import statement in the package,
including those inside functions, so a cycle hidden behind a lazy import is still a cycle.
Imports under `if TYPE_CHECKING:` are left out: they never run.
"""

from __future__ import annotations

import grimp
import pytest

# DESIGN.md's layers, bottom (0) to top. A module's part is its longest prefix listed here.
LAYERS: dict[str, int] = {
    # the bottom: config, model, data and the privacy mechanisms (and plain helpers)
    "fedlm": 0, "fedlm.threadsafe": 0, "fedlm.errors": 0, "fedlm.fileio": 0, "fedlm.runlock": 0, "fedlm.progress": 0, "fedlm.config": 0,
    "fedlm.model": 0, "fedlm.shapes": 0, "fedlm.data": 0, "fedlm.corpus": 0, "fedlm.privacy": 0, "fedlm.device": 0,
    "fedlm.value.shapley": 0, "fedlm.value.compute": 0,  # the game arithmetic: plain numbers
    # model I/O on top of the model: fedlm's format, Hugging Face's, LoRA, any directory, and the
    # resolution of a run's model config and silos from them and the workspace
    "fedlm.modelio": 1, "fedlm.hf": 1, "fedlm.lora": 1, "fedlm.pretrained": 1, "fedlm.generate": 1,
    "fedlm.resolve": 1,
    # train and evaluate (and the audits, which evaluate a trained model)
    "fedlm.train": 2, "fedlm.evaluate": 2, "fedlm.privacy.audit": 2,
    # a model's predictions made visible (explain) reads models as evaluate does
    "fedlm.explain": 2,
    # federation above train
    "fedlm.federation": 3,
    # what drives the parts: the planner, the server, the presets and the demo, the CLI on top
    "fedlm.plan": 4, "fedlm.serve": 4, "fedlm.report": 4, "fedlm.value": 4, "fedlm.presets": 5, "fedlm.demo": 5, "fedlm.assistant": 5,
    "fedlm.cli": 6,
}


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("fedlm", exclude_type_checking_imports=True)


def _edges(graph: grimp.ImportGraph) -> dict[str, set[str]]:
    return {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return found


def _chain(graph: grimp.ImportGraph, cycle: list[str]) -> str:
    a, b = cycle[0], next(m for m in cycle[1:] if graph.chain_exists(cycle[0], m))
    there = graph.find_shortest_chain(a, b) or ()
    back = graph.find_shortest_chain(b, a) or ()
    return " -> ".join([*there, *back[1:]])


def _layer(module: str) -> int:
    if module in LAYERS:  # "fedlm" itself (its __init__) is listed, but is no module's part
        return LAYERS[module]
    parts = module.split(".")
    for n in range(len(parts) - 1, 1, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise AssertionError(f"{module}: not in a layer of tests/test_imports.py LAYERS; add its part there")


def test_cycle_finder_finds_a_cycle_and_only_it() -> None:
    """The finder against a hand-made graph: a -> b -> c -> a is one cycle, d hangs off it."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert _cycles(edges) == [["a", "b", "c"]]


def test_no_import_cycle_in_the_package(graph: grimp.ImportGraph) -> None:
    """No module imports, directly or through others, a module that imports it back."""
    cycles = _cycles(_edges(graph))
    assert not cycles, "import cycles:\n" + "\n".join(_chain(graph, c) for c in cycles)


def test_imports_point_down_the_layers(graph: grimp.ImportGraph) -> None:
    """No part imports one above it (DESIGN.md: config, model, data at the bottom; the CLI on top)."""
    upward = [
        f"{m} (layer {_layer(m)}) imports {n} (layer {_layer(n)})"
        for m, targets in sorted(_edges(graph).items())
        for n in sorted(targets)
        if _layer(n) > _layer(m)
    ]
    assert not upward, "imports pointing up:\n" + "\n".join(upward)


def test_flower_is_imported_by_the_federation_part_alone() -> None:
    """DESIGN.md: Flower is imported in the federation part alone."""
    graph = grimp.build_graph("fedlm", include_external_packages=True, exclude_type_checking_imports=True)
    outside = sorted(
        m for m in graph.find_modules_that_directly_import("flwr")
        if not m.startswith("fedlm.federation")
    )
    assert not outside, f"modules outside fedlm.federation import flwr: {outside}"


# The training loops and the CLI's commands read top to bottom as one story; everything else
# stays small enough to read at once (issue 14: "no function over ~60 lines").
LONG_ALLOWED = {("fedlm/train.py", "train"), ("fedlm/train.py", "local_update")}
MAX_LINES = 65


def test_no_long_functions_outside_the_training_loop_and_the_cli() -> None:
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    long = []
    for path in sorted((root / "fedlm").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel == "fedlm/cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (rel, node.name) not in LONG_ALLOWED:
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_LINES:
                    long.append(f"{rel}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split these functions:\n" + "\n".join(long)
