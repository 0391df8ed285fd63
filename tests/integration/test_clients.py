"""Real clients (curl) through the data plane to services only the namespace has."""

from __future__ import annotations

import hashlib
import os
import re

import pytest
from itlib import (
    DEMO_MARKER,
    LOCAL_MARKER,
    OUTSIDE_IP,
    OUTSIDE_MARKER,
    TOMCAT_IP,
    TOMCAT_MARKER,
    curl,
)

TOMCAT_URLS = ["http://tomcat:8080/", "http://tomcat.default:8080/",
               "http://tomcat.default.svc.cluster.local:8080/", f"http://{TOMCAT_IP}:8080/"]


def test_host_cannot_reach_the_namespace_directly(dataplane):
    # Without the proxy the services do not exist for the host: the tests below prove the tunnel.
    r = curl("--connect-timeout", "3", f"http://{TOMCAT_IP}:8080/")
    assert r.returncode != 0
    assert TOMCAT_MARKER not in r.stdout
    r = curl("--connect-timeout", "3", f"http://{OUTSIDE_IP}:8080/")
    assert r.returncode != 0


@pytest.mark.parametrize("url", TOMCAT_URLS)
def test_curl_http_proxy_env(dataplane, url):
    r = curl(url, env={"http_proxy": dataplane.http_proxy, "HTTP_PROXY": dataplane.http_proxy})
    assert r.returncode == 0, r.stderr
    assert TOMCAT_MARKER in r.stdout


@pytest.mark.parametrize("url", TOMCAT_URLS)
def test_curl_socks5_hostname(dataplane, url):
    r = curl("--socks5-hostname", dataplane.socks, url)
    assert r.returncode == 0, r.stderr
    assert TOMCAT_MARKER in r.stdout


def test_curl_all_proxy_socks5h_other_namespace(dataplane):
    r = curl("http://demo.demo/", env={"ALL_PROXY": f"socks5h://{dataplane.socks}"})
    assert r.returncode == 0, r.stderr
    assert DEMO_MARKER in r.stdout


def test_curl_socks4a(dataplane):
    r = curl("--socks4a", dataplane.socks, "http://tomcat:8080/")
    assert r.returncode == 0, r.stderr
    assert TOMCAT_MARKER in r.stdout


@pytest.mark.parametrize("url", ["http://tomcat:8080/whoami", f"http://{TOMCAT_IP}:8080/whoami"])
def test_curl_connect_tunnel(dataplane, url):
    r = curl("-p", "-x", dataplane.http_proxy, "-v", url)
    assert r.returncode == 0, r.stderr
    assert "200 Connection established" in r.stderr
    assert TOMCAT_MARKER in r.stdout


def test_keep_alive_reuses_one_connection(dataplane):
    r = curl("-v", "-x", dataplane.http_proxy, "http://tomcat:8080/whoami?a", "http://tomcat:8080/whoami?b")
    assert r.returncode == 0, r.stderr
    assert "path=/whoami?a" in r.stdout and "path=/whoami?b" in r.stdout
    assert re.search(r"Re-using existing connection", r.stderr, re.I), r.stderr


def test_keep_alive_across_hosts(dataplane):
    # One client connection, two different upstreams in a row.
    r = curl("-v", "-x", dataplane.http_proxy, "http://tomcat:8080/whoami", "http://demo.demo/whoami")
    assert r.returncode == 0, r.stderr
    assert TOMCAT_MARKER in r.stdout and DEMO_MARKER in r.stdout


def test_post_with_body(dataplane, tmp_path):
    body = os.urandom(3 * 1024 * 1024 + 17)
    f = tmp_path / "body"
    f.write_bytes(body)
    r = curl("-x", dataplane.http_proxy, "--data-binary", f"@{f}", "http://tomcat:8080/echo")
    assert r.returncode == 0, r.stderr
    assert f"got {len(body)} bytes length sha256={hashlib.sha256(body).hexdigest()}" in r.stdout


def test_post_chunked_upload(dataplane, tmp_path):
    body = os.urandom(1024 * 1024 + 5)
    f = tmp_path / "body"
    f.write_bytes(body)
    r = curl("-x", dataplane.http_proxy, "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{f}",
             "http://tomcat:8080/echo")
    assert r.returncode == 0, r.stderr
    assert f"got {len(body)} bytes chunked" in r.stdout
    assert hashlib.sha256(body).hexdigest() in r.stdout


def test_post_through_socks(dataplane, tmp_path):
    body = os.urandom(512 * 1024)
    f = tmp_path / "body"
    f.write_bytes(body)
    r = curl("--socks5-hostname", dataplane.socks, "--data-binary", f"@{f}", "http://tomcat:8080/echo")
    assert r.returncode == 0, r.stderr
    assert f"got {len(body)} bytes length sha256={hashlib.sha256(body).hexdigest()}" in r.stdout


def test_http_404_passes_through(dataplane):
    r = curl("-o", "/dev/null", "-w", "%{http_code}", "-x", dataplane.http_proxy, "http://tomcat:8080/missing")
    assert r.stdout == "404"


