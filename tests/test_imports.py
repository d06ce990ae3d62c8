"""The package's layering, read from the source with ``ast`` (nothing is imported): ``quant`` never
reaches ``train``, and no two subpackages import each other, directly or around a loop. Imports
inside functions count as much as those at the top of a module: a lazy import only delays the
cycle to the first call."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import effdeploy

ROOT = Path(effdeploy.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
SUBPACKAGES = sorted({name.split(".")[1] for name, p in MODULES.items() if p.name == "__init__.py" and "." in name})


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(imported effdeploy module, line) for every import statement anywhere in the module,
    resolved to the deepest module that exists (``from effdeploy.quant import verify`` is
    ``effdeploy.quant.verify``; ``from effdeploy.config import parse`` is ``effdeploy.config``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{a.name}" for a in node.names] or [source]
            targets = [t if t in MODULES else source for t in targets]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # an attribute path: its module
                target = target.rpartition(".")[0]
            if target.startswith("effdeploy") and (target, node.lineno) not in found:
                found.append((target, node.lineno))
    return found


IMPORTS = {name: _imports(name, path) for name, path in MODULES.items()}


def _subpackage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in SUBPACKAGES else None


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(ROOT.parent)}:{line}"


def test_the_parser_sees_both_kinds_of_import() -> None:
    """A module-level and a function-level import this file's reader must find (else the checks
    below would pass on an empty graph)."""
    assert {"data", "model", "quant", "runtime", "train", "transforms"} <= set(SUBPACKAGES)
    verify = dict(IMPORTS["effdeploy.quant.verify"])
    assert "effdeploy.runtime" in verify  # at the top of the module
    assert "effdeploy.quant.emit_onnx" in verify  # inside runtime_artifacts


def test_quant_does_not_import_train() -> None:
    direct = [
        f"{_where(m, line)} imports {t}"
        for m, found in IMPORTS.items()
        if m.startswith("effdeploy.quant")
        for t, line in found
        if t.startswith("effdeploy.train")
    ]
    assert not direct, "\n".join(direct)


def test_quant_does_not_reach_train() -> None:
    """Nor through another module: whatever a quant module (or anything it imports, lazily or
    not) imports, no module of ``train`` is loaded. Importing a module runs its packages'
    ``__init__`` first, so those are followed too."""
    parent: dict[str, str] = {}
    stack = [m for m in MODULES if m.startswith("effdeploy.quant")]
    seen = set(stack)
    while stack:
        m = stack.pop()
        nexts = [t for t, _ in IMPORTS[m]]
        nexts += [".".join(t.split(".")[:i]) for t in nexts for i in range(1, t.count(".") + 1)]
        for t in nexts:
            if t in MODULES and t not in seen:
                seen.add(t)
                parent[t] = m
                stack.append(t)
    reached = sorted(m for m in seen if m.startswith("effdeploy.train"))
    chains = []
    for m in reached:
        chain = [m]
        while chain[-1] in parent:
            chain.append(parent[chain[-1]])
        chains.append(" <- ".join(chain))
    assert not reached, "\n".join(chains)


def _edges(unit=None) -> dict[tuple[str, str], list[str]]:
    """(importer, imported) pairs of units -- subpackages by default -- each with the import
    statements behind it."""
    unit = unit or _subpackage
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for m, found in IMPORTS.items():
        a = unit(m)
        for t, line in found:
            b = unit(t)
            if a and b and a != b:
                edges[(a, b)].append(f"{_where(m, line)} imports {t}")
    return edges


def _cycles(nodes: list[str], edges) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    succ = defaultdict(list)
    for a, b in edges:
        succ[a].append(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(succ[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in nodes:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_loop() -> None:
    """The finder itself, on a graph with a three-node loop, a two-node loop and a tail."""
    edges = {("a", "b"), ("b", "c"), ("c", "a"), ("c", "d"), ("e", "f"), ("f", "e")}
    assert sorted(_cycles(list("abcdef"), edges)) == [["a", "b", "c"], ["e", "f"]]
    assert _cycles(list("abcd"), {("a", "b"), ("b", "c"), ("a", "c"), ("c", "d")}) == []


def test_no_import_cycle_between_subpackages() -> None:
    edges = _edges()
    cycles = _cycles(SUBPACKAGES, edges)
    report = []
    for comp in cycles:
        report.append("cycle: " + " <-> ".join(comp))
        for (a, b), sites in sorted(edges.items()):
            if a in comp and b in comp:
                report += [f"  {a} -> {b}: {s}" for s in sites]
    assert not cycles, "\n".join(report)


def _unit(module: str) -> str | None:
    """A subpackage, or a top-level module of the package (config, report, fileio, ...)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_no_import_cycle_between_modules_and_subpackages() -> None:
    edges = _edges(_unit)
    units = sorted({u for m in IMPORTS for u in [_unit(m)] if u})
    cycles = _cycles(units, edges)
    report = []
    for comp in cycles:
        report.append("cycle: " + " <-> ".join(comp))
        report += [
            f"  {a} -> {b}: {s}" for (a, b), sites in sorted(edges.items()) if a in comp and b in comp for s in sites
        ]
    assert not cycles, "\n".join(report)
