"""The import graph of mtlab, read with `ast` (no module is imported): no cycle among module-level
imports, and no cycle hidden behind imports inside functions either, except the known ones listed
below (issue #24; they sit in study files another change rewrites). Function-level imports of mtlab
modules are counted and reported; the modules in NO_FUNCTION_LEVEL import every mtlab module at the
top (function-level imports are for optional extras only)."""
from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mtlab"

#: cycles through function-level imports still allowed: none (issue #24 broke the last three, in the
#: study layer: merging/merge_artifacts, minilm/minilm_artifacts, modular/explore)
KNOWN_CYCLES: dict[str, set[str]] = {}

#: modules whose mtlab imports are all at module level (the cycles that made them lazy are broken)
NO_FUNCTION_LEVEL = ("mtlab.registry", "mtlab.registries", "mtlab.keys", "mtlab.paths", "mtlab.cache", "mtlab.teacher",
                     "mtlab.train", "mtlab.baselines", "mtlab.layer_rules", "mtlab.block_influence", "mtlab.profiles",
                     "mtlab.merging.methods", "mtlab.modular.plan", "mtlab.modular.bank", "mtlab.modular.replacing",
                     "mtlab.tasks.split", "mtlab.tasks.kinds", "mtlab.tasks.metrics", "mtlab.tasks.pairs",
                     "mtlab.tasks.sentences")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: dict) -> list[str]:
    """The mtlab modules an import statement loads (`from .x import y` is module x.y when that is a
    module, else x)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = module.split(".") if is_package else module.split(".")[:-1]
        if node.level:
            base = base[:len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        names = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]
    out = []
    for name in names:
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in modules and name != module:
            out.append(name)
    return out


def import_graph() -> dict[tuple[str, str], str]:
    """{(importer, imported): "module" or "function"} over mtlab's modules; an import inside a def or
    lambda is "function" level (a class body runs at import: module level); imports under
    `if TYPE_CHECKING:` are left out (they never run)."""
    modules = _modules()
    edges: dict[tuple[str, str], str] = {}

    def walk(node, module, is_package, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            level = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in _targets(child, module, is_package, modules):
                    if edges.get((module, target)) != "module":
                        edges[(module, target)] = "function" if level else "module"
            walk(child, module, is_package, level)

    for module, path in modules.items():
        walk(ast.parse(path.read_text(encoding="utf-8")), module, path.name == "__init__.py", False)
    return edges


def function_level_imports() -> Counter:
    """How many import statements inside functions load an mtlab module, per importing module."""
    modules, out = _modules(), Counter()

    def walk(node, module, is_package, in_function):
        for child in ast.iter_child_nodes(node):
            level = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if level and isinstance(child, (ast.Import, ast.ImportFrom)) and _targets(child, module, is_package, modules):
                out[module] += 1
            walk(child, module, is_package, level)

    for module, path in modules.items():
        walk(ast.parse(path.read_text(encoding="utf-8")), module, path.name == "__init__.py", False)
    return out


def cycles(edges) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan), each a set of modules."""
    graph: dict[str, list[str]] = {}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, [])
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_the_graph_reads_relative_package_and_function_level_imports():
    edges = import_graph()
    assert edges[("mtlab.train", "mtlab.keys")] == "module"
    assert edges[("mtlab.merging", "mtlab.merging.lowrank")] == "module"   # `from . import lowrank`
    assert edges[("mtlab.cli", "mtlab.registries")] == "function"          # read only when help is printed
    assert ("mtlab.train", "mtlab.cache") not in edges                       # the cycle issue #24 names is gone
    assert cycles({("a", "b"): 1, ("b", "c"): 1, ("c", "a"): 1, ("c", "d"): 1}) == [{"a", "b", "c"}]


def test_no_cycle_among_module_level_imports():
    found = cycles([e for e, level in import_graph().items() if level == "module"])
    assert found == [], f"module-level import cycles: {found}"


def test_no_cycle_hidden_by_function_level_imports_beyond_the_known_ones():
    found = cycles(import_graph())
    new = [c for c in found if c not in KNOWN_CYCLES.values()]
    assert new == [], (f"import cycles through function-level imports: {new}; import at module level and move what "
                       "both sides need into a module both import (as mtlab.paths / mtlab.keys did for cache, "
                       "teacher and train)")


def test_function_level_mtlab_imports_are_counted_and_gone_where_the_cycles_were():
    counts = function_level_imports()
    print(f"function-level imports of mtlab modules: {sum(counts.values())} in {len(counts)} modules; most: "
          f"{counts.most_common(5)}")
    assert sum(counts.values()) > 0   # the count is reported (-s); the study layer still has many
    lazy = {m: counts[m] for m in NO_FUNCTION_LEVEL if counts[m]}
    assert lazy == {}, f"function-level mtlab imports in {lazy}: import them at the top (no cycle needs them now)"
