"""The package's shape: no import cycle among wszoo's modules, a registry that imports nothing of wszoo,
nobody reaching into another module's underscore names, and the WS layers' state behind their methods."""
import ast
import re
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "wszoo"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES: Dict[str, Path] = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path) -> Set[str]:
    """Every wszoo module ``module`` imports, at the top or inside functions (lazy imports count too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    targets: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node, path.name == "__init__.py")
            for alias in node.names:  # `from . import hub` imports the module wszoo.hub
                candidate = f"{base}.{alias.name}"
                targets.add(candidate if candidate in MODULES else base)
    return {t for t in targets if t in MODULES and t != module}


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_sees_the_real_edges():
    # a check that could not fail would prove nothing: the graph must contain the layering we rely on
    assert "wszoo.registry" in GRAPH["wszoo.factory"] and "wszoo.hub" in GRAPH["wszoo.factory"]
    assert "wszoo.layers.standardize" in GRAPH["wszoo.layers.ws_layer"]
    assert "wszoo.factory" in GRAPH["wszoo.cli.eval"] and "wszoo.cli.flags" in GRAPH["wszoo.cli.eval"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_no_import_cycle_among_wszoo_modules():
    assert _cycles(GRAPH) == []


def test_registry_imports_nothing_of_wszoo():
    assert GRAPH["wszoo.registry"] == set()


def _python_files() -> List[Path]:
    return sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "tests").rglob("*.py")) + \
        sorted((ROOT / "scripts").glob("*.py")) + [ROOT / "hubconf.py"]


def _private_reaches(path: Path) -> List[str]:
    """``from wszoo.x import _y`` and ``wszoo_module._y`` in ``path`` (dunders and torch's own are not ours)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    module = _module_name(path) if path.is_relative_to(PACKAGE) else ""
    wszoo_names: Set[str] = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = _resolve(module, node, path.name == "__init__.py") if node.level else (node.module or "")
            if base.split(".")[0] != "wszoo":
                continue
            for alias in node.names:
                if alias.name.startswith("_"):
                    found.append(f"{path.name}: from {base} import {alias.name}")
                if f"{base}.{alias.name}" in MODULES or base == "wszoo":
                    wszoo_names.add(alias.asname or alias.name)
            if base.split(".")[-1].startswith("_") and base not in ("wszoo",):
                found.append(f"{path.name}: from {base} import ...")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "wszoo":
                    wszoo_names.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            chain = node.value
            while isinstance(chain, ast.Attribute):
                chain = chain.value
            if isinstance(chain, ast.Name) and chain.id in wszoo_names:
                found.append(f"{path.name}:{node.lineno}: .{node.attr}")
    return found


@pytest.mark.parametrize("path", _python_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_reaches_into_another_modules_underscore_names(path):
    assert _private_reaches(path) == []


def test_the_private_reach_check_catches_one(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import wszoo\nfrom wszoo.registry import _entrypoints\nx = wszoo.registry._families\n")
    assert len(_private_reaches(bad)) == 2


def test_ws_layer_state_lives_in_the_ws_layer_class():
    """The eval cache, the accumulation stand-in and the grouped results are reached through WSLayer's methods only."""
    for path in _python_files():
        if path == PACKAGE / "layers" / "ws_layer.py" or path == Path(__file__).resolve():
            continue
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"\b_ws_(cache|accumulated|grouped|group)\b", text), path


def test_every_subpackage_ships_in_the_wheel():
    """pyproject.toml lists the packages explicitly: a new folder missing there installs without its code."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    assert on_disk <= listed, sorted(on_disk - listed)
