"""The SPDY/3.1 port-forward transport against a loopback stand-in for the API server + kubelet."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import struct
import zlib

import pytest
from kubernetes.client import Configuration

from ktproxy.cluster.client import KubeClient, KubeError
from ktproxy.cluster.portforward import (
    SPDY_DICTIONARY,
    PortForwardError,
    PortForwardTunnel,
    SpdyPortForwardTransport,
    open_stream,
)


def _block(inflate, data: bytes) -> dict[str, str]:
    raw = inflate.decompress(data)
    (n,), pos, out = struct.unpack_from(">I", raw), 4, {}
    for _ in range(n):
        (ln,) = struct.unpack_from(">I", raw, pos)
        name = raw[pos + 4:pos + 4 + ln].decode()
        pos += 4 + ln
        (lv,) = struct.unpack_from(">I", raw, pos)
        out[name] = raw[pos + 4:pos + 4 + lv].decode()
        pos += 4 + lv
    return out


class FakeSpdyKubelet:
    """Answers the upgrade, records SYN_STREAM headers and data frames, relays stream 3 to a TCP port."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.syn: list[tuple[int, int, dict[str, str]]] = []
        self.data_frames: list[tuple[int, int, int]] = []  # (stream, flags, length)

    async def __aenter__(self) -> FakeSpdyKubelet:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    def kube(self) -> KubeClient:
        cfg = Configuration(host=f"http://127.0.0.1:{self.port}")
        cfg.proxy = None
        cfg.api_key = {"BearerToken": "s3cret"}
        cfg.api_key_prefix = {"BearerToken": "Bearer"}
        return KubeClient(cfg, "team")

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        self.requests.append(head)
        if "/pods/forbidden/" in head:
            body = json.dumps({"kind": "Status", "code": 403, "reason": "Forbidden",
                               "message": 'pods "forbidden" is forbidden: User "dev" cannot create resource '
                               '"pods/portforward" in API group "" in the namespace "team"'}).encode()
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            writer.close()
            return
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
                     b"X-Stream-Protocol-Version: portforward.k8s.io\r\n\r\n")
        if "/pods/drop/" in head:  # upgraded, then gone at once
            await writer.drain()
            writer.close()
            return
        inflate = zlib.decompressobj(zdict=SPDY_DICTIONARY)
        deflate = zlib.compressobj(zdict=SPDY_DICTIONARY)
        target_w = None
        pump = None
        try:
            while True:
                hdr = await reader.readexactly(8)
                word, fl = struct.unpack(">II", hdr)
                body = await reader.readexactly(fl & 0xFFFFFF)
                if word & 0x80000000:
                    ftype = word & 0xFFFF
                    if ftype == 1:  # SYN_STREAM
                        (sid,) = struct.unpack_from(">I", body)
                        headers = _block(inflate, body[10:])
                        self.syn.append((sid, fl >> 24, headers))
                        reply = deflate.compress(struct.pack(">I", 0)) + deflate.flush(zlib.Z_SYNC_FLUSH)
                        rb = struct.pack(">I", sid) + reply
                        writer.write(struct.pack(">II", 0x80030002, len(rb)) + rb)
                        if headers["streamtype"] == "data":
                            port = int(headers["port"])
                            try:
                                tr, target_w = await asyncio.open_connection("127.0.0.1", port)
                            except OSError:
                                msg = f"error forwarding port {port}: connection refused".encode()
                                writer.write(struct.pack(">II", 1, (1 << 24) | len(msg)) + msg)
                                await writer.drain()
                                writer.close()
                                return
                            pump = asyncio.create_task(self.pump(tr, writer))
                    elif ftype == 6:  # PING: echo
                        writer.write(hdr + body)
                else:
                    self.data_frames.append((word, fl >> 24, len(body)))
                    if word == 3 and target_w is not None and body:
                        target_w.write(body)
                        await target_w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            if pump is not None:
                pump.cancel()
            if target_w is not None:
                target_w.close()
            writer.close()

    async def pump(self, tr: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await tr.read(32768):
            writer.write(struct.pack(">II", 3, len(data)) + data)
            await writer.drain()
        writer.write(struct.pack(">II", 3, 1 << 24))  # FIN


async def _echo(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


@pytest.fixture(autouse=True)
def _spdy(monkeypatch):
    monkeypatch.setenv("KTPROXY_PORTFORWARD_PROTOCOL", "spdy")


async def test_upgrade_request_and_streams():
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with FakeSpdyKubelet() as kubelet:
        reader, writer = await open_stream(kubelet.kube(), "team", "shadow", port)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        writer.close()
    server.close()
    head = kubelet.requests[0]
    assert head.startswith(f"POST /api/v1/namespaces/team/pods/shadow/portforward?ports={port} HTTP/1.1\r\n")
    lines = [h.lower() for h in head.split("\r\n")]
    for line in ("Upgrade: SPDY/3.1", "X-Stream-Protocol-Version: portforward.k8s.io", "Authorization: Bearer s3cret"):
        assert line.lower() in lines
    assert [(sid, flags, h["streamtype"], h["port"], h["requestid"]) for sid, flags, h in kubelet.syn] == [
        (1, 1, "error", str(port), "0"),  # error stream: FIN at once (we never write on it)
        (3, 0, "data", str(port), "0"),
    ]


async def test_echo_10mb_integrity():
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    payload = os.urandom(10 * 1024 * 1024)
    async with FakeSpdyKubelet() as kubelet:
        reader, writer = await open_stream(kubelet.kube(), "team", "shadow", port, keepalive=0.2)

        async def send():
            for i in range(0, len(payload), 100_000):
                writer.write(payload[i:i + 100_000])
                await writer.drain()
        sender = asyncio.create_task(send())
        got = await reader.readexactly(len(payload))
        await sender
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        writer.close()
    server.close()


async def test_one_big_write_is_few_big_frames():
    """1 MiB written in one call leaves as 8 data frames of 128 KiB, not one per small piece."""
    got = asyncio.Event()
    total = 0

    async def sink(reader, writer):
        nonlocal total
        while data := await reader.read(65536):
            total += len(data)
            if total >= 2**20:
                got.set()
        writer.close()
    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with FakeSpdyKubelet() as kubelet:
        _, writer = await open_stream(kubelet.kube(), "team", "shadow", port)
        writer.write(b"x" * 2**20)
        await asyncio.wait_for(got.wait(), 10)
        assert [f for f in kubelet.data_frames if f[0] == 3] == [(3, 0, 128 * 1024)] * 8
        writer.close()
    server.close()


async def test_error_stream_becomes_exception():
    async with FakeSpdyKubelet() as kubelet:
        reader, writer = await open_stream(kubelet.kube(), "team", "shadow", 1)
        with pytest.raises(PortForwardError, match="connection refused"):
            await reader.read(100)
        writer.close()


async def test_forbidden_is_one_line_and_no_websocket_retry():
    async with FakeSpdyKubelet() as kubelet:
        with pytest.raises(KubeError) as ei:
            await open_stream(kubelet.kube(), "team", "forbidden", 2222)
        assert str(ei.value) == "no permission to create pods/portforward in namespace team"
        assert len(kubelet.requests) == 1


def test_tunnel_protocol_choice(monkeypatch):
    cfg = Configuration(host="http://127.0.0.1:1")
    kube = KubeClient(cfg, "team")
    monkeypatch.delenv("KTPROXY_PORTFORWARD_PROTOCOL", raising=False)
    assert PortForwardTunnel(kube, "team", "p", 1).protocol == "websocket"  # opt-in until e2e ran over SPDY
    monkeypatch.setenv("KTPROXY_PORTFORWARD_PROTOCOL", "spdy")
    assert PortForwardTunnel(kube, "team", "p", 1).protocol == "spdy"


async def test_connection_lost_right_after_upgrade_reaches_the_protocol():
    async with FakeSpdyKubelet() as kubelet:
        try:
            reader, writer = await open_stream(kubelet.kube(), "team", "drop", 2222)
        except (KubeError, ConnectionError):
            return  # lost before the upgrade finished: also fine, as long as nothing hangs
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(reader.read(100), 5)
        writer.close()


async def test_loss_before_start_is_told_to_the_protocol_once():
    """The TLS connection may drop after the upgrade but before the app protocol is attached."""
    seen = []

    class Proto(asyncio.Protocol):
        def connection_lost(self, exc):
            seen.append(exc)
    tr = SpdyPortForwardTransport(label="t", keepalive=None)
    tr.connection_lost(None)  # the TLS transport's callback, protocol not yet set
    tr.set_protocol(Proto())
    tr._start()
    tr.connection_lost(None)
    assert len(seen) == 1 and isinstance(seen[0], ConnectionResetError)
