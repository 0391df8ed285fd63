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
