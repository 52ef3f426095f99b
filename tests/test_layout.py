"""The layout holds: calls go one way (front ends → engines → families → utils), no import cycles, no
component named by the engine's argument parser, no source file over 400 lines. Read from the code's
own import statements (AST), lazy imports inside functions included."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FRONT_ENDS = {"main", "train_splits", "eval_splits", "sweep"}
ENGINES = {"continual", "memorization"}
FAMILIES = {"datasets", "backbones", "models", "buffer_policies", "plasticity"}
TOOLS = {"utils"}
LAYER = {**{p: 3 for p in FRONT_ENDS}, **{p: 2 for p in ENGINES}, **{p: 1 for p in FAMILIES}, **{p: 0 for p in TOOLS}}
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_modules() -> dict[str, Path]:
    files = [ROOT / f"{name}.py" for name in FRONT_ENDS]
    for package in ENGINES | FAMILIES | TOOLS:
        files += sorted((ROOT / package).rglob("*.py"))
    return {module_name(f): f for f in files}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules a file imports: `from a import b` counts as a.b when a.b is a module, else a."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
    return {name for name in found if name.split(".")[0] in LAYER}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = source_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def top(module: str) -> str:
    return module.split(".")[0]


def test_imports_run_one_way_down_the_layers(graph):
    upward = [f"{a} imports {b}" for a, targets in graph.items() for b in targets
              if LAYER[top(b)] > LAYER[top(a)]]
    assert upward == []


def test_nothing_imports_a_front_end(graph):
    assert [f"{a} imports {b}" for a, targets in graph.items() for b in targets if top(b) in FRONT_ENDS] == []


def test_utils_are_leaf_tools(graph):
    assert [f"{a} imports {b}" for a, targets in graph.items() if top(a) in TOOLS
            for b in targets if top(b) not in TOOLS] == []


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

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

    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_between_files(graph):
    assert _cycles(graph) == []


def test_no_import_cycles_between_folders(graph):
    folders: dict[str, set[str]] = {}
    for a, targets in graph.items():
        folders.setdefault(top(a), set()).update(top(b) for b in targets if top(b) != top(a))
    assert _cycles(folders) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_each_family_holds_its_contract():
    from buffer_policies import Buffer, BufferPolicy
    from datasets import ContinualDataset, Split
    from models import ContinualModel
    from plasticity import Plasticity, PlasticityMethod

    for cls, family in ((Buffer, "buffer_policies"), (BufferPolicy, "buffer_policies"), (ContinualDataset, "datasets"),
                        (Split, "datasets"), (ContinualModel, "models"), (Plasticity, "plasticity"),
                        (PlasticityMethod, "plasticity")):
        assert cls.__module__ == family


def test_the_engine_argument_parser_names_no_component():
    from buffer_policies import BUFFER_POLICIES
    from models import MODELS
    from plasticity import PLASTICITY

    from continual.args import DEPRECATED_FLAGS

    names = (set(MODELS.names()) | set(BUFFER_POLICIES.names()) | set(PLASTICITY.names())) - {"reservoir", "sgd"}
    names -= set(DEPRECATED_FLAGS.values())  # a deprecated flag names the method that replaced it, once
    tree = ast.parse((ROOT / "continual" / "args.py").read_text())
    words = {word for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
             for word in node.value.replace(",", " ").replace("'", " ").split()}
    assert names & words == set()  # "reservoir" is --buffer_policy's default, "sgd" --optimizer's


def test_no_source_file_passes_400_lines():
    files = [f for f in ROOT.rglob("*.py") if ".venv" not in f.parts and "mlruns" not in f.parts]
    long = {str(f.relative_to(ROOT)): n for f in files if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_a_method_file_is_named_after_what_it_registers():
    from buffer_policies import BUFFER_POLICIES
    from models import MODELS
    from plasticity import PLASTICITY

    for registry in (MODELS, BUFFER_POLICIES, PLASTICITY):
        for cls in registry.classes():
            assert cls.__module__ == f"{registry.package}.{cls.NAME}"
    assert BUFFER_POLICIES.get("0.9max") is BUFFER_POLICIES.get("max_drop_highest")  # the paper's names still work
    assert BUFFER_POLICIES.get("0.1min") is BUFFER_POLICIES.get("min_skip_lowest")
