"""Bad input: malformed requests get their protocol's error and a closed connection while everyone else
is still served; start-up failures give one clear line, a non-zero exit and nothing left listening."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest
from itlib import TOMCAT_MARKER, Shadow, clean_env, curl, free_port, recv_all, socks5_connect

MAX_HEAD = 64 * 1024


def still_serves(plane) -> None:
    r = curl("-x", plane.http_proxy, "http://tomcat:8080/")
    assert TOMCAT_MARKER in r.stdout, r.stderr
    r = curl("--socks5-hostname", plane.socks, "http://tomcat:8080/")
    assert TOMCAT_MARKER in r.stdout, r.stderr


def raw(plane, data: bytes, timeout: float = 10) -> bytes:
    """Send `data`, then read until the proxy closes the connection."""
    with socket.create_connection(("127.0.0.1", plane.proxy_port), timeout=timeout) as s:
        s.sendall(data)
        return recv_all(s)


def socks5_request(cmd: int, atyp: int, addr: bytes, ver: int = 5) -> bytes:
    return b"\x05\x01\x00" + bytes([ver, cmd, 0, atyp]) + addr + (80).to_bytes(2, "big")


TOMCAT_NAME = b"\x06tomcat"


@pytest.mark.parametrize("request_bytes,reply_code", [
    pytest.param(socks5_request(0x01, 0x03, TOMCAT_NAME, ver=4), 0x01, id="bad-request-version"),
    pytest.param(socks5_request(0x02, 0x03, TOMCAT_NAME), 0x07, id="bind"),
    pytest.param(socks5_request(0x03, 0x01, b"\x0a\xfb\x00\x0a"), 0x07, id="udp-associate"),
    pytest.param(socks5_request(0x01, 0x09, b"\x01\x02\x03\x04"), 0x08, id="bad-address-type"),
])
def test_malformed_socks5(dataplane, request_bytes, reply_code):
    answer = raw(dataplane, request_bytes)
    assert answer[:2] == b"\x05\x00"  # method selection
    assert answer[2:4] == bytes([5, reply_code]), answer
    assert len(answer) == 2 + 10  # the reply, then EOF
    still_serves(dataplane)


def test_socks5_no_acceptable_method(dataplane):
    assert raw(dataplane, b"\x05\x01\x02") == b"\x05\xff"  # offers only user/pass; none is needed
    still_serves(dataplane)


def test_socks4_bind_refused(dataplane):
    answer = raw(dataplane, b"\x04\x02\x00\x50\x0a\xfb\x00\x0a\x00")
    assert answer == b"\x00\x5b" + b"\x00" * 6
    still_serves(dataplane)


@pytest.mark.parametrize("request_bytes,status", [
    pytest.param(b"GET http://tomcat:8080/ HTTP/9.9\r\nHost: tomcat\r\n\r\n", 400, id="bad-version"),
    pytest.param(b"GARBAGE\r\n\r\n", 400, id="no-start-line"),
    pytest.param(b"GET http://tomcat:8080/ HTTP/1.1\r\nBad Header: x\r\n\r\n", 400, id="bad-header"),
    pytest.param(b"GET http://tomcat:8080/ HTTP/1.1\r\n folded: x\r\n\r\n", 400, id="folding"),
    pytest.param(b"GET http://tomcat:8080/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400,
                 id="conflicting-length"),
    pytest.param(b"GET ftp://tomcat/ HTTP/1.1\r\n\r\n", 400, id="ftp-uri"),
    pytest.param(b"GET http://tomcat:99999/ HTTP/1.1\r\n\r\n", 400, id="bad-port"),
    pytest.param(b"GET http://tomcat:8080/ HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD + 10) + b"\r\n\r\n", 431,
                 id="huge-head"),
    pytest.param(b"GET / HTTP/1.1\r\n\r\n", 404, id="origin-form-not-pac"),
    pytest.param(b"1234\r\n\r\n", 400, id="digits"),  # a token character: sniffed as HTTP
])
def test_malformed_http(dataplane, request_bytes, status):
    answer = raw(dataplane, request_bytes)
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:200]
    assert b"Connection: close" in answer
    still_serves(dataplane)


@pytest.mark.parametrize("garbage", [b"\x00\xff\xfe", b"\x16\x03\x01\x02\x00", b"\xff" * 100, b"(1234)\r\n"])
def test_garbage_first_byte_closed(dataplane, garbage):
    assert raw(dataplane, garbage) == b""
    still_serves(dataplane)


@pytest.mark.parametrize("body", [b"ZZ\r\nhello\r\n0\r\n\r\n", b"5\r\nhelloXY0\r\n\r\n"])
def test_bad_chunked_body_answers_400(dataplane, body):
    """B2: the origin waits for the rest of a body the proxy could not frame; the proxy answers at once."""
    answer = raw(dataplane, b"POST http://tomcat:8080/echo HTTP/1.1\r\nHost: tomcat:8080\r\n"
                            b"Transfer-Encoding: chunked\r\n\r\n" + body, timeout=10)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"Connection: close" in answer
    still_serves(dataplane)


def test_client_vanishes_mid_request(dataplane):
    """A client that sends part of a greeting or request and goes: the proxy drops that connection quietly
    (no traceback, no error line) and keeps nothing of it (its socket is closed), and serves the others."""
    def fds() -> int:
        return len(os.listdir(f"/proc/{dataplane.pid}/fd"))

    log_from = len(dataplane.log_text())
    base = fds()
    partial = (b"\x05", b"\x05\x01\x00\x05\x01", b"GET http://tomcat:8080/ HTTP/1.1\r\nHo", b"\x04\x01",
               b"CONNECT tomcat:8080 HTTP/1.1\r\n", b"\x05\x01\x00\x05\x01\x00\x03\x06tom")
    held = []
    for data in partial * 5:
        s = socket.create_connection(("127.0.0.1", dataplane.proxy_port))
        s.sendall(data)
        held.append(s)
    # While they are open the proxy holds a socket for each (so the count below can see a leak) ...
    deadline = time.monotonic() + 10
    while fds() < base + len(held) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fds() >= base + len(held), f"data plane fds {base} -> {fds()} with {len(held)} clients open"
    for s in held:
        s.close()
    # ... and once they vanish it lets every one of them go.
    deadline = time.monotonic() + 10
    while fds() > base + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fds() <= base + 2, f"data plane fds {base} -> {fds()} after {len(held)} clients vanished"
    log = dataplane.log_text()[log_from:]
    assert "Traceback" not in log, log
    assert not [line for line in log.splitlines() if " ERR " in line or " FTL " in line], log
    still_serves(dataplane)


# -- unreachable and refused targets ------------------------------------------------------------
@pytest.mark.parametrize("host,port,code", [
    ("tomcat", 1, 0x05),  # nothing listens: refused in the namespace
    ("10.251.9.9", 80, 0x04),  # a cluster CIDR address nobody has: no route in the namespace
    ("nosuchsvc", 80, 0x04),  # the cluster DNS says NXDOMAIN
    ("127.0.0.1", 1, 0x05),  # DIRECT, refused on the host
])
def test_socks5_unreachable_target(dataplane, host, port, code):
    s, got = socks5_connect(("127.0.0.1", dataplane.proxy_port), host, port)
    with s:
        assert got == code
        assert recv_all(s) == b""
    still_serves(dataplane)


@pytest.mark.parametrize("url", ["http://tomcat:1/", "http://10.251.9.9/", "http://nosuchsvc/",
                                 "http://127.0.0.1:1/"])
def test_http_unreachable_target_is_502(dataplane, url):
    r = curl("-o", "/dev/null", "-w", "%{http_code}", "-x", dataplane.http_proxy, url)
    assert r.stdout == "502", r.stderr
    r = curl("-p", "-x", dataplane.http_proxy, url)  # CONNECT: curl reports the proxy's 502
    assert r.returncode != 0 and "502" in r.stderr, r.stderr


def test_socks5_refused_as_curl_sees_it(dataplane):
    r = curl("--socks5-hostname", dataplane.socks, "http://tomcat:1/")
    assert r.returncode == 97  # CURLE_PROXY: the proxy could not connect
    assert "(5)" in r.stderr, r.stderr  # reply 0x05, connection refused


# -- start-up failures --------------------------------------------------------------------------
def error_lines(res: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in res.stderr.splitlines() if " ERR " in line or " FTL " in line]


def assert_one_clear_line(res: subprocess.CompletedProcess[str], *words: str) -> None:
    assert res.returncode != 0, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    errors = error_lines(res)
    assert len(errors) == 1, res.stderr
    for w in words:
        assert w in errors[0], res.stderr


def assert_nothing_listening(port: int) -> None:
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, f"something still listens on {port}"


def test_proxy_port_in_use(launcher, shadow):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = launcher.run(shadow, "--dns-port", "-1", proxy_port=port, timeout=30)
    assert_one_clear_line(res, "already in use", str(port))


def test_dns_port_in_use(launcher, shadow):
    proxy_port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        res = launcher.run(shadow, proxy_port=proxy_port, dns_port=port, timeout=30)
    assert_one_clear_line(res, "already in use", str(port))
    assert_nothing_listening(proxy_port)


def test_refused_key(launcher, netns, keys):
    wrong = Shadow(netns, keys, 2224, authorized_keys=keys.wrong_authorized_keys).start()
    try:
        proxy_port = free_port()
        res = launcher.run(wrong, proxy_port=proxy_port, timeout=40)
        assert_one_clear_line(res, "refused this session's key")
        assert_nothing_listening(proxy_port)
    finally:
        wrong.stop()


def test_wrong_host_key(launcher, shadow, keys, tmp_path):
    import asyncssh

    impostor = tmp_path / "impostor.pub"
    impostor.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_public_key())
    proxy_port = free_port()
    argv, _, _ = launcher.argv(shadow, proxy_port=proxy_port)
    argv[argv.index("--host-key-pub") + 1] = str(impostor)
    res = subprocess.run(argv, capture_output=True, text=True, timeout=40, env=clean_env())
    assert_one_clear_line(res, "host key")
    assert_nothing_listening(proxy_port)


def test_shadow_not_listening(launcher, netns, keys):
    dead = Shadow(netns, keys, 2299)  # never started
    proxy_port = free_port()
    res = launcher.run(dead, proxy_port=proxy_port, timeout=40)
    assert_one_clear_line(res)
    assert_nothing_listening(proxy_port)


def test_non_loopback_bind_needs_auth(launcher, shadow, netns):
    res = launcher.run(shadow, "--proxy-host", netns.host_ip, "--dns-port", "-1", timeout=30)
    assert_one_clear_line(res, "--proxy-auth")


def test_unusable_settings(launcher, shadow, tmp_path):
    res = launcher.run(shadow, "--proxy-auth", "no-colon", "--dns-port", "-1", timeout=30)
    assert_one_clear_line(res, "--proxy-auth")
    res = launcher.run(shadow, "--dns-port", "-1", identity=tmp_path / "missing-key", timeout=30)
    assert_one_clear_line(res, "missing-key")


def test_proxy_auth(launcher, shadow, netns):
    plane = launcher.start(shadow, "--proxy-host", netns.host_ip, "--proxy-auth", "alice:s3cret",
                           "--dns-port", "-1", proxy_host=netns.host_ip)
    try:
        hp = f"{netns.host_ip}:{plane.proxy_port}"
        url = "http://tomcat:8080/"
        ok = curl("-x", f"http://alice:s3cret@{hp}", url)
        assert TOMCAT_MARKER in ok.stdout, ok.stderr
        ok = curl("-x", f"socks5h://alice:s3cret@{hp}", url)
        assert TOMCAT_MARKER in ok.stdout, ok.stderr
        ok = curl("-p", "-x", f"http://alice:s3cret@{hp}", url)
        assert TOMCAT_MARKER in ok.stdout, ok.stderr

        denied = curl("-o", "/dev/null", "-w", "%{http_code}", "-x", f"http://{hp}", url)
        assert denied.stdout == "407"
        denied = curl("-o", "/dev/null", "-w", "%{http_code}", "-x", f"http://alice:wrong@{hp}", url)
        assert denied.stdout == "407"
        denied = curl("-p", "-x", f"http://{hp}", url)
        assert denied.returncode != 0 and "407" in denied.stderr, denied.stderr
        denied = curl("-x", f"socks5h://{hp}", url)
        assert denied.returncode != 0 and TOMCAT_MARKER not in denied.stdout
        denied = curl("-x", f"socks5h://alice:wrong@{hp}", url)
        assert denied.returncode != 0 and TOMCAT_MARKER not in denied.stdout
        denied = curl("--socks4a", hp, url)  # SOCKS4 has no passwords: refused, not a bypass
        assert denied.returncode != 0 and TOMCAT_MARKER not in denied.stdout

        # S3: the PAC names the cluster's namespaces and networks; a peer that is not loopback needs
        # the credentials too (this peer is the host's own veth address).
        pac_url = f"http://{hp}/proxy.pac"
        denied = curl("-o", "/dev/null", "-w", "%{http_code}", pac_url)
        assert denied.stdout == "401", denied.stderr
        denied = curl("-o", "/dev/null", "-w", "%{http_code}", "-u", "alice:wrong", pac_url)
        assert denied.stdout == "401", denied.stderr
        ok = curl("-u", "alice:s3cret", pac_url)
        assert "FindProxyForURL" in ok.stdout, ok.stderr
    finally:
        plane.stop()


def test_half_open_socks_client_is_dropped_not_stuck(dataplane):
    """A client that sends a partial greeting and waits does not block other clients."""
    with socket.create_connection(("127.0.0.1", dataplane.proxy_port)) as stuck:
        stuck.sendall(b"\x05\x02")
        still_serves(dataplane)
        s, code = socks5_connect(("127.0.0.1", dataplane.proxy_port), "tomcat", 8080)
        with s:
            assert code == 0
            s.sendall(b"GET / HTTP/1.1\r\nHost: tomcat\r\nConnection: close\r\n\r\n")
            assert TOMCAT_MARKER.encode() in recv_all(s)
