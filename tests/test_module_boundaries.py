"""Module boundaries of vllm_duo: what may import vLLM, and imports flowing one way.

Every import counts, also those inside functions (they run too); only imports under
``if TYPE_CHECKING:`` are for type checkers alone and are skipped.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "vllm_duo"

# The algorithm, kernels and their Python APIs: never vLLM (DESIGN.md section 4).
PURE = (
    "errors", "settings", "patterns", "reference", "head_layout", "tp_slots", "cpu_ops",
    "cuda_ops", "_build_cpu", "_build_cuda", "kernels", "testing", "evaluation", "machine",
    "calibration", "worker_process",
)  # fmt: skip
# The worker a pure package starts in its own process to run vLLM (public API only).
ENGINE_WORKERS = ("evaluation.worker",)
# vLLM internals go through this one module; others may use only vLLM's public `vllm` API.
INTERNALS = "_vllm"


def _modules() -> dict[str, Path]:
    return {
        ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__"):
        path
        for path in PACKAGE.rglob("*.py")
    }  # fmt: skip


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    type_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only.update(id(child) for child in ast.walk(node))
    names = []
    package = ".".join(["vllm_duo", *path.relative_to(PACKAGE).parent.parts])
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names.append(f"{base}.{node.module}" if node.module else base)
            else:
                names.append(node.module or "")
            base = names[-1]
            if base.split(".")[0] == "vllm_duo":  # `from vllm_duo import x` may be a module
                names += [f"{base}.{alias.name}" for alias in node.names]
    return names


MODULES = _modules()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_vllm_internals_only_through_one_module(module: str) -> None:
    top = module.split(".")[0]
    for name in _imports(MODULES[module]):
        if name == "vllm" or not name.startswith("vllm."):
            if top in PURE and module not in ENGINE_WORKERS:
                assert name.split(".")[0] != "vllm", f"pure module {module} imports {name}"
            continue
        assert module == INTERNALS, f"{module} imports the vLLM internal {name}: use _vllm"


def test_imports_flow_one_way() -> None:
    graph = {
        module: {
            target.removeprefix("vllm_duo.")
            for target in _imports(path)
            if target.startswith("vllm_duo.") and target.removeprefix("vllm_duo.") in MODULES
        }
        - {module}
        for module, path in MODULES.items()
    }
    # A package's __init__ re-exporting its submodules is not a cycle through them.
    for module, targets in graph.items():
        graph[module] = {t for t in targets if not t.startswith(module + ".")}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycle = [*path[path.index(target) :], target]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
