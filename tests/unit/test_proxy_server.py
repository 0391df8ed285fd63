"""The proxy server end to end on loopback: scripted origin servers, a raw client, a dialer that counts.

Each test drives one failure the review found (B2, S2, B4, R6, S3, T1's 100-continue, "always a protocol
answer") and fails when its fix is taken out. Timeouts are shrunk through the module constants.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from ktproxy.errors import KtError
from ktproxy.proxy import relay, server
from ktproxy.proxy.dialer import DialError
from ktproxy.proxy.server import ProxyServer
from ktwire import http1

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Origin:
    """An origin server on 127.0.0.1 that runs `handler(reader, writer, n)` for its n-th connection and
    records when each connection saw EOF from the proxy."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self._eofs: defaultdict[int, asyncio.Event] = defaultdict(asyncio.Event)
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = self.connections
        self.connections += 1
        try:
            await self.handler(reader, writer, n)
            while await reader.read(65536):  # then wait for the proxy to let go
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._eofs[n].set()
            writer.close()

    async def closed(self, n: int = 0) -> None:
        """Until the proxy has closed (or half-closed) the origin's n-th connection."""
        await self._eofs[n].wait()

    async def __aenter__(self) -> Origin:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()


class Dialer:
    """Direct dials to loopback that are counted, or that fail with `fail`."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.dials = 0
        self.fail = fail

    async def dial(self, host: str, port: int) -> tuple[Any, Any]:
        self.dials += 1
        if self.fail is not None:
            raise self.fail
        return await asyncio.open_connection(host, port)


class Proxy:
    def __init__(self, dialer: Dialer, **kwargs: Any) -> None:
        self.dialer = dialer
        self.server = ProxyServer(dialer, **kwargs)  # type: ignore[arg-type]

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.server.bound_port)


@pytest.fixture
async def unretrieved() -> AsyncIterator[list[dict[str, Any]]]:
    """Exceptions asyncio reports on its own (e.g. "Task exception was never retrieved"); must stay empty."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    old = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: seen.append(ctx))
    yield seen
    gc.collect()
    await asyncio.sleep(0)
    loop.set_exception_handler(old)
    assert not seen, seen


async def start_proxy(dialer: Dialer | None = None, **kwargs: Any) -> Proxy:
    proxy = Proxy(dialer or Dialer(), **kwargs)
    await proxy.server.start("127.0.0.1", 0)
    return proxy


@pytest.fixture
async def proxy(unretrieved: list[dict[str, Any]]) -> AsyncIterator[Proxy]:
    """A proxy that is closed before `unretrieved` looks for lost exceptions."""
    p = await start_proxy()
    yield p
    await p.server.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[http1.Response, bytes]:
    resp = await http1.read_response(reader)
    n = http1.body_length(resp, is_response=True)
    body = b"" if n == 0 else (await reader.readexactly(n) if n and n > 0 else await reader.read())
    return resp, body


async def read_request(reader: asyncio.StreamReader) -> tuple[http1.Request, bytes]:
    req = await http1.read_request(reader)
    assert req is not None
    n = http1.body_length(req, is_response=False)
    assert n is not None and n >= 0
    return req, await reader.readexactly(n)


def get(port: int, path: str = "/", method: str = "GET", extra: str = "") -> bytes:
    return f"{method} http://127.0.0.1:{port}{path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


async def answer_each(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: int,
                      response: bytes = OK) -> None:
    for _ in range(count):
        await read_request(reader)
        writer.write(response)
        await writer.drain()


async def head_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    """An origin that reads a request head and then waits: for a body, or for nothing."""
    await http1.read_request(reader)


# -- B2: a request body that fails ---------------------------------------------------------------
@pytest.mark.parametrize("body", [
    b"ZZ\r\nhello\r\n0\r\n\r\n",   # a chunk size that is not hex
    b"5\r\nhelloXY",               # chunk data not followed by CRLF
])
async def test_bad_request_body_answers_400_and_closes_both(proxy, unretrieved, body):
    async with Origin(head_only) as origin, asyncio.timeout(10):
        r, w = await proxy.connect()
        w.write(get(origin.port, "/up", "POST", "Transfer-Encoding: chunked\r\n") + body)
        resp, _ = await read_response(r)
        assert resp.status == 400
        assert resp.get("connection") == "close"
        assert await r.read() == b""  # the client connection is closed...
        await origin.closed(0)  # ...and so is the upstream
        w.close()


async def test_client_gone_mid_body_closes_the_upstream(proxy, unretrieved):
    async with Origin(head_only) as origin, asyncio.timeout(10):
        _, w = await proxy.connect()
        w.write(get(origin.port, "/up", "PUT", "Content-Length: 100\r\n") + b"only ten b")
        await w.drain()
        w.close()
        await origin.closed(0)


