"""The package's shape (ARCHITECTURE.md): no import cycle in ``vllm_safeguard``, vLLM imported only in
``vllm_safeguard.integration``, and the integration package reached only from the entry point, the
applications and the evaluation harness's engine choice.

Imports are read from the source (every ``import`` / ``from ... import`` statement at any depth,
function-level ones included) rather than from ``sys.modules``, so a lazy import inside a function
counts like a top-level one. Imports under ``if TYPE_CHECKING:`` are left out: they never execute.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "vllm_safeguard"
INTEGRATION = f"{PACKAGE}.integration"
# Modules outside the integration package that may import it (lazily): the plugin entry point,
# the applications (launcher, CLI, demo) and the harness's choice of the vLLM offline engine.
MAY_IMPORT_INTEGRATION = (f"{PACKAGE}", f"{PACKAGE}.apps", f"{PACKAGE}.evaluation.backends")


def module_files(package_dir: Path, package: str) -> dict[str, Path]:
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package, *parts])] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterable[ast.Import | ast.ImportFrom]:
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)  # the TYPE_CHECKING body never runs
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def imported_names(module: str, path: Path, known: Mapping[str, Path]) -> set[str]:
    """Absolute names of what ``module`` imports; ``from pkg import sub`` names ``pkg.sub`` when it
    is a module of ``known``."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
            continue
        base = module.split(".") if is_pkg else module.split(".")[:-1]
        if node.level:
            base = base[: len(base) - (node.level - 1)]
            target = ".".join([*base, *([node.module] if node.module else [])])
        else:
            target = node.module or ""
        subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
        out.update(subs)
        if len(subs) < len(node.names):
            out.add(target)
    return out


def import_graph(package_dir: Path, package: str) -> dict[str, set[str]]:
    files = module_files(package_dir, package)
    return {m: imported_names(m, p, files) & set(files) - {m} for m, p in files.items()}


def find_cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def _in(module: str, prefixes: Iterable[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_cycle_finder_finds_a_planted_cycle() -> None:
    # The checks below are only as good as the walker: it must see a cycle through a lazy import.
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_walker_sees_function_level_imports_and_skips_type_checking(tmp_path: Path) -> None:
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import c\n"
        "def f():\n    from .b import x\n    import vllm.lora\n"
    )
    (pkg / "b.py").write_text("x = 1\n")
    (pkg / "c.py").write_text("")
    files = module_files(pkg, "p")
    assert imported_names("p.a", files["p.a"], files) == {"typing", "p.b", "vllm.lora"}


def test_no_import_cycle_in_the_package() -> None:
    graph = import_graph(ROOT / PACKAGE, PACKAGE)
    assert len(graph) > 50, "the walker found too few modules"
    assert find_cycles(graph) == []


def test_vllm_is_imported_only_in_the_integration_package() -> None:
    files = module_files(ROOT / PACKAGE, PACKAGE)
    offenders = {
        m: sorted(n for n in imported_names(m, p, files) if n == "vllm" or n.startswith("vllm."))
        for m, p in files.items()
        if not _in(m, [INTEGRATION])
    }
    assert {m: n for m, n in offenders.items() if n} == {}
    # The integration package itself does import vLLM (else this test would prove nothing).
    inside = set().union(*(imported_names(m, p, files) for m, p in files.items() if _in(m, [INTEGRATION])))
    assert any(n.startswith("vllm.") for n in inside)


def test_integration_is_reached_only_from_the_entry_point_and_applications() -> None:
    graph = import_graph(ROOT / PACKAGE, PACKAGE)
    users = {
        m
        for m, deps in graph.items()
        if not _in(m, [INTEGRATION]) and any(_in(d, [INTEGRATION]) for d in deps)
    }
    assert users, "nothing imports the integration package: the entry point is missing"
    assert {m for m in users if not (m == PACKAGE or _in(m, MAY_IMPORT_INTEGRATION[1:]))} == set()


def test_kernels_do_not_import_the_package() -> None:
    files = module_files(ROOT / "kernels", "kernels")
    bad = {
        m: sorted(n for n in imported_names(m, p, files) if n.split(".")[0] in ("vllm", PACKAGE))
        for m, p in files.items()
    }
    assert {m: n for m, n in bad.items() if n} == {}
