"""The route table follows the annotations file the kubelet keeps current (a ..data symlink swap), with one
log line per route change; the router's command line."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from shadow_image.router.options import parse_args, port_map
from shadow_image.router.table import RouteTable
from shadow_image.router.watch import AnnotationsWatch


def _kubelet_write(d: Path, routes: str, gen: int) -> None:
    """What the kubelet's atomic writer does: a new timestamped dir, then ..data swapped to it."""
    new = d / f"..2026_11_30_{gen}"
    new.mkdir()
    (new / "annotations").write_text(f'kt-config="service=tomcat"\nkt-mesh-routes="{routes}"\n')
    tmp = d / "..data_tmp"
    tmp.symlink_to(new.name)
    os.replace(tmp, d / "..data")
    if not (d / "annotations").is_symlink():
        (d / "annotations").symlink_to("..data/annotations")


@pytest.fixture
def router_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="router")
    return caplog


def test_routes_follow_the_kubelets_symlink_swaps_with_a_line_per_change(tmp_path, router_log):
    _kubelet_write(tmp_path, "version:abcde", 1)
    table = RouteTable("tomcat", {8080: 80})
    watch = AnnotationsWatch(str(tmp_path / "annotations"), table)
    assert watch.check() and watch.loaded
    assert table.routes == [("version", "abcde")]
    assert not watch.check()  # unchanged file: nothing to do
    _kubelet_write(tmp_path, "version:abcde,version:fghij", 2)
    assert watch.check()
    assert table.routes == [("version", "abcde"), ("version", "fghij")]
    _kubelet_write(tmp_path, "version:fghij", 3)
    assert watch.check()
    assert table.routes == [("version", "fghij")]
    lines = [r.getMessage() for r in router_log.records]
    assert lines == ["route added: VERSION: abcde -> tomcat-kt-mesh-abcde:80",
                     "route added: VERSION: fghij -> tomcat-kt-mesh-fghij:80",
                     "route removed: VERSION: abcde -> tomcat-kt-mesh-abcde:80"]


def test_an_unreadable_file_leaves_the_router_unloaded_and_complains_once(tmp_path, router_log):
    table = RouteTable("tomcat", {8080: 80})
    watch = AnnotationsWatch(str(tmp_path / "annotations"), table)
    assert not watch.check() and not watch.check()
    assert not watch.loaded
    assert len(router_log.records) == 1 and "cannot read the annotations file" in router_log.records[0].getMessage()
    (tmp_path / "annotations").write_text('kt-mesh-routes=""\n')
    watch.check()
    assert watch.loaded and table.routes == []


def test_malformed_routes_are_ignored(tmp_path):
    (tmp_path / "a").write_text('kt-mesh-routes="version:abcde,Bad Key:x,version:UPPER,:x"\n')
    table = RouteTable("tomcat", {8080: 80})
    AnnotationsWatch(str(tmp_path / "a"), table).check()
    assert table.routes == [("version", "abcde")]


def test_port_map_and_flags():
    assert port_map("8080:80,9090") == {8080: 80, 9090: 9090}
    opts = parse_args(["--service", "tomcat", "--port", "8080:80", "--port", "9000:90", "--health-port", "8099",
                       "--annotations", "/etc/kt-router/annotations"])
    assert opts.ports == {8080: 80, 9000: 90} and opts.health_port == 8099
    assert opts.default_host is None and opts.route_host is None


@pytest.mark.parametrize("argv", [
    ["--port", "8080:80", "--health-port", "8099", "--annotations", "f"],
    ["--service", "s", "--port", "8080:0", "--health-port", "8099", "--annotations", "f"],
    ["--service", "s", "--port", "x", "--health-port", "8099", "--annotations", "f"],
    ["--service", "s", "--port", "8080:80", "--health-port", "8080", "--annotations", "f"],
    ["--service", "s", "--port", "8080:80", "--health-port", "8099"],
])
def test_bad_flags_exit_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("python -m shadow_image.router: error:")


def test_each_upstream_is_built_once_and_keeps_its_label():
    table = RouteTable("tomcat", {8080: 80, 9090: 90})
    table.set_routes([("version", "abcde")])
    up = table.pick(8080, [(b"Version", b"abcde")])
    assert up is table.pick(8080, [(b"VERSION", b"abcde")])  # pick runs per request: no new object each time
    assert up.label == "route 'VERSION: abcde' (tomcat-kt-mesh-abcde:80)" and up.route == ("version", "abcde")
    assert table.pick(9090, [(b"version", b"abcde")]).port == 90
    assert table.default(8080) is table.pick(8080, []) and table.default(8080).label == "tomcat-kt-stuntman:80"
