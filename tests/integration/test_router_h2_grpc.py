"""A real gRPC client and servers (grpcio, generic handlers on raw bytes: no generated code) through the
router's HTTP/2 layer on loopback: metadata `version: abcde` picks the developer's upstream, trailers
carry the status, an unreachable route is UNAVAILABLE. Skipped where grpcio is not installed."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from h2_support import LoopbackTable, common_port, router

grpc = pytest.importorskip("grpc")
grpc_aio = pytest.importorskip("grpc.aio")

ROUTER, STUNTMAN, ABCDE, DEAD = "127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.9"
SAY = "/demo.Echo/Say"
FAIL = "/demo.Echo/Fail"
CHUNKS = "/demo.Echo/Chunks"


def service(name: str) -> object:
    async def say(request: bytes, context: object) -> bytes:
        meta = dict(context.invocation_metadata())  # type: ignore[attr-defined]
        return f"{name} got {request.decode()} version={meta.get('version', '')}".encode()

    async def fail(request: bytes, context: object) -> bytes:
        await context.abort(grpc.StatusCode.NOT_FOUND, f"{name} has no {request.decode()}")  # type: ignore[attr-defined]
        return b""

    async def chunks(request: bytes, context: object) -> AsyncIterator[bytes]:
        for i in range(int(request)):
            yield f"{name}:{i}:".encode() + b"z" * 100000

    return grpc.method_handlers_generic_handler("demo.Echo", {
        "Say": grpc.unary_unary_rpc_method_handler(say),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "Chunks": grpc.unary_stream_rpc_method_handler(chunks),
    })


@pytest.fixture
async def channel() -> AsyncIterator[object]:
    port = common_port([ROUTER, STUNTMAN, ABCDE, DEAD])
    table = LoopbackTable(port, port, STUNTMAN, {"abcde": ABCDE, "deadd": DEAD})
    table.set_routes([("version", "abcde"), ("version", "deadd")])
    servers = []
    for name, host in (("stuntman", STUNTMAN), ("abcde", ABCDE)):
        server = grpc_aio.server()
        server.add_generic_rpc_handlers((service(name),))
        server.add_insecure_port(f"{host}:{port}")
        await server.start()
        servers.append(server)
    async with router(table, ROUTER, port):
        async with grpc_aio.insecure_channel(f"{ROUTER}:{port}") as chan:
            yield chan
    for server in servers:
        await server.stop(None)


async def test_unary_call_routed_by_metadata(channel: object) -> None:
    say = channel.unary_unary(SAY)  # type: ignore[attr-defined]
    assert await say(b"hi", metadata=(("version", "abcde"),), timeout=20) == b"abcde got hi version=abcde"
    assert await say(b"hi", timeout=20) == b"stuntman got hi version="
    assert await say(b"hi", metadata=(("version", "other"),), timeout=20) == b"stuntman got hi version=other"


async def test_status_in_trailers_reaches_the_client(channel: object) -> None:
    fail = channel.unary_unary(FAIL)  # type: ignore[attr-defined]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fail(b"cake", metadata=(("version", "abcde"),), timeout=20)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "abcde has no cake"


async def test_server_streaming_through_the_route(channel: object) -> None:
    chunks = channel.unary_stream(CHUNKS)  # type: ignore[attr-defined]
    got = [m async for m in chunks(b"50", metadata=(("version", "abcde"),), timeout=30)]
    assert [m.split(b":")[:2] for m in got] == [[b"abcde", str(i).encode()] for i in range(50)]


async def test_unreachable_route_is_unavailable_the_rest_works(channel: object) -> None:
    say = channel.unary_unary(SAY)  # type: ignore[attr-defined]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await say(b"hi", metadata=(("version", "deadd"),), timeout=20)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "502" in (err.value.details() or "")
    assert await say(b"hi", timeout=20) == b"stuntman got hi version="
