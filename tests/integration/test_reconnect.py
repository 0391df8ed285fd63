"""The shadow goes away and comes back: the data plane recovers without a restart and nothing hangs."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest
from itlib import HALFCLOSE_PORT, TOMCAT_MARKER, Shadow, curl, socks5_connect, wait_for

RECONNECT_PORT = 2225


@pytest.fixture
def own_shadow(netns, keys):
    s = Shadow(netns, keys, RECONNECT_PORT).start()
    yield s
    s.stop()


def get(plane, *flags: str) -> str:
    r = curl("--max-time", "10", *flags, "http://tomcat:8080/")
    return r.stdout if r.returncode == 0 else ""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
def test_shadow_restart_recovers(launcher, own_shadow, sig):
    plane = launcher.start(own_shadow, "--dns-port", "0")
    try:
        assert TOMCAT_MARKER in get(plane, "-x", plane.http_proxy)
        # A stream in flight when the shadow dies must end, not hang.
        s, code = socks5_connect(("127.0.0.1", plane.proxy_port), "tomcat", HALFCLOSE_PORT)
        assert code == 0
        s.sendall(b"partial")
        s.settimeout(15)

        os.kill(own_shadow.proc.pid, sig)
        own_shadow.proc.wait(10)
        with s:
            try:
                leftover = s.recv(100)
            except (ConnectionResetError, TimeoutError) as exc:
                assert not isinstance(exc, TimeoutError), "the in-flight stream hung after the shadow died"
                leftover = b""
            assert leftover == b""

        # While it is down, requests fail fast with the proxy's error instead of hanging.
        started = time.monotonic()
        r = curl("-o", "/dev/null", "-w", "%{http_code}", "--max-time", "20", "-x", plane.http_proxy,
                 "http://tomcat:8080/")
        assert r.stdout == "502", (r.stdout, r.stderr)
        assert time.monotonic() - started < 10
        # ...and the DNS stub answers SERVFAIL for cluster names rather than timing out.
        import subprocess
        out = subprocess.run(["dig", "@127.0.0.1", "-p", str(plane.dns_port), "+time=8", "+tries=1",
                              "demo.demo"], capture_output=True, text=True, timeout=30).stdout
        assert "status: SERVFAIL" in out, out

        own_shadow.start()  # same address, same keys
        restarted = time.monotonic()
        ok = ""
        while not ok and time.monotonic() - restarted < 10:
            ok = get(plane, "-x", plane.http_proxy)
            if not ok:
                time.sleep(0.2)
        assert TOMCAT_MARKER in ok, plane.log_text()[-3000:]
        assert time.monotonic() - restarted < 5, f"took {time.monotonic() - restarted:.1f} s"
        assert TOMCAT_MARKER in get(plane, "--socks5-hostname", plane.socks)
        # The DNS stub's tunnel streams recover too.
        out = subprocess.run(["dig", "@127.0.0.1", "-p", str(plane.dns_port), "+short", "+time=5", "+tries=2",
                              "tomcat"], capture_output=True, text=True, timeout=30).stdout
        assert out.strip() == "10.251.0.10", plane.log_text()[-3000:]
        assert plane.proc.poll() is None
        assert "re-established" in plane.log_text()
    finally:
        plane.stop()


def test_reconnect_after_long_outage(launcher, own_shadow):
    """After the supervisor has backed off, a new request still reconnects at once."""
    plane = launcher.start(own_shadow, "--dns-port", "-1")
    try:
        assert TOMCAT_MARKER in get(plane, "-x", plane.http_proxy)
        own_shadow.stop()
        # Several failed attempts: the supervisor now sleeps 4 s before the next one.
        wait_for(lambda: "retrying in 4.0 s" in plane.log_text(), 15, "the supervisor's back-off", plane.proc)
        own_shadow.start()
        started = time.monotonic()
        ok = get(plane, "--socks5-hostname", plane.socks)
        assert TOMCAT_MARKER in ok, plane.log_text()[-3000:]
        assert time.monotonic() - started < 3
    finally:
        plane.stop()


def test_supervisor_reconnects_without_any_request(launcher, own_shadow):
    """The session comes back on its own: the first request after an outage finds it up."""
    plane = launcher.start(own_shadow, "--dns-port", "-1")
    try:
        own_shadow.stop()
        wait_for(lambda: "lost; reconnecting" in plane.log_text(), 15, "the session loss", plane.proc)
        own_shadow.start()
        wait_for(lambda: "re-established" in plane.log_text(), 15, "the background reconnect", plane.proc)
        assert TOMCAT_MARKER in get(plane, "-x", plane.http_proxy)
    finally:
        plane.stop()


def test_stop_leaves_nothing_listening(launcher, shadow):
    """SIGTERM with streams open: exit 0, no traceback, no listener left."""
    plane = launcher.start(shadow)
    ports = (plane.proxy_port, plane.dns_port)
    stream, code = socks5_connect(("127.0.0.1", plane.proxy_port), "tomcat", HALFCLOSE_PORT)
    assert code == 0
    stream.sendall(b"open relay")
    idle = socket.create_connection(("127.0.0.1", plane.proxy_port))
    idle.sendall(b"GET http://tomcat:8080/whoami HTTP/1.1\r\nHost: tomcat:8080\r\n\r\n")
    got = b""
    while TOMCAT_MARKER.encode() not in got:  # then it is an idle keep-alive connection
        chunk = idle.recv(4096)
        assert chunk, got
        got += chunk
    half = socket.create_connection(("127.0.0.1", plane.proxy_port))
    half.sendall(b"\x05\x01")  # a handshake in progress
    time.sleep(0.2)
    with stream, idle, half:
        plane.stop()
        assert plane.proc.returncode == 0, plane.log_text()
        assert "Traceback" not in plane.log_text(), plane.log_text()
        for port in ports:
            with socket.socket() as s:
                assert s.connect_ex(("127.0.0.1", port)) != 0


def test_stop_with_idle_dns_tcp_client(launcher, shadow):
    plane = launcher.start(shadow)
    with socket.create_connection(("127.0.0.1", plane.dns_port)):
        time.sleep(0.2)
        plane.stop()
    assert plane.proc.returncode == 0, plane.log_text()
    assert "Traceback" not in plane.log_text(), plane.log_text()
