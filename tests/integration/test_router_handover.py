"""The hand-over contract between the router's connection handling and its HTTP/2 layer, checked in-process
with a stand-in for h2_route.H2Downstream: constructed as H2Downstream(transport, table, listen_port, peer)
once the client preface is complete (even when it arrives in pieces), then given every byte from the
preface on, the transport's pause/resume and connection_lost. Without the layer, HTTP/2 connections are
closed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from test_router_support import free_port

from shadow_image.router import sniff
from shadow_image.router.options import parse_args
from shadow_image.router.server import Router

EVENTS: list[tuple[str, Any]] = []


class FakeH2:
    def __init__(self, transport: asyncio.Transport, table: object, listen_port: int, peer: str) -> None:
        EVENTS.append(("init", (listen_port, peer, type(table).__name__)))
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        EVENTS.append(("data", data))
        if data.endswith(b"answer"):
            self.transport.write(b"h2 says hi")
        if data.endswith(b"flood"):
            self.transport.write(b"f" * (16 << 20))

    def pause_writing(self) -> None:
        EVENTS.append(("pause", None))

    def resume_writing(self) -> None:
        EVENTS.append(("resume", None))

    def connection_lost(self, exc: Exception | None) -> None:
        EVENTS.append(("lost", exc))


@pytest.fixture
async def router(tmp_path: Path) -> AsyncIterator[Router]:
    (tmp_path / "ann").write_text('kt-mesh-routes="version:abcde"\n')
    port = free_port()
    r = Router(parse_args(["--service", "tomcat", "--port", f"{port}:9", "--health-port", str(free_port()),
                           "--annotations", str(tmp_path / "ann"), "--default-host", "127.0.0.1"]))
    await r.start()
    EVENTS.clear()
    yield r
    await r.close(drain=0.5)


def _port(router: Router) -> int:
    return next(iter(router.opts.ports))


async def test_preface_in_pieces_is_handed_over_with_every_byte(router, monkeypatch):
    monkeypatch.setattr(router.ctx, "h2_layer", FakeH2)
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(router))
    for piece in (sniff.H2_PREFACE[:3], sniff.H2_PREFACE[3:20], sniff.H2_PREFACE[20:] + b"\x00\x00"):
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.05)
    writer.write(b"more answer")
    assert await asyncio.wait_for(reader.readexactly(10), 5) == b"h2 says hi"
    writer.close()
    await writer.wait_closed()
    for _ in range(100):
        if EVENTS and EVENTS[-1][0] == "lost":
            break
        await asyncio.sleep(0.02)
    kinds = [k for k, _ in EVENTS]
    assert kinds == ["init", "data", "data", "lost"]
    assert EVENTS[0][1] == (_port(router), "127.0.0.1", "RouteTable")
    assert EVENTS[1][1] == sniff.H2_PREFACE + b"\x00\x00" and EVENTS[2][1] == b"more answer"


async def test_without_the_http2_layer_an_http2_connection_is_closed(router, monkeypatch):
    monkeypatch.setattr(router.ctx, "h2_layer", None)
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(router))
    writer.write(sniff.H2_PREFACE)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_the_routers_health_answers(router):
    reader, writer = await asyncio.open_connection("127.0.0.1", router.opts.health_port)
    writer.write(b"GET /routes HTTP/1.1\r\nHost: x\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 5)
    assert data.endswith(b'{"routes": [["version", "abcde"]]}\n')
    assert router.ready() == (True, "routing 1 route(s)")


async def test_the_transports_back_pressure_reaches_the_http2_layer(router, monkeypatch):
    monkeypatch.setattr(router.ctx, "h2_layer", FakeH2)
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(router))
    writer.write(sniff.H2_PREFACE + b"flood")
    for _ in range(100):
        if ("pause", None) in EVENTS:
            break
        await asyncio.sleep(0.02)
    assert ("pause", None) in EVENTS and ("resume", None) not in EVENTS
    await asyncio.wait_for(reader.readexactly(16 << 20), 10)
    for _ in range(100):
        if ("resume", None) in EVENTS:
            break
        await asyncio.sleep(0.02)
    assert [k for k, _ in EVENTS if k in ("pause", "resume")] == ["pause", "resume"]
    writer.close()
