"""The layering rules of docs/ARCHITECTURE.md, checked on the source itself.

- models/ is the mathematics: it imports no Ray, Prefect, MLflow, fsspec or s3fs.
- tasks/ holds no math: no losses, resizes or pooling from torch.nn.functional (those live
  in models/, e.g. models.resize and the loss objects).
- flows/ only composes: no torch, no Ray.
- No import cycles among the project's modules, counting imports inside functions too (a
  lazy import hides a cycle from Python, not from a reader).
- tasks/ and flows/ keep modules and functions to a size a reader holds in their head.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("admflow", "flows", "tasks", "models", "infra")

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def _modules(package: str) -> Iterator[tuple[str, Path]]:
    for path in sorted((REPO / package).rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        yield ".".join(parts), path


def _imports(path: Path, module: str) -> set[str]:
    """Every module named by an import statement anywhere in the file (absolute names)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return names


def _all_modules() -> dict[str, Path]:
    return {name: path for pkg in PACKAGES for name, path in _modules(pkg)}


def _top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("module,path", list(_modules("models")), ids=lambda v: str(v))
def test_models_import_no_runtime_or_storage(module, path):
    banned = {"ray", "prefect", "mlflow", "fsspec", "s3fs", "boto3", "pyarrow", "tasks", "flows"}
    found = sorted({n for n in _imports(path, module) if _top(n) in banned})
    assert not found, f"{module} imports {found}: models/ is mathematics only"


# torch.nn.functional calls that are math tasks/ must take from models/
_MATH_CALLS = {
    "interpolate",
    "avg_pool2d",
    "adaptive_avg_pool2d",
    "cross_entropy",
    "nll_loss",
    "mse_loss",
    "l1_loss",
    "binary_cross_entropy",
    "kl_div",
    "log_softmax",
}


def _math_calls(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in _MATH_CALLS:
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.func.attr}")
    return found


def test_tasks_hold_no_losses_or_resizes():
    found = [hit for _, path in _modules("tasks") for hit in _math_calls(path)]
    assert not found, f"math in tasks/ (move it to models/): {found}"


def test_flows_only_compose():
    for module, path in _modules("flows"):
        found = sorted({n for n in _imports(path, module) if _top(n) in {"torch", "ray"}})
        assert not found, f"{module} imports {found}: flows/ composes stages from tasks/"


def _graph() -> dict[str, set[str]]:
    mods = _all_modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets = set()
        for imported in _imports(path, name):
            # the longest project module that the imported name starts with
            parts = imported.split(".")
            for i in range(len(parts), 0, -1):
                cand = ".".join(parts[:i])
                if cand in mods:
                    if cand != name and not name.startswith(cand + "."):
                        targets.add(cand)
                    break
        graph[name] = targets
    # a package's __init__ that is empty adds no edges; one that imports adds its own
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]


@pytest.mark.parametrize("package", ["tasks", "flows"])
def test_modules_and_functions_fit_on_a_screen(package):
    long_modules = [
        f"{path.relative_to(REPO)} ({n})"
        for _, path in _modules(package)
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    long_functions = [hit for _, path in _modules(package) for hit in _long_functions(path)]
    assert not long_modules, f"modules over {MAX_MODULE_LINES} lines: {long_modules}"
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"