def test_pac_served(dataplane):
    r = curl("-i", f"http://127.0.0.1:{dataplane.proxy_port}/proxy.pac")
    assert r.returncode == 0, r.stderr
    assert "application/x-ns-proxy-autoconfig" in r.stdout
    assert "FindProxyForURL" in r.stdout
    assert f"SOCKS5 127.0.0.1:{dataplane.proxy_port}" in r.stdout


def test_pac_refused_to_a_rebound_host_name(dataplane):
    # S3: a web page whose name was re-bound to 127.0.0.1 fetches with its own name as Host.
    url = f"http://127.0.0.1:{dataplane.proxy_port}/proxy.pac"
    r = curl("-o", "/dev/null", "-w", "%{http_code}", "-H", "Host: attacker.example", url)
    assert r.stdout == "403", r.stderr
    r = curl("-o", "/dev/null", "-w", "%{http_code}", "-H", f"Host: localhost:{dataplane.proxy_port}", url)
    assert r.stdout == "200", r.stderr


def test_expect_100_continue_reaches_the_client(dataplane):
    """T1: a client that waits for "100 Continue" before it sends the body gets it through the proxy.
    (curl gives up waiting after 1 s and sends anyway, so curl-based tests pass without the relay.)"""
    import socket

    from itlib import recv_all

    body = b"x" * 1000
    with socket.create_connection(("127.0.0.1", dataplane.proxy_port), timeout=5) as s:
        s.sendall(b"POST http://tomcat:8080/echo HTTP/1.1\r\nHost: tomcat:8080\r\nConnection: close\r\n"
                  b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(body))
        interim = b""
        while b"\r\n\r\n" not in interim:
            interim += s.recv(1)  # a socket.timeout here (5 s) means the 100 never came
        assert interim.startswith(b"HTTP/1.1 100 "), interim
        s.settimeout(20)
        s.sendall(body)
        answer = recv_all(s)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert f"got {len(body)} bytes length sha256={hashlib.sha256(body).hexdigest()}".encode() in answer


@pytest.mark.parametrize("method", ["VERSION-CONTROL", "M-SEARCH", "get"])
def test_any_method_token_reaches_the_origin(dataplane, method):
    # B4: the stand-in origin (Python's http.server) has no such method: its 501 proves the proxy passed it on.
    r = curl("-i", "-X", method, "-x", dataplane.http_proxy, "http://tomcat:8080/")
    assert r.stdout.startswith("HTTP/1.1 501"), r.stdout[:300] + r.stderr
    assert repr(method) in r.stdout


# -- routing: what is not the cluster goes DIRECT ------------------------------------------------
def test_loopback_destination_goes_direct(dataplane, shadow, local_http):
    host, port = local_http
    before = shadow.log_text().count("direct-tcpip")
    for flag in (["-x", dataplane.http_proxy], ["--socks5-hostname", dataplane.socks]):
        r = curl(*flag, f"http://{host}:{port}/")
        assert r.returncode == 0, r.stderr
        # The server saw the data plane itself connect from loopback.
        assert f"{LOCAL_MARKER} peer=127.0.0.1" in r.stdout
    # ...and the shadow was not asked for any stream meanwhile.
    log = shadow.log_text()
    assert log.count("direct-tcpip") == before, log[-2000:]
    assert f"{port}" not in "\n".join(line for line in log.splitlines() if "direct-tcpip" in line)


def test_non_cluster_namespace_address_needs_route_all(launcher, shadow, dataplane):
    # Cluster routing: an address outside the cluster CIDRs goes DIRECT, and the host has no route.
    r = curl("--connect-timeout", "5", "-o", "/dev/null", "-w", "%{http_code}", "-x", dataplane.http_proxy,
             f"http://{OUTSIDE_IP}:8080/")
    assert r.stdout == "502"
    # --route all: the same address goes through the shadow, which can reach it.
    plane = launcher.start(shadow, "--route", "all", "--dns-port", "-1")
    try:
        r = curl("-x", plane.http_proxy, f"http://{OUTSIDE_IP}:8080/")
        assert r.returncode == 0, r.stderr
        assert OUTSIDE_MARKER in r.stdout
        r = curl("--socks5-hostname", plane.socks, "http://tomcat:8080/")
        assert TOMCAT_MARKER in r.stdout
    finally:
        plane.stop()


# -- `-- CMD`: one command with the proxy environment -------------------------------------------
def test_run_command_exit_status(launcher, shadow):
    ok = launcher.run(shadow, "--dns-port", "-1", "--", "curl", "-sSf", "--max-time", "15",
                      "http://tomcat:8080/")
    assert ok.returncode == 0, ok.stderr
    assert TOMCAT_MARKER in ok.stdout
    failed = launcher.run(shadow, "--dns-port", "-1", "--", "curl", "-sSf", "--max-time", "15",
                          "http://tomcat:8080/missing")
    assert failed.returncode == 22, failed.stderr  # curl -f on a 404
    socks = launcher.run(shadow, "--dns-port", "-1", "--", "sh", "-c",
                         'curl -sSf --max-time 15 -x "$ALL_PROXY" http://tomcat.default:8080/ && exit 7')
    assert socks.returncode == 7, socks.stderr
    assert TOMCAT_MARKER in socks.stdout


