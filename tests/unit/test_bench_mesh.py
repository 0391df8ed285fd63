"""The mesh benchmark's pure parts: kt-connect's route.conf as rendered for the nginx yardstick (checked by
the real nginx where it is installed), the HTTP response framing of its load client, and the goal verdict.
Never asserts a speed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # benchmarks/ is a top-level package of the repo, not installed
    sys.path.insert(0, str(REPO))

from benchmarks.cases import mesh  # noqa: E402
from benchmarks.httpload import Framer, ProtocolError, request  # noqa: E402

RC = mesh.RouteConf("svc", ((80, 8080), (81, 9090)), "x-ver", ("abcde", "fghij"), "127.0.0.1",
                    "127.0.0.2", "127.0.0.3", keepalive=32)


def test_route_conf_has_kt_connects_upstreams_servers_and_matches() -> None:
    conf = mesh.render_route_conf(RC)
    for sp in (80, 81):
        assert f"upstream svc-kt-stuntman-{sp} {{\n  server 127.0.0.2:{sp};" in conf
        for v in ("abcde", "fghij"):
            assert f"upstream svc-kt-mesh-{v}-{sp} {{\n  server 127.0.0.3:{sp};" in conf
            # the header in nginx's $http_ form (- becomes _), the value matched exactly
            assert f'if ($http_x_ver = "{v}") {{\n            proxy_pass  http://svc-kt-mesh-{v}-{sp};' in conf
        assert f"proxy_pass  http://svc-kt-stuntman-{sp};\n    }}" in conf
    assert "listen  127.0.0.1:8080;" in conf and "listen  127.0.0.1:9090;" in conf
    assert conf.count("server_name  svc;") == 2
    assert conf.count("proxy_http_version 1.1;") == 2
    assert '"502 - KtConnect mesh connection error"' in conf


def test_route_conf_keepalive_only_when_asked() -> None:
    pooled = mesh.render_route_conf(RC)
    assert pooled.count("keepalive 32;") == 6  # 2 ports x (2 routes + the stuntman)
    assert pooled.count('proxy_set_header Connection "";') == 2
    plain = mesh.render_route_conf(mesh.RouteConf(**{**RC.__dict__, "keepalive": 0}))
    assert "keepalive" not in plain and "proxy_set_header" not in plain


def test_route_host_can_name_the_version() -> None:
    conf = mesh.render_route_conf(mesh.RouteConf(**{**RC.__dict__, "mesh": "svc-kt-mesh-{version}"}))
    assert "server svc-kt-mesh-fghij:81;" in conf


@pytest.mark.skipif(not mesh.NGINX.exists(), reason="nginx not installed")
@pytest.mark.parametrize("workers, access_log", [(1, False), ("auto", True)])
def test_nginx_accepts_the_rendered_config(tmp_path: Path, workers: int | str, access_log: bool) -> None:
    body = mesh.render_route_conf(RC) + mesh.render_origin(5000, {"127.0.0.2": b"S" * 4, "127.0.0.3": b"M" * 4})
    conf = tmp_path / "nginx.conf"
    conf.write_text(mesh.render_nginx_conf(tmp_path, workers, body, access_log))
    r = subprocess.run([str(mesh.NGINX), "-t", "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "e.log")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "test is successful" in r.stderr


def test_framer_splits_responses_by_content_length() -> None:
    a = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello"
    b = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc"
    f = Framer()
    stream = a + b + a
    got = [f.feed(stream[i:i + 7]) for i in range(0, len(stream), 7)]
    assert sum(got) == 3 and f.bad == 0 and not f.buf
    assert Framer().feed(a[:-1]) == 0  # one body byte short: not complete


def test_framer_counts_non_200_as_bad() -> None:
    f = Framer()
    assert f.feed(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 2\r\n\r\nno") == 1
    assert f.bad == 1


def test_framer_refuses_unframed_responses() -> None:
    with pytest.raises(ProtocolError):
        Framer().feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")


def test_request_carries_the_headers() -> None:
    assert request(["Version: abcde"]) == b"GET / HTTP/1.1\r\nHost: bench\r\nVersion: abcde\r\n\r\n"
    assert request([], close=True).endswith(b"Connection: close\r\n\r\n")


def medians(ours: dict[str, float], theirs: dict[str, float]) -> dict[tuple[str, str], float]:
    return {**{(k, "r"): v for k, v in ours.items()}, **{(k, "n"): v for k, v in theirs.items()}}


def test_goals_rate_and_added_latency() -> None:
    rate_d, rate_h = mesh.rr_metric("default route", 100, "rate"), mesh.rr_metric("header route", 100, "rate")
    add = {(label, n): mesh.rr_metric(label, n, "added p99") for label, _ in mesh.ROUTES for n in mesh.CLIENTS}
    ours = {rate_d: 5000, rate_h: 4000, add["default route", 1]: 200, add["default route", 100]: 9000,
            add["header route", 1]: 150}
    theirs = {rate_d: 10000, rate_h: 10000, add["default route", 1]: 100, add["default route", 100]: 3000,
              add["header route", 1]: -5, add["header route", 100]: 100}
    gs = {g.text: g for g in mesh.goals(medians(ours, theirs), "r", "n")}
    assert gs["default route, 100 clients: requests/s >= 0.5x"].met is True  # exactly 0.5x
    assert gs["header route, 100 clients: requests/s >= 0.5x"].met is False
    assert gs["default route, 1 client: added p99 <= 2x"].met is True  # exactly 2x
    assert gs["default route, 100 clients: added p99 <= 2x"].met is False
    assert gs["header route, 1 client: added p99 <= 2x"].ratio is None  # nginx added nothing: no ratio
    assert gs["header route, 100 clients: added p99 <= 2x"].met is None  # ours missing
    rows = mesh.goal_rows(list(gs.values()))
    assert ["default route, 100 clients: added p99 <= 2x", "3.00x", "NOT met"] in rows


def test_ratio_rows_skip_what_ours_lacks() -> None:
    rows = mesh.ratio_rows(medians({"a": 3, "b": 1, "d": 5}, {"a": 2, "d": -5}), ["a", "b", "c", "d"], "r", ["n"])
    assert rows == [["a", "1.50x"], ["b", "n/a"], ["d", "n/a"]]
