"""The router program (`python -m shadow_image.router`) on loopback with real clients: curl, raw sockets, a
WebSocket client. `default` (127.0.0.1:P) stands in for the original pods, `route` (127.0.0.2:P) for the
developer whose header is VERSION: abcde; both record what reached them (test_router_support.py)."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_router_support import RouterProcess, Upstreams, http_get, recv_all
from websockets.sync.client import connect as ws_connect

ROUTE = ("VERSION", "abcde")


@pytest.fixture(scope="module")
def ups() -> Iterator[Upstreams]:
    u = Upstreams().start()
    yield u
    u.stop()


@pytest.fixture(scope="module")
def router(ups: Upstreams, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterProcess]:
    r = RouterProcess(ups, tmp_path_factory.mktemp("router")).start()
    yield r
    r.stop()
    log = r.log.read_text()
    assert "Traceback" not in log, log


@pytest.fixture(autouse=True)
def _fresh(ups: Upstreams) -> None:
    ups.reset()


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", "--max-time", "20", *args], capture_output=True, text=True, check=False)


def _url(router: RouterProcess, path: str) -> str:
    return f"http://127.0.0.1:{router.port}{path}"


def _response(sock: socket.socket, buf: bytearray, head_only: bool = False) -> tuple[bytes, dict[str, str], bytes]:
    """One response off a raw socket (Content-Length or no body), leaving the rest in buf."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"closed; got {bytes(buf)!r}")
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.decode().partition(":") for ln in lines[1:])}
    n = 0 if head_only else int(headers.get("content-length", "0"))
    buf[:] = rest
    while len(buf) < n:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed inside a body")
        buf += data
    body = bytes(buf[:n])
    del buf[:n]
    return lines[0], headers, body


def test_curl_keep_alive_connection_alternates_between_route_and_original_pods(router, ups):
    u = _url(router, "/alt")
    res = curl("-v", u, "--next", "-H", "VERSION: abcde", u, "--next", "-H", "version: nobody", u,
               "--next", "-H", "Version: abcde", u)
    assert res.stdout == "default GET /alt\nroute GET /alt\ndefault GET /alt\nroute GET /alt\n"
    assert res.stderr.count("Re-using existing connection") == 3  # one client connection throughout


def test_raw_socket_keep_alive_routes_each_request_and_forwards_host_and_client(router, ups):
    with router.connect() as s:
        buf = bytearray()
        for i, hdr in enumerate(["", "VERSION: abcde\r\n", "X-Other: 1\r\n", "version:abcde \r\n", ""]):
            s.sendall(f"GET /k{i} HTTP/1.1\r\nHost: tomcat:8080\r\nX-Forwarded-For: 9.9.9.9\r\n{hdr}\r\n".encode())
            _, _headers, body = _response(s, buf)
            assert body == f"{'route' if 'abcde' in hdr else 'default'} GET /k{i}\n".encode()
    got = sorted(ups.default.requests + ups.route.requests, key=lambda r: r.target)
    assert [r.header("host") for r in got] == ["tomcat:8080"] * 5
    assert [r.header("x-forwarded-for") for r in got] == ["9.9.9.9, 127.0.0.1"] * 5
    # Upstream connections are kept alive too: one each.
    assert len({r.conn_id for r in ups.default.requests}) == 1 and len({r.conn_id for r in ups.route.requests}) == 1


def test_options_star_probe_passes_through(router, ups):
    with router.connect() as s:
        s.sendall(b"OPTIONS * HTTP/1.1\r\nHost: tomcat\r\nVERSION: abcde\r\nConnection: close\r\n\r\n")
        data = recv_all(s)
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"route OPTIONS *\n")


