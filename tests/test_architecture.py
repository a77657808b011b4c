"""The shape of the house: how deep the project's imports go and how long its functions are.

Every `import` counts, at module level or inside a function (a deferred import is still a
dependency), among the modules of `pruner/` and of the kernel library; bench scripts and tests
are entry points, not floors. Run `python tests/test_architecture.py` to print the numbers.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"pruner": ROOT / "pruner", "o1pruner_kernels": ROOT / "kernels" / "o1pruner_kernels"}
MAX_CHAIN = 5
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _imports(module: str) -> set[str]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in MODULES}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            submodules = {f"{base}.{alias.name}" for alias in node.names} & MODULES.keys()
            found |= submodules
            if base in MODULES and len(submodules) < len(node.names):  # names defined in `base` itself
                found.add(base)
    found.discard(module)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


@functools.lru_cache(maxsize=None)
def longest_chain(module: str, seen: frozenset[str] = frozenset()) -> tuple[str, ...]:
    """The longest path of imports starting at `module` (a cycle is cut where it closes)."""
    below = [longest_chain(dep, seen | {module}) for dep in GRAPH[module] if dep not in seen | {module}]
    return (module, *max(below, key=len, default=()))


def function_lengths(folder: Path) -> list[tuple[int, str]]:
    lengths = []
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                where = f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"
                lengths.append((node.end_lineno - node.lineno + 1, where))
    return sorted(lengths, reverse=True)


def test_no_chain_of_imports_is_longer_than_five_files():
    chain = max((longest_chain(m) for m in MODULES), key=len)
    assert len(chain) <= MAX_CHAIN, f"{len(chain)} files: {' -> '.join(chain)}"


def test_the_measure_sees_a_deferred_import():
    # the trainer reaches the kernels only through imports; if the walker missed them it would see no chain
    assert "o1pruner_kernels.fused_linear" in GRAPH["pruner.modeling"]
    assert len(longest_chain("pruner.train")) >= 3


def test_no_function_in_pruner_is_longer_than_sixty_lines():
    too_long = [f"{n} lines: {where}" for n, where in function_lengths(PACKAGES["pruner"]) if n > MAX_FUNCTION_LINES]
    assert not too_long, "\n".join(too_long)


def test_no_stage_imports_another_stage():
    # stages build one another's configs (pruner/configs.py); importing a stage would stack them again
    stages = {"pruner.presample", "pruner.dataset", "pruner.train", "pruner.demo"}
    crossings = [f"{m} -> {d}" for m in stages for d in GRAPH[m] & stages]
    assert not crossings, crossings


if __name__ == "__main__":
    chain = max((longest_chain(m) for m in MODULES), key=len)
    print(f"longest import chain: {len(chain)} files: {' -> '.join(chain)}")
    for module in sorted(MODULES):
        print(f"  {len(longest_chain(module))}  {module}")
    print("longest functions in pruner/:")
    for n, where in function_lengths(PACKAGES["pruner"])[:10]:
        print(f"  {n:4d}  {where}")
