"""The router's HTTP/1 callbacks without sockets: a ClientConnection and a pooled UpstreamConnection on fake
transports, responses fed in as an upstream would send them. What one message collects (reason, fields,
trailers) must never leak into the next one on the same kept-alive upstream connection, whichever path the
message ended by (interim answer, chunked with trailers, HEAD answer, plain)."""

from __future__ import annotations

import asyncio

import pytest

from shadow_image.router.downstream import ClientConnection, Context
from shadow_image.router.table import RouteTable
from shadow_image.router.upstream import Pool, UpstreamConnection


class FakeTransport:
    def __init__(self) -> None:
        self.data = bytearray()
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.data += data

    def writelines(self, data) -> None:
        self.writes += 1
        self.data += b"".join(data)

    def get_extra_info(self, name: str, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def is_closing(self) -> bool:
        return False

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None:
        raise AssertionError("the upstream connection was aborted")

    def take(self) -> bytes:
        out, self.data = bytes(self.data), bytearray()
        return out


@pytest.fixture
def wired():
    loop = asyncio.new_event_loop()
    table = RouteTable("svc", {8080: 80}, default_host="127.0.0.2", route_host="127.0.0.3")
    pool = Pool(loop)
    up = UpstreamConnection(pool, ("127.0.0.2", 80))
    up_t = FakeTransport()
    up.connection_made(up_t)
    pool.put(up)
    client = ClientConnection(Context(table, pool, loop), 8080)
    client_t = FakeTransport()
    client.connection_made(client_t)
    yield client, client_t, up, up_t
    client.connection_lost(None)
    pool.close()
    loop.close()


def exchange(wired, request: bytes, *response: bytes) -> bytes:
    client, client_t, up, up_t = wired
    client.data_received(request)
    assert up_t.take().startswith(request.split(b"\r\n", 1)[0])
    for part in response:
        up.data_received(part)
    assert up.owner is None  # answered, released to the pool
    return client_t.take()


GET = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"


@pytest.mark.parametrize("split", [False, True])
def test_nothing_of_one_response_leaks_into_the_next_on_the_same_upstream_connection(wired, split):
    first = (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
             b"HTTP/1.1 200 Fine\r\nX-One: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"3\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n")
    parts = [first[:30], first[30:75], first[75:]] if split else [first]
    out = exchange(wired, GET, *parts)
    assert out == (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                   b"HTTP/1.1 200 Fine\r\nX-One: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"3\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n")
    out = exchange(wired, GET, b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno")
    assert out == b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno"
    out = exchange(wired, GET, b"HTTP/1.1 200 \r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert out == b"HTTP/1.1 200 \r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"


def test_a_head_answer_then_a_get_on_the_same_upstream_connection(wired):
    out = exchange(wired, b"HEAD /h HTTP/1.1\r\nHost: a\r\n\r\n",
                   b"HTTP/1.1 200 Head\r\nX-Head: 1\r\nContent-Length: 9\r\n\r\n")
    assert out == b"HTTP/1.1 200 Head\r\nX-Head: 1\r\nContent-Length: 9\r\n\r\n"
    out = exchange(wired, GET, b"HTTP/1.1 201 Made\r\nContent-Length: 1\r\n\r\nz")
    assert out == b"HTTP/1.1 201 Made\r\nContent-Length: 1\r\n\r\nz"


def test_the_pool_keeps_at_most_pool_max_idle_connections_per_upstream(monkeypatch):
    from shadow_image.router import upstream as upstream_mod

    monkeypatch.setattr(upstream_mod, "POOL_MAX", 2)
    loop = asyncio.new_event_loop()
    pool = Pool(loop)
    closed = []
    conns = []
    for i in range(3):
        conn = UpstreamConnection(pool, ("127.0.0.2", 80))
        conn.connection_made(FakeTransport())
        conn.close = lambda i=i: closed.append(i)
        conns.append(conn)
        pool.put(conn)
    other = UpstreamConnection(pool, ("127.0.0.3", 80))
    other.connection_made(FakeTransport())
    pool.put(other)
    assert closed == [2]
    up = RouteTable("svc", {8080: 80}, default_host="127.0.0.2").default(8080)
    assert [pool.take(up), pool.take(up), pool.take(up)] == [conns[1], conns[0], None]
    pool.close()
    loop.close()
