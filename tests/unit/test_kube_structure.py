"""Rules of the kube layer's shape, read from the source (review D1, 2.3): no import circle, no private
name borrowed across modules, no argparse, and the typed options the commands build for it."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest

from ktproxy.cluster.client import KubeClient
from ktproxy.commands.options import shadow_options
from ktproxy.errors import UsageError

KUBE = Path(__file__).resolve().parents[2] / "ktproxy" / "kube"


def _imports(path: Path) -> list[ast.ImportFrom | ast.Import]:
    """Every import that runs (TYPE_CHECKING blocks do not), at module level or inside functions."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom) and id(n) not in skip]


def _kube_modules() -> dict[str, Path]:
    return {f"ktproxy.kube.{p.stem}": p for p in KUBE.glob("*.py") if p.stem != "__init__"}


def test_no_import_circle_in_the_kube_layer():
    modules = _kube_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in _imports(path):
            targets = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if isinstance(node, ast.ImportFrom) and node.module == "ktproxy.kube":
                targets = [f"ktproxy.kube.{a.name}" for a in node.names]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for dep in graph[node]:
                if dep == start:
                    return [*path, start]
                if dep not in path:
                    stack.append((dep, [*path, dep]))
        return None

    circles = [c for m in sorted(graph) if (c := cycle_from(m))]
    assert not circles, f"import circle: {' -> '.join(circles[0])}"


@pytest.mark.parametrize("name", sorted(_kube_modules()))
def test_no_private_name_imported_across_modules(name):
    private = [f"{n.module}.{a.name}" for n in _imports(_kube_modules()[name])
               if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("ktproxy")
               for a in n.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not private, f"{name} imports private {private}"


@pytest.mark.parametrize("name", sorted(_kube_modules()))
def test_the_kube_layer_never_sees_argparse(name):
    for node in _imports(_kube_modules()[name]):
        mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
        assert "argparse" not in mods, f"{name} imports argparse: commands hand it typed options"


def test_no_unused_stream_shortcut_on_the_client():
    # KubeClient.open_stream was called nowhere and was the client's only reason to import the
    # port-forward (D1): the port-forward is reached through ktproxy.cluster.portforward.
    assert not hasattr(KubeClient, "open_stream")


def test_commands_build_shadow_options_from_the_global_flags():
    args = argparse.Namespace(image=None, image_pull_secret="a,,b", service_account="sa",
                              node_selector="pool=dev", with_label="team=x", with_annotation="note=y",
                              pod_quota="250m,128Mi")
    opts = shadow_options(args, "team")
    assert opts.namespace == "team" and opts.image.startswith("docker.io/ktproxy/shadow:")
    assert opts.image_pull_secrets == ("a", "b") and opts.service_account == "sa"
    assert (opts.node_selector, opts.labels, opts.annotations) == ({"pool": "dev"}, {"team": "x"}, {"note": "y"})
    assert opts.quota == {"cpu": "250m", "memory": "128Mi"}
    # flags a command does not define (clean has no -i) are simply absent
    assert shadow_options(argparse.Namespace(), "ns").labels == {}
    with pytest.raises(UsageError, match="--with-label"):
        shadow_options(argparse.Namespace(with_label="novalue"), "ns")


def test_the_client_is_built_from_typed_flags_by_the_commands():
    # KubeClient.from_args read an argparse namespace inside the kube layer; commands/options.py now
    # turns the global flags into KubeClient.load's keyword arguments.
    from ktproxy.commands import options

    assert not hasattr(KubeClient, "from_args")
    assert callable(options.kube_client)