# -- HTTP framing through the absolute-URI proxy --------------------------------------------------
def test_body_until_close_then_new_connection(dataplane):
    """A response without a length ends at EOF: the proxy must not keep that client connection."""
    r = curl("-v", "-x", dataplane.http_proxy, "http://tomcat:8080/until-close?n=20000",
             "http://tomcat:8080/whoami")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 20000 + 2
    assert f"{TOMCAT_MARKER} end" in r.stdout and "path=/whoami" in r.stdout


def test_head_204_and_get_on_one_connection(dataplane):
    r = curl("-v", "-x", dataplane.http_proxy, "-I", "http://tomcat:8080/whoami", "--next",
             "-x", dataplane.http_proxy, "http://tomcat:8080/nocontent", "--next",
             "-x", dataplane.http_proxy, "http://tomcat:8080/whoami?after")
    assert r.returncode == 0, r.stderr
    assert "path=/whoami?after" in r.stdout
    assert r.stderr.count("Re-using existing connection") >= 2, r.stderr


def test_large_download_intact(dataplane):
    for flags in (["-x", dataplane.http_proxy], ["--socks5-hostname", dataplane.socks]):
        r = curl(*flags, "-o", "/dev/null", "-w", "%{size_download} %{http_code}", "http://tomcat:8080/bulk?mb=64")
        assert r.stdout == f"{64 * 1024 * 1024} 200", r.stderr


def test_upgrade_through_absolute_uri_proxy(dataplane):
    """101 Switching Protocols (what WebSockets use) becomes a raw two-way stream."""
    import socket

    from itlib import recv_all

    with socket.create_connection(("127.0.0.1", dataplane.proxy_port), timeout=10) as s:
        s.sendall(b"GET http://tomcat:8080/upgrade HTTP/1.1\r\nHost: tomcat:8080\r\n"
                  b"Connection: Upgrade\r\nUpgrade: ktecho\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head
        assert b"upgrade: ktecho" in head.lower()
        s.sendall(b"hello over the tunnel")
        got = b""
        while len(got) < 21:
            got += s.recv(100)
        assert got == b"HELLO OVER THE TUNNEL"
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b""


# -- address literals -----------------------------------------------------------------------------
def test_socks5_ipv4_literal(dataplane):
    r = curl("--socks5", dataplane.socks, f"http://{TOMCAT_IP}:8080/")  # atyp 1
    assert TOMCAT_MARKER in r.stdout, r.stderr


@pytest.mark.parametrize("flag", ["--socks5", "--socks5-hostname", "-x"])
def test_ipv6_cluster_literal(dataplane, flag):
    from itlib import TOMCAT_IP6

    proxy = dataplane.http_proxy if flag == "-x" else dataplane.socks
    r = curl("-g", flag, proxy, f"http://[{TOMCAT_IP6}]:8080/whoami")
    assert r.returncode == 0, r.stderr
    assert TOMCAT_MARKER in r.stdout
    assert f"host=[{TOMCAT_IP6}]:8080" in r.stdout


def test_ipv6_connect(dataplane):
    from itlib import TOMCAT_IP6

    r = curl("-g", "-p", "-x", dataplane.http_proxy, f"http://[{TOMCAT_IP6}]:8080/")
    assert TOMCAT_MARKER in r.stdout, r.stderr


def test_pipelined_requests_answered_in_order(dataplane):
    import socket

    from itlib import recv_all

    reqs = b"".join(b"GET http://tomcat:8080/whoami?n=%d HTTP/1.1\r\nHost: tomcat:8080\r\n\r\n" % i
                    for i in range(5))
    reqs += b"POST http://tomcat:8080/echo HTTP/1.1\r\nHost: tomcat:8080\r\nContent-Length: 5\r\n\r\nhello"
    reqs += b"GET http://demo.demo/whoami HTTP/1.1\r\nHost: demo.demo\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", dataplane.proxy_port), timeout=15) as s:
        s.sendall(reqs)
        answer = recv_all(s).decode()
    assert answer.count("HTTP/1.1 200") == 7, answer
    order = [answer.index(f"path=/whoami?n={i}") for i in range(5)]
    assert order == sorted(order)
    assert order[-1] < answer.index("got 5 bytes") < answer.index(DEMO_MARKER)


def test_post_then_get_keep_alive(dataplane):
    r = curl("-v", "-x", dataplane.http_proxy, "--data-binary", "abc", "http://tomcat:8080/echo", "--next",
             "-x", dataplane.http_proxy, "http://tomcat:8080/whoami?next")
    assert r.returncode == 0, r.stderr
    assert "got 3 bytes" in r.stdout and "path=/whoami?next" in r.stdout
    assert "Re-using existing connection" in r.stderr


def test_run_command_not_found(launcher, shadow):
    res = launcher.run(shadow, "--dns-port", "-1", "--", "no-such-command-ktproxy")
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if " ERR " in line]
    assert len(errors) == 1 and "no-such-command-ktproxy" in errors[0], res.stderr