async def test_early_answer_while_the_body_is_still_coming(proxy, unretrieved):
    # An origin may answer before the body is complete (a 413, a 401): the client gets that answer.
    async def refuse(reader, writer, n):
        await http1.read_request(reader)
        writer.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()

    async with Origin(refuse) as origin, asyncio.timeout(10):
        r, w = await proxy.connect()
        w.write(get(origin.port, "/up", "PUT", "Content-Length: 1000000\r\n") + b"x" * 1000)
        resp, _ = await read_response(r)
        assert resp.status == 413
        w.close()


# -- T1: interim responses -----------------------------------------------------------------------
async def continue_then_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    """Answers a request that expects 100-continue: the 100, then the body it got."""
    req = await http1.read_request(reader)
    assert req is not None and req.get("expect") == "100-continue"
    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    await writer.drain()
    body = await reader.readexactly(int(req.get("content-length") or 0))
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


async def test_100_continue_reaches_the_client_before_the_body(proxy, unretrieved):
    async with Origin(continue_then_echo) as origin:
        r, w = await proxy.connect()
        w.write(get(origin.port, "/up", "POST", "Content-Length: 5\r\nExpect: 100-continue\r\n"))
        async with asyncio.timeout(5):  # a client that waits for the 100 before it sends the body
            interim = await http1.read_response(r)
        assert interim.status == 100
        w.write(b"hello")
        async with asyncio.timeout(10):
            resp, body = await read_response(r)
        assert (resp.status, body) == (200, b"hello")
        w.close()


# -- S2: timeouts --------------------------------------------------------------------------------
async def test_socks5_password_stage_times_out(monkeypatch, unretrieved):
    monkeypatch.setattr(server, "HANDSHAKE_TIMEOUT", 0.2)
    p = await start_proxy(credentials=("alice", "s3cret"))
    try:
        r, w = await p.connect()
        w.write(b"\x05\x01\x02")
        assert await r.readexactly(2) == b"\x05\x02"
        w.write(b"\x01")  # the start of RFC 1929 user/password, then nothing
        async with asyncio.timeout(5):
            assert await r.read() == b""
        w.close()
    finally:
        await p.server.close()


async def test_idle_keep_alive_client_is_closed(monkeypatch, proxy, unretrieved):
    monkeypatch.setattr(server, "KEEPALIVE_TIMEOUT", 0.2)
    async with Origin(lambda r, w, n: answer_each(r, w, 1)) as origin:
        r, w = await proxy.connect()
        w.write(get(origin.port))
        async with asyncio.timeout(5):
            resp, _ = await read_response(r)
            assert resp.get("connection") == "keep-alive"
            assert await r.read() == b""  # no second request came: closed
            await origin.closed(0)
        w.close()


@pytest.mark.parametrize("answer,status", [
    (b"", 504),                                                           # no head: the proxy answers
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nten bytes!", 200),  # mid-body: only closing is honest
])
async def test_upstream_that_stops_sending(monkeypatch, proxy, unretrieved, answer, status):
    monkeypatch.setattr(server, "EXCHANGE_IDLE_TIMEOUT", 0.3)

    async def stall(reader, writer, n):
        await http1.read_request(reader)
        writer.write(answer)

    async with Origin(stall) as origin, asyncio.timeout(5):
        r, w = await proxy.connect()
        w.write(get(origin.port))
        resp = await http1.read_response(r)
        assert resp.status == status
        rest = await r.read()  # to the close
        assert rest == b"ten bytes!" if status == 200 else rest.startswith(b"ktproxy: ")
        await origin.closed(0)
        w.close()


async def test_slow_but_moving_upload_is_not_cut(monkeypatch, proxy, unretrieved):
    # Inactivity, not duration: a body trickling in for longer than the timeout keeps the exchange alive.
    monkeypatch.setattr(server, "EXCHANGE_IDLE_TIMEOUT", 0.5)

    async def echo_length(reader, writer, n):
        _, body = await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    async with Origin(echo_length) as origin, asyncio.timeout(10):
        r, w = await proxy.connect()
        w.write(get(origin.port, "/up", "POST", "Content-Length: 8\r\n"))
        for i in range(8):  # 8 x 0.2 s = 1.6 s in all, more than three timeouts
            await asyncio.sleep(0.2)
            w.write(b"%d" % i)
        resp, body = await read_response(r)
        assert (resp.status, body) == (200, b"01234567")
        w.close()