def test_pipelined_requests_are_answered_in_order_and_head_has_no_body(router, ups):
    with router.connect() as s:
        s.sendall(b"GET /p1 HTTP/1.1\r\nHost: a\r\n\r\n"
                  b"GET /sleep?0.3 HTTP/1.1\r\nHost: a\r\nVERSION: abcde\r\n\r\n"
                  b"HEAD /p3 HTTP/1.1\r\nHost: a\r\n\r\n"
                  b"POST /echo HTTP/1.1\r\nHost: a\r\nVERSION: abcde\r\nContent-Length: 5\r\n\r\nhello"
                  b"GET /p5 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        buf = bytearray()
        bodies = [_response(s, buf)[2], _response(s, buf)[2]]
        _status, headers, _ = _response(s, buf, head_only=True)
        assert headers["content-length"] == "17"  # the length a GET would have had, and no body follows
        bodies += [_response(s, buf)[2], _response(s, buf)[2]]
        assert bytes(buf) + recv_all(s) == b""
    assert bodies == [b"default GET /p1\n", b"route GET /sleep?0.3\n", b"hello", b"default GET /p5\n"]


def test_head_via_curl(router, ups):
    res = curl("-I", "-H", "VERSION: abcde", _url(router, "/h"))
    assert res.returncode == 0 and "x-upstream: route" in res.stdout
    assert [r.method for r in ups.route.requests] == ["HEAD"]


def test_an_upstream_connection_that_sent_bytes_after_a_head_answer_is_not_reused(router, ups):
    with router.connect() as s:
        buf = bytearray()
        for method, path in [("HEAD", "/h1"), ("GET", "/g1"), ("HEAD", "/head-extra"), ("GET", "/g2")]:
            s.sendall(f"{method} {path} HTTP/1.1\r\nHost: a\r\nVERSION: abcde\r\n\r\n".encode())
            status, _, body = _response(s, buf, head_only=method == "HEAD")
            assert status.startswith(b"HTTP/1.1 200") and body == (b"" if method == "HEAD" else b"route GET %s\n"
                                                                   % path.encode()), (status, body)
        assert bytes(buf) == b""
    ids = [r.conn_id for r in ups.route.requests]
    assert [r.target for r in ups.route.requests] == ["/h1", "/g1", "/head-extra", "/g2"]
    # A clean HEAD answer leaves its connection reusable; one followed by stray bytes does not.
    assert ids[0] == ids[1] == ids[2] != ids[3], ids


def test_chunked_upload_and_download_with_trailers(router, ups, tmp_path):
    payload = bytes(range(256)) * 4000  # 1 MB
    (tmp_path / "up").write_bytes(payload)
    res = subprocess.run(["curl", "-sS", "--max-time", "20", "-H", "Transfer-Encoding: chunked", "-H", "VERSION: abcde",
                          "--data-binary", f"@{tmp_path / 'up'}", _url(router, "/echo")],
                         capture_output=True, check=False)
    assert res.returncode == 0 and res.stdout == payload
    assert ups.route.requests[-1].body == payload
    assert ups.route.requests[-1].header("transfer-encoding") == "chunked"
    with router.connect() as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"5;ext=1\r\nhello\r\n1\r\n!\r\n0\r\nX-Checksum: 42\r\n\r\n"
                  b"GET /chunked HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        data = recv_all(s)
    assert ups.default.requests[0].body == b"hello!"
    assert ("trailer:x-checksum", "42") in ups.default.requests[0].headers
    assert b"\r\n\r\nhello!HTTP/1.1 200 " in data
    assert data.endswith(b"0\r\nx-sum: 3\r\n\r\n") and b"part2 default GET /chunked\n" in data


def test_expect_100_continue_relays_the_upstreams_interim_answer(router, ups):
    with router.connect() as s:
        s.sendall(b"POST /expect HTTP/1.1\r\nHost: a\r\nVERSION: abcde\r\nExpect: 100-continue\r\n"
                  b"Content-Length: 4\r\n\r\n")
        buf = bytearray()
        status, _, _ = _response(s, buf, head_only=True)
        assert status == b"HTTP/1.1 100 "
        s.sendall(b"body")
        status, _, body = _response(s, buf)
        assert status.startswith(b"HTTP/1.1 200") and body == b"route POST /expect\n"


def test_expect_100_continue_never_answered_by_the_router_itself(router, ups):
    """The upstream refuses the body (417, no 100): the client's first answer must be that 417."""
    with router.connect() as s:
        s.sendall(b"PUT /expect-refuse HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
        data = recv_all(s)
    assert data.startswith(b"HTTP/1.1 417 ")
    assert b" 100 " not in data


def test_websocket_goes_where_its_handshake_was_routed(router, ups):
    with ws_connect(f"ws://127.0.0.1:{router.port}/ws", additional_headers={"VERSION": "abcde"}) as ws:
        ws.send("hello")
        assert ws.recv(timeout=10) == "route: hello"
        ws.send(b"\x00\x01" * 40000)
        assert ws.recv(timeout=10) == b"route: " + b"\x00\x01" * 40000
    with ws_connect(f"ws://127.0.0.1:{router.port}/ws") as ws:
        ws.send("hi")
        assert ws.recv(timeout=10) == "default: hi"
    assert [r.target for r in ups.route.requests] == ["/ws"]
    assert ups.route.requests[0].header("x-forwarded-for") == "127.0.0.1"


@pytest.mark.parametrize("upgrade", [b"h2c, websocket", b"websocket, h2c", b"websocket\r\nUpgrade: h2c"])
def test_a_mixed_upgrade_is_served_as_plain_http_and_the_connection_stays_routed(router, ups, upgrade):
    """A mixed Upgrade used to be forwarded as a protocol switch: spliced on 101 (every later request then
    reached that upstream whatever its header) or closed after a 200 (a pipelined request lost)."""
    first = (b"GET /mixed HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: " + upgrade
             + b"\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
             b"Sec-WebSocket-Version: 13\r\n\r\n")
    with router.connect() as s:
        s.settimeout(10)
        s.sendall(first + b"GET /next HTTP/1.1\r\nHost: a\r\nVERSION: abcde\r\n\r\n")
        buf = bytearray()
        status, headers, body = _response(s, buf)
        assert status.startswith(b"HTTP/1.1 200") and body == b"default GET /mixed\n"
        assert "upgrade" not in headers
        status, _, body = _response(s, buf)
        assert status.startswith(b"HTTP/1.1 200") and body == b"route GET /next\n"
    seen = ups.default.requests[0]
    assert seen.header("upgrade") is None and seen.header("http2-settings") is None
    assert "upgrade" not in (seen.header("connection") or "").lower()


def test_non_http_bytes_go_to_the_original_pods_untouched_with_half_close(router, ups):
    with router.connect() as s:
        s.sendall(b"\x16\x03\x01\x00\x05hello")
        got = bytearray()
        while len(got) < len(b"default raw:\x16\x03\x01\x00\x05hello"):
            got += s.recv(100)
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b""  # the upstream's half-close answered ours
    assert bytes(got) == b"default raw:\x16\x03\x01\x00\x05hello"
    assert [bytes(v) for v in ups.default.raw.values()] == [b"\x16\x03\x01\x00\x05hello"]


def test_a_word_and_a_space_that_is_no_http_method_is_not_http(router, ups):
    with router.connect() as s:
        s.sendall(b"SET key value\r\n")  # a Redis inline command
        assert s.recv(100) == b"default raw:SET key value\r\n"


@pytest.mark.parametrize(("line", "status"), [(b"bad_method\x01 /x HTTP/1.1", b"400 Bad Request"),
                                              (b"FOO /x HTTP/1.1", b"501 Not Implemented"),
                                              (b"get /x HTTP/1.1", b"501 Not Implemented")])
def test_an_http_shaped_request_line_the_router_cannot_parse_is_refused_not_passed_raw(router, ups, line, status):
    with router.connect() as s:
        s.settimeout(10)
        s.sendall(line + b"\r\nHost: a\r\nVERSION: abcde\r\n\r\n")
        data = recv_all(s)
    assert data.startswith(b"HTTP/1.1 " + status + b"\r\n"), data
    assert b"Connection: close" in data
    assert ups.default.raw == {} and ups.route.raw == {} and ups.default.requests == []


def test_an_empty_line_before_the_request_line_is_ignored(router, ups):
    with router.connect() as s:
        s.settimeout(10)
        s.sendall(b"\r\nGET /after-crlf HTTP/1.1\r\nHost: a\r\nVERSION: abcde\r\nConnection: close\r\n\r\n")
        data = recv_all(s)
    assert data.endswith(b"route GET /after-crlf\n"), data
    assert ups.default.raw == {}


def test_a_silent_client_reaches_a_server_that_speaks_first(router, ups):
    with router.connect() as s:
        assert s.recv(100) == b"default greeting\r\n"


def test_http10_client(router, ups):
    res = curl("-0", "-v", "-H", "VERSION: abcde", _url(router, "/old"))
    assert res.stdout == "route GET /old\n"
    with router.connect() as s:
        s.sendall(b"GET /chunked HTTP/1.0\r\n\r\n")
        data = recv_all(s)  # chunked upstream answer, sent plain and delimited by close
    assert b"Transfer-Encoding" not in data and b"Connection: close" in data
    assert data.endswith(b"part0 default GET /chunked\npart1 default GET /chunked\npart2 default GET /chunked\n")


def test_connection_close_and_close_delimited_answers(router, ups):
    res = curl("-v", _url(router, "/close-delimited"), "--next", _url(router, "/after"))
    assert res.stdout == "default GET /close-delimited\nmore\ndefault GET /after\n"
    assert "Re-using existing connection" not in res.stderr  # the first answer ended with the connection


def test_204_and_304_have_no_body(router, ups):
    with router.connect() as s:
        s.sendall(b"GET /204 HTTP/1.1\r\nHost: a\r\n\r\nGET /304 HTTP/1.1\r\nHost: a\r\n\r\n"
                  b"GET /z HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        data = recv_all(s)
    assert data.count(b"HTTP/1.1 ") == 3 and data.endswith(b"default GET /z\n")


def test_unreachable_route_is_a_502_naming_it(ups, tmp_path):
    r = RouterProcess(ups, tmp_path, route_host="127.0.0.3").start()
    try:
        res = curl("-i", "-H", "VERSION: abcde", _url(r, "/x"), "--next", _url(r, "/y"))
        assert res.stdout.startswith("HTTP/1.1 502 Bad Gateway")
        assert (f"ktproxy mesh: route 'VERSION: abcde' (127.0.0.3:{ups.port}) is unreachable: connection refused\n"
                in res.stdout)
        assert res.stdout.endswith("default GET /y\n")  # the same connection goes on
    finally:
        r.stop()


def test_upstream_closing_before_answering_is_a_502_and_dying_mid_response_cuts_the_client(router, ups):
    res = curl("-i", "-H", "VERSION: abcde", _url(router, "/die"))
    assert res.stdout.startswith("HTTP/1.1 502 ")
    assert "route 'VERSION: abcde'" in res.stdout and "closed the connection before answering" in res.stdout
    res = curl(_url(router, "/cut"))
    assert res.returncode == 18  # CURLE_PARTIAL_FILE: the client sees the answer cut, not a hang


def test_dead_pooled_connection_is_retried_for_idempotent_requests_only(router, ups):
    res = curl(_url(router, "/then-drop"), "--next", _url(router, "/again"))
    assert res.stdout == "default GET /then-drop\ndefault GET /again\n"
    res = curl("-i", _url(router, "/then-drop"), "--next", "-i", "-X", "POST", _url(router, "/post"))
    assert "HTTP/1.1 502 " in res.stdout and "closed the connection before answering" in res.stdout
    assert [r.target for r in ups.default.requests].count("/post") == 1  # sent once, never repeated


def test_malformed_and_smuggling_requests_get_400_and_reach_no_upstream(router, ups):
    cases = [
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
        b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n",  # raw UTF-8 in the target: kept refused (README)
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
        b"GET / HTTP/1.1\nHost: a\n\n",
        b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"x" * 70000 + b"\r\n\r\n",
    ]
    for case in cases:
        with router.connect() as s:
            s.sendall(case)
            data = recv_all(s)
        assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n"), (case[:60], data)
    assert ups.default.requests == [] and ups.route.requests == []


@pytest.mark.parametrize("fields", [b"VERSION: nobody\r\nversion: abcde", b"version: abcde\r\nVersion: abcde",
                                    b"VERSION: abcde\r\nVERSION: other"])
def test_a_repeated_route_header_gets_400_and_is_never_forwarded(router, ups, fields):
    with router.connect() as s:
        s.sendall(b"GET /twice HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n\r\nGET /next HTTP/1.1\r\nHost: a\r\n\r\n")
        data = recv_all(s)
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n"), data
    assert data.endswith(b"ktproxy mesh: bad request: the route header VERSION more than once\n"), data
    assert ups.default.requests == [] and ups.route.requests == []


def test_look_alike_framing_names_never_reach_an_upstream(router, ups):
    with router.connect() as s:
        s.settimeout(10)
        s.sendall(b"POST /look HTTP/1.1\r\nHost: a\r\nTransfer_Encoding: chunked\r\nContent_Length: 99\r\n"
                  b"Transfer---Encoding: chunked\r\nX-Kept: 1\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        data = recv_all(s)
    assert data.endswith(b"default POST /look\n"), data
    (seen,) = ups.default.requests
    assert [n for n, _ in seen.headers if "_" in n or "--" in n] == []
    assert seen.header("x-kept") == "1" and seen.body == b"ok"


def test_a_valid_transfer_coding_the_router_does_not_implement_gets_501(router, ups):
    with router.connect() as s:
        s.settimeout(10)
        s.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n")
        data = recv_all(s)
    assert data.startswith(b"HTTP/1.1 501 Not Implemented\r\n"), data
    assert data.endswith(b"ktproxy mesh: not implemented: Transfer-Encoding other than chunked\n"), data
    assert ups.default.requests == [] and ups.default.raw == {}


def test_an_upgrade_request_with_a_body_is_refused_not_smuggled(router, ups):
    # llhttp ends an Upgrade request at its head; a declined h2c upgrade used to go on parsing its body as
    # the next request while the upstream waited for that body.
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: a\r\nVERSION: abcde\r\n\r\n"
    for protocol, reason in [(b"h2c", b"Upgrade: h2c with a body"), (b"websocket", b"an Upgrade request with a body")]:
        with router.connect() as s:
            s.sendall(b"POST /up HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: " + protocol
                      + b"\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nSec-WebSocket-Key: k\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(smuggled) + smuggled)
            s.settimeout(5)
            data = recv_all(s)
        assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n"), data
        assert data.endswith(b"ktproxy mesh: bad request: " + reason + b"\n"), data
    assert ups.default.requests == [] and ups.route.requests == []
    assert ups.default.raw == {} and ups.route.raw == {}


def test_request_trailers_are_capped_like_heads(router, ups):
    with router.connect() as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: a\r\nVERSION: abcde\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"5\r\nhello\r\n0\r\nX-T: " + b"t" * (1 << 20))  # a trailer field that never ends
        s.settimeout(5)
        data = recv_all(s)
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n"), data[:200]
    assert data.endswith(b"ktproxy mesh: bad request: request trailer section too large\n"), data
    assert ups.route.requests == [] and ups.default.requests == []
    # Many small chunks and a few trailers are no trailer section over the limit.
    body = b"".join(b"1;ext=%d\r\n%c\r\n" % (i, 97 + i % 26) for i in range(20000))
    with router.connect() as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                  + body + b"0\r\nX-T: 1\r\n\r\n")
        data = recv_all(s)
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(bytes(97 + i % 26 for i in range(20000)))


@pytest.mark.parametrize("path", ["/huge-head", "/huge-trailer"])
def test_upstream_response_heads_and_trailers_are_capped(router, ups, path):
    with router.connect() as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: a\r\nVERSION: abcde\r\nConnection: close\r\n\r\n".encode())
        s.settimeout(10)
        data = recv_all(s)
    if path == "/huge-head":
        assert data.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), data[:200]
        assert data.endswith(f"ktproxy mesh: route 'VERSION: abcde' (127.0.0.2:{ups.port}) sent a response head "
                             "or trailer section over 64 KiB\n".encode()), data
    else:  # the response had begun: the client sees it cut short
        assert data.startswith(b"HTTP/1.1 200 OK\r\n") and not data.endswith(b"0\r\n\r\n"), data[:200]


def test_an_error_after_a_valid_pipelined_request_answers_that_one_first(router, ups):
    with router.connect() as s:
        s.sendall(b"GET /ok HTTP/1.1\r\nHost: a\r\nVERSION: abcde\r\n\r\n"
                  b"GET /bad HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
        data = recv_all(s)
    assert data.startswith(b"HTTP/1.1 200 ") and b"route GET /ok\n" in data
    assert data.endswith(b"ktproxy mesh: bad request: a request needs exactly one Host header\n")
    assert [r.target for r in ups.route.requests] == ["/ok"] and ups.default.requests == []


def test_route_removed_and_added_while_a_request_is_in_flight(router, ups):
    results: list[str] = []
    slow = threading.Thread(target=lambda: results.append(
        curl("-H", "VERSION: abcde", _url(router, "/sleep?1.5")).stdout))
    slow.start()
    while not any(r.target == "/sleep?1.5" for r in ups.route.requests) and slow.is_alive():
        # the request reached the route's upstream (it records at the request's end, before sleeping)
        time.sleep(0.02)
    router.set_routes("version:fghij")
    router.wait_routes([["version", "fghij"]])
    assert curl("-H", "VERSION: abcde", _url(router, "/gone")).stdout == "default GET /gone\n"
    slow.join(20)
    assert results == ["route GET /sleep?1.5\n"]  # dispatched before the change: completes where it went
    router.set_routes("version:fghij,version:abcde")
    router.wait_routes([["version", "fghij"], ["version", "abcde"]])
    assert curl("-H", "VERSION: abcde", _url(router, "/back")).stdout == "route GET /back\n"
    router.set_routes("version:abcde")
    router.wait_routes([["version", "abcde"]])
    log = router.log.read_text()
    assert "route removed: VERSION: abcde -> 127.0.0.2:" in log and "route added: VERSION: fghij" in log


def test_health_port(router):
    assert http_get("127.0.0.1", router.health_port, "/ready") == (200, b"routing 1 route(s)\n")
    status, body = http_get("127.0.0.1", router.health_port, "/routes")
    assert (status, body) == (200, b'{"routes": [["version", "abcde"]]}\n')


def test_not_ready_until_the_annotations_file_was_read(ups, tmp_path):
    r = RouterProcess(ups, tmp_path)
    r.annotations.unlink()
    r.proc = subprocess.Popen(r.args, stdout=open(r.log, "wb"), stderr=subprocess.STDOUT,
                              cwd=Path(__file__).resolve().parents[2])
    try:
        status = 0
        deadline = time.monotonic() + 15
        while status == 0 and time.monotonic() < deadline:
            try:
                status, body = http_get("127.0.0.1", r.health_port, "/ready")
            except OSError:
                time.sleep(0.05)
        assert status == 503 and b"not read yet" in body
        r.set_routes("version:abcde")
        deadline = time.monotonic() + 10
        while http_get("127.0.0.1", r.health_port, "/ready")[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        r.stop()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_slow_client_holds_the_upstream_back_instead_of_the_routers_memory(router, ups):
    size = 200 * 1024 * 1024
    pid = router.proc.pid
    before = _rss_kib(pid)
    with router.connect() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.sendall(f"GET /big?{size} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        got = len(s.recv(65536))
        time.sleep(1.5)  # the upstream writes as fast as it is allowed meanwhile
        grown = _rss_kib(pid) - before
        while got < size:
            data = s.recv(1 << 20)
            assert data
            got += len(data)
    assert grown < 40 * 1024, f"router grew {grown} KiB while its client did not read"


def test_idle_timeouts_and_504_naming_the_route(ups, tmp_path):
    r = RouterProcess(ups, tmp_path)
    r.args += ["--client-idle", "0.5", "--upstream-idle", "0.5"]
    r.start()
    try:
        res = curl("-i", "-H", "VERSION: abcde", _url(r, "/sleep?3"))
        assert res.stdout.startswith("HTTP/1.1 504 Gateway Timeout")
        assert f"ktproxy mesh: route 'VERSION: abcde' (127.0.0.2:{ups.port}) did not answer within 0.5 s" in res.stdout
        with r.connect() as s:
            s.sendall(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
            buf = bytearray()
            assert _response(s, buf)[2] == b"default GET /a\n"
            assert recv_all(s) == b""  # closed by the router once idle (the socket's own timeout is 10 s)
        with r.connect() as s:
            s.sendall(b"GET /a HTTP/1.1\r\nHost: a\r\n")  # a head that never ends
            assert recv_all(s) == b""
    finally:
        r.stop()


def test_upstream_idle_shorter_than_client_idle_is_kept(ups, tmp_path):
    # The connection's one timer used to tick at the client's idle time only: the upstream got 5 s, not 0.5.
    r = RouterProcess(ups, tmp_path)
    r.args += ["--client-idle", "5", "--upstream-idle", "0.5"]
    r.start()
    try:
        res = curl("-i", "-H", "VERSION: abcde", _url(r, "/sleep?3"))
        assert res.stdout.startswith("HTTP/1.1 504 Gateway Timeout"), res.stdout
        assert "did not answer within 0.5 s" in res.stdout
    finally:
        r.stop()


def test_a_stopping_router_lets_a_request_under_way_finish_and_closes_idle_connections(ups, tmp_path):
    r = RouterProcess(ups, tmp_path).start()
    try:
        with r.connect() as idle, r.connect() as busy:
            idle.sendall(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
            buf = bytearray()
            _response(idle, buf)
            busy.sendall(b"GET /sleep?1 HTTP/1.1\r\nHost: a\r\n\r\n")
            while not any(q.target == "/sleep?1" for q in ups.default.requests):
                time.sleep(0.02)
            r.proc.terminate()
            assert recv_all(idle) == b""
            status, _, body = _response(busy, bytearray())
            assert status.startswith(b"HTTP/1.1 200") and body == b"default GET /sleep?1\n"
        assert r.proc.wait(15) == 0
        assert "stopping: 2 connection(s) open" in r.log.read_text()
    finally:
        r.stop()


def test_a_slow_upstream_holds_the_client_back_instead_of_the_routers_memory(router, ups):
    size = 200 * 1024 * 1024
    pid = router.proc.pid
    before = _rss_kib(pid)
    grown: list[int] = []
    with router.connect() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        s.sendall(f"POST /slow-reader HTTP/1.1\r\nHost: a\r\nContent-Length: {size}\r\n\r\n".encode())

        def measure() -> None:
            time.sleep(1.0)  # the client pushes as fast as it is allowed meanwhile; the upstream reads nothing
            grown.append(_rss_kib(pid) - before)

        probe = threading.Thread(target=measure)
        probe.start()
        block = b"u" * (1 << 20)
        for _ in range(size // len(block)):
            s.sendall(block)
        probe.join()
        _, _, body = _response(s, bytearray())
    assert body == b"default POST /slow-reader\n"
    assert ups.default.requests[-1].body == b"%d bytes" % size
    assert grown[0] < 40 * 1024, f"router grew {grown[0]} KiB while its upstream did not read"


def test_ipv6_clients_are_served_and_named_as_such(router, ups):
    res = curl("-g", "-H", "VERSION: abcde", f"http://[::1]:{router.port}/six")
    assert res.stdout == "route GET /six\n"
    assert ups.route.requests[-1].header("x-forwarded-for") == "::1"


def test_http10_keep_alive_client_keeps_its_connection(router, ups):
    with router.connect() as s:
        buf = bytearray()
        for path in ("/k1", "/k2"):
            s.sendall(f"GET {path} HTTP/1.0\r\nConnection: keep-alive\r\nVERSION: abcde\r\n\r\n".encode())
            _, headers, body = _response(s, buf)
            assert body == f"route GET {path}\n".encode() and headers["connection"] == "keep-alive"
        s.sendall(b"GET /k3 HTTP/1.0\r\n\r\n")
        _, headers, body = _response(s, buf)
        assert body == b"default GET /k3\n" and headers["connection"] == "close"
        assert recv_all(s) == b""
    assert [r.header("host") for r in ups.route.requests] == ["tomcat", "tomcat"]  # HTTP/1.1 upstream needs one
