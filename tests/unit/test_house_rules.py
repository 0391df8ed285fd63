"""The house's rules, read from the source (issue 14; review D1, 2.3): the client never imports the
in-cluster side, Kubernetes access knows no capability, no import circle anywhere (imports inside
functions and under TYPE_CHECKING count: a circle hidden there is still two modules that need each
other), no private name borrowed across modules, argparse stops at the command, and every package says
what it owns."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

from ktproxy.cluster.client import KubeClient

ROOT = Path(__file__).resolve().parents[2]
TOP = ("ktproxy", "shadow_image", "ktwire")
# What ktproxy.cluster may import from this project: itself, the error base class, and shared wire code.
CLUSTER_MAY_IMPORT = ("ktproxy.cluster", "ktproxy.errors", "ktwire")
# The capability packages, each owning its cluster-side changes; cluster access sits under all of them.
CAPABILITIES = ("shadow", "exchange", "mesh", "forward", "cleanup")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for top in TOP for p in (ROOT / top).rglob("*.py")}


MODULES = _modules()


@functools.cache
def _imports(path: Path) -> list[ast.ImportFrom | ast.Import]:
    """Every import statement: at module level, inside functions, under TYPE_CHECKING."""
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Import | ast.ImportFrom)]


def _resolve(module: str, node: ast.ImportFrom | ast.Import) -> set[str]:
    """The project modules an import statement loads (`from pkg import mod` names the module itself)."""
    if isinstance(node, ast.Import):
        names = {a.name for a in node.names}
    else:
        base = node.module or ""
        if node.level:
            is_package = MODULES[module].name == "__init__.py"
            parent = module.split(".")[: len(module.split(".")) - node.level + is_package]
            base = ".".join([*parent, base] if base else parent)
        names = {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    out = set()
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name:
            out.add(name)
    return out


@functools.cache
def _graph() -> dict[str, set[str]]:
    return {m: {d for n in _imports(p) for d in _resolve(m, n)} - {m} for m, p in MODULES.items()}


def _circle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep):], dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_circle_finder_finds_a_circle():
    assert _circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _circle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_between_modules():
    found = _circle(_graph())
    assert not found, f"import circle: {' -> '.join(found)}"


def _package_of(module: str) -> str:
    """ktproxy.mesh.spec -> ktproxy.mesh; ktproxy.preview -> ktproxy.preview; shadow_image.router.x ->
    shadow_image.router."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def test_no_import_circle_between_packages():
    graph: dict[str, set[str]] = {}
    for module, deps in _graph().items():
        graph.setdefault(_package_of(module), set()).update(
            _package_of(d) for d in deps if _package_of(d) != _package_of(module))
    found = _circle(graph)
    assert not found, f"package circle: {' -> '.join(found)}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("ktproxy")))
def test_the_client_never_imports_the_in_cluster_side(module):
    bad = sorted(d for d in _graph()[module] if d.startswith("shadow_image"))
    assert not bad, f"{module} imports {bad}: code both ends need lives in ktwire/"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("ktproxy.cluster")))
def test_cluster_access_imports_no_capability(module):
    bad = sorted(d for d in _graph()[module] if not d.startswith(CLUSTER_MAY_IMPORT))
    assert not bad, f"{module} imports {bad}: ktproxy.cluster knows no command or capability"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("ktwire")))
def test_shared_wire_code_imports_neither_end(module):
    bad = sorted(d for d in _graph()[module] if not d.startswith("ktwire"))
    assert not bad, f"{module} imports {bad}: both ends install ktwire/"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_name_imported_across_modules(module):
    private = [f"{n.module}.{a.name}" for n in _imports(MODULES[module])
               if isinstance(n, ast.ImportFrom) and (n.module or "").startswith(TOP)
               for a in n.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not private, f"{module} imports private {private}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("ktproxy.")
                                          and not m.startswith(("ktproxy.commands", "ktproxy.cli"))))
def test_argparse_stops_at_the_command(module):
    for node in _imports(MODULES[module]):
        mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
        assert "argparse" not in mods, f"{module} imports argparse: commands hand it typed options"


@pytest.mark.parametrize("package", sorted(m for m, p in MODULES.items() if p.name == "__init__.py"))
def test_every_package_says_what_it_owns(package):
    doc = ast.get_docstring(ast.parse(MODULES[package].read_text()))
    assert doc and len(doc.split()) >= 8, f"{package}/__init__.py: say in a line or two what it owns"


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_each_capability_is_a_package(capability):
    assert f"ktproxy.{capability}" in MODULES


def test_no_unused_stream_shortcut_on_the_client():
    # KubeClient.open_stream was called nowhere and was the client's only reason to import the
    # port-forward (D1): the port-forward is reached through ktproxy.cluster.portforward.
    assert not hasattr(KubeClient, "open_stream")