async def socks5_open(p: Proxy, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    r, w = await p.connect()
    w.write(b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01" + port.to_bytes(2, "big"))
    assert await r.readexactly(2) == b"\x05\x00"
    reply = await r.readexactly(10)
    return r, w, reply[1]


async def test_idle_relay_is_closed(monkeypatch, proxy, unretrieved):
    monkeypatch.setattr(relay, "IDLE_TIMEOUT", 0.3)

    async def idle(reader, writer, n):
        pass

    async with Origin(idle) as origin, asyncio.timeout(5):
        r, w, code = await socks5_open(proxy, origin.port)
        assert code == 0
        assert await r.read() == b""
        await origin.closed(0)
        w.close()


async def test_busy_relay_outlives_the_idle_timeout(monkeypatch, proxy, unretrieved):
    monkeypatch.setattr(relay, "IDLE_TIMEOUT", 0.5)

    async def echo(reader, writer, n):
        while data := await reader.read(100):
            writer.write(data)

    async with Origin(echo) as origin, asyncio.timeout(10):
        r, w, _ = await socks5_open(proxy, origin.port)
        for i in range(8):  # traffic every 0.2 s for 1.6 s
            await asyncio.sleep(0.2)
            w.write(b"%d" % i)
            assert await r.readexactly(1) == b"%d" % i
        w.close()


# -- B4: upstream failures are 502, and every method token passes -------------------------------
@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nX: " + b"a" * (70 * 1024) + b"\r\n\r\n",  # head too large
    b"HTTP/1.1 200 OK\r\nContent-Le",                               # closed mid-head
    b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n",                    # malformed
    b"ICY 200 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",                 # no usable length
    b"",                                                            # closed without a byte
])
@pytest.mark.parametrize("body_pending", [False, True])
async def test_upstream_head_errors_are_502(proxy, unretrieved, answer, body_pending):
    async def bad(reader, writer, n):
        await http1.read_request(reader)
        writer.write(answer)
        await writer.drain()
        writer.close()

    async with Origin(bad) as origin, asyncio.timeout(10):
        r, w = await proxy.connect()
        if body_pending:  # a body still to come when the bad head arrives: its copy must end quietly
            w.write(get(origin.port, "/", "PUT", "Content-Length: 100\r\n"))
        else:
            w.write(get(origin.port))
        resp, _ = await read_response(r)
        assert resp.status == 502
        w.close()


@pytest.mark.parametrize("method", ["M-SEARCH", "VERSION-CONTROL", "propfind"])
async def test_method_tokens_are_forwarded(proxy, unretrieved, method):
    seen = []

    async def record(reader, writer, n):
        req, _ = await read_request(reader)
        seen.append(req.method)
        writer.write(OK)

    async with Origin(record) as origin, asyncio.timeout(10):
        r, w = await proxy.connect()
        w.write(get(origin.port, method=method))
        resp, _ = await read_response(r)
        assert resp.status == 200 and seen == [method]
        w.close()


# -- R6: stale kept-alive upstreams and Connection: close ----------------------------------------
def stale_first(later: Handler) -> Handler:
    """Connection 0 answers one request, then closes when the next one arrives (its idle close crossed
    that request); later connections run `later`."""
    async def handler(reader, writer, n):
        if n > 0:
            await later(reader, writer, n)
            return
        await answer_each(reader, writer, 1)
        await reader.read(1)
        writer.transport.abort()
    return handler


