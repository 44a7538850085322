"""The house's layers run one way (docs/architecture.md): read every module's imports, those
inside functions included, and check the rules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "unleash_ood"

# Foundation: may import each other, never anything above.
LOWER = (
    "checkpoint",
    "models",
    "data",
    "scores",
    "metrics",
    "outputs",
    "errors",
    "options",
    "specs",
    "rng",
    "rundir",
    "device",
    "heap",
    "progress",
    "augment",
    "tables",
    "context",
)
UPPER = ("method", "train", "evaluate", "report", "track", "tune", "demo", "cli", "generative")


def lazy_by_design(module: str) -> bool:
    """The command line imports each command's modules when the command runs (an instant
    --help); the package's __init__ resolves its public names on first use."""
    return module == "unleash_ood" or top(module) == "cli"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported unleash_ood module, whether the import sits inside a function)."""
    tree = ast.parse(path.read_text())
    nested = {
        id(node)
        for fn in ast.walk(tree)
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
        for node in ast.walk(fn)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(n, id(node) in nested) for n in names if n.startswith("unleash_ood")]
    return found


def type_checking_only(path: Path) -> set[str]:
    """Modules imported under ``if TYPE_CHECKING:`` (never at run time)."""
    tree = ast.parse(path.read_text())
    return {
        n.module
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
        for n in ast.walk(node)
        if isinstance(n, ast.ImportFrom) and n.module
    }


GRAPH = {
    module_name(p): [(m, inner) for m, inner in imports(p) if m not in type_checking_only(p)]
    for p in PACKAGE.rglob("*.py")
}


def top(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if top(m) in LOWER))
def test_lower_layers_never_import_upper_ones(module: str) -> None:
    upward = [m for m, _ in GRAPH[module] if top(m) in UPPER]
    assert not upward, f"{module} imports {upward}"


def test_training_never_imports_the_evaluator() -> None:
    assert not [m for m, _ in GRAPH["unleash_ood.train"] if m == "unleash_ood.evaluate"]


def test_no_imports_hidden_inside_functions() -> None:
    hidden = {
        module: sorted(m for m, inner in deps if inner)
        for module, deps in GRAPH.items()
        if not lazy_by_design(module)
    }
    assert not {k: v for k, v in hidden.items() if v}


def test_no_import_cycles() -> None:
    edges = {m: {d for d, inner in deps if not inner and d in GRAPH} for m, deps in GRAPH.items()}
    # A package's __init__ re-exporting its own submodules is not a cycle between layers.
    for m, deps in edges.items():
        deps.discard(m)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in edges[node]:
            if dep.startswith(node + "."):  # a package importing its own submodules
                continue
            if state.get(dep) == 1 and not node.startswith(dep + "."):
                raise AssertionError(" -> ".join([*path, node, dep]))
            if dep not in state:
                visit(dep, [*path, node])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [])