async def answer_all(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    while await http1.read_request(reader) is not None:
        writer.write(OK)
        await writer.drain()


@pytest.mark.parametrize("method,extra", [("GET", ""), ("HEAD", ""), ("DELETE", ""),
                                          ("PUT", "Content-Length: 0\r\n")])
async def test_stale_kept_alive_upstream_is_retried(proxy, unretrieved, method, extra):
    async with Origin(stale_first(answer_all)) as origin, asyncio.timeout(10):
        r, w = await proxy.connect()
        w.write(get(origin.port, "/1"))
        assert (await read_response(r))[0].status == 200
        w.write(get(origin.port, "/2", method, extra))
        resp = await http1.read_response(r)
        assert resp.status == 200
        assert origin.connections == 2 and proxy.dialer.dials == 2
        w.close()


async def test_stale_upstream_retry_waits_for_an_expect_continue_body(proxy, unretrieved):
    # A body not yet sent by the client (it waits for 100 Continue) can still go to a new connection.
    async with Origin(stale_first(continue_then_echo)) as origin, asyncio.timeout(10):
        r, w = await proxy.connect()
        w.write(get(origin.port, "/1"))
        assert (await read_response(r))[0].status == 200
        w.write(get(origin.port, "/2", "PUT", "Content-Length: 3\r\nExpect: 100-continue\r\n"))
        assert (await http1.read_response(r)).status == 100
        w.write(b"abc")
        resp, body = await read_response(r)
        assert (resp.status, body) == (200, b"abc")
        w.close()


@pytest.mark.parametrize("method,extra,body", [("POST", "Content-Length: 0\r\n", b""),
                                               ("PUT", "Content-Length: 3\r\n", b"abc")])
async def test_unsafe_request_on_a_stale_upstream_is_not_repeated(proxy, unretrieved, method, extra, body):
    # POST is not idempotent; a PUT whose body already went to the dead connection cannot be re-read.
    async with Origin(stale_first(answer_all)) as origin, asyncio.timeout(10):
        r, w = await proxy.connect()
        w.write(get(origin.port, "/1"))
        assert (await read_response(r))[0].status == 200
        w.write(get(origin.port, "/2", method, extra) + body)
        resp, _ = await read_response(r)
        assert resp.status == 502
        assert origin.connections == 1
        w.close()


async def test_upstream_connection_close_keeps_the_client(proxy, unretrieved):
    closing = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"

    async def answer_once_and_close(reader, writer, n):
        await answer_each(reader, writer, 1, closing)
        writer.close()

    async with Origin(answer_once_and_close) as origin, asyncio.timeout(10):
        r, w = await proxy.connect()
        for path in ("/1", "/2", "/3"):
            w.write(get(origin.port, path))
            resp, body = await read_response(r)
            assert (resp.status, body) == (200, b"ok")
            assert resp.get("connection") == "keep-alive"  # this hop's decision, not the upstream's
        assert origin.connections == 3
        w.close()


async def test_connect_after_absolute_uri_releases_the_idle_upstream(proxy, unretrieved):
    async def handler(reader, writer, n):
        if n == 0:
            await answer_each(reader, writer, 1)

    async with Origin(handler) as origin, asyncio.timeout(10):
        r, w = await proxy.connect()
        w.write(get(origin.port))
        await read_response(r)
        w.write(f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert (await http1.read_response(r)).status == 200
        await origin.closed(0)  # while the tunnel runs
        w.close()


# -- every failure gets a protocol answer --------------------------------------------------------
@pytest.mark.parametrize("fail,status,reply", [
    (DialError("refused", "refused"), 502, 0x05),
    (TimeoutError(), 504, 0x06),
    (KtError("cannot reach the Kubernetes API server"), 502, 0x01),
    (ConnectionResetError("tunnel gone"), 502, 0x01),
    (RuntimeError("a bug"), 502, 0x01),
])
async def test_dial_failures_get_a_protocol_answer(caplog, unretrieved, fail, status, reply):
    caplog.set_level(logging.INFO, logger="ktproxy.proxy")
    p = await start_proxy(Dialer(fail))
    try:
        async with asyncio.timeout(10):
            r, w = await p.connect()
            w.write(get(1234))
            resp, _ = await read_response(r)
            assert resp.status == status
            w.close()
            r, w = await p.connect()
            w.write(b"CONNECT 127.0.0.1:1234 HTTP/1.1\r\n\r\n")
            assert (await read_response(r))[0].status == status
            w.close()
            r, w, code = await socks5_open(p, 1234)
            assert code == reply
            w.close()
            r, w = await p.connect()
            w.write(b"\x04\x01\x04\xd2\x7f\x00\x00\x01\x00")
            assert await r.readexactly(8) == b"\x00\x5b" + b"\x00" * 6
            w.close()
    finally:
        await p.server.close()
    failures = [rec for rec in caplog.records if rec.name == "ktproxy.proxy" and rec.levelno >= logging.INFO]
    assert failures
    # A traceback only for what is nobody's expected failure: a bug.
    assert all((rec.exc_info is not None) == isinstance(fail, RuntimeError) for rec in failures), failures


# -- S3: the PAC file ----------------------------------------------------------------------------
async def fetch_pac(p: Proxy, host: str) -> http1.Response:
    r, w = await p.connect()
    w.write(f"GET /proxy.pac HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    resp, _ = await read_response(r)
    w.close()
    return resp


async def test_pac_host_header_guards_against_dns_rebinding(unretrieved):
    p = await start_proxy(pac=lambda: "function FindProxyForURL(u, h) { return 'DIRECT'; }")
    try:
        port = p.server.bound_port
        assert (await fetch_pac(p, f"127.0.0.1:{port}")).status == 200
        assert (await fetch_pac(p, f"localhost:{port}")).status == 200
        assert (await fetch_pac(p, f"attacker.example:{port}")).status == 403
    finally:
        await p.server.close()


async def test_socks5_credentials_checked(unretrieved):
    p = await start_proxy(credentials=("alice", "s3cret"))
    try:
        for user, password, status in ((b"alice", b"s3cret", 0), (b"alice", b"s3cre", 1), (b"bob", b"s3cret", 1)):
            r, w = await p.connect()
            w.write(b"\x05\x01\x02\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
            assert await r.readexactly(4) == bytes([5, 2, 1, status])
            w.close()
    finally:
        await p.server.close()

