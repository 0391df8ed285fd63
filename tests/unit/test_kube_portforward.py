"""PortForwardTransport against a real local WebSocket peer speaking the kubelet's v4.channel.k8s.io framing.

The peer is not a Kubernetes mock: it is a small kubelet stand-in (port prefix on both channels, data on
channel 0, error text on channel 1, close when the target connection ends) bridging to real TCP servers
on 127.0.0.1, so the adapter is exercised end to end on loopback.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from urllib.parse import parse_qs, urlparse

import asyncssh
import pytest
from kubernetes.client import Configuration
from websockets.asyncio.server import serve
from websockets.datastructures import Headers
from websockets.http11 import Response

from ktproxy.cluster.client import KubeClient, KubeError
from ktproxy.cluster.portforward import (
    SUBPROTOCOL,
    PortForwardError,
    PortForwardTunnel,
    auth_headers,
    open_stream,
    portforward_url,
)


@pytest.fixture(autouse=True)
def _websocket_protocol(monkeypatch):
    """The stand-in kubelet below speaks v4.channel.k8s.io only (SPDY: test_kube_portforward_spdy.py)."""
    monkeypatch.setenv("KTPROXY_PORTFORWARD_PROTOCOL", "websocket")


class FakeKubelet:
    """Loopback WebSocket server with the kubelet's port-forward behaviour."""

    def __init__(self) -> None:
        self.server = None
        self.port = 0
        self.auth_seen: list[str | None] = []
        self.frames_from_client: list[bytes] = []
        self.empty_messages = 0

    async def __aenter__(self) -> FakeKubelet:
        self.server = await serve(
            self.handler,
            "127.0.0.1",
            0,
            subprotocols=[SUBPROTOCOL],
            process_request=self.process_request,
            compression=None,
            max_size=None,
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        try:  # a handler stuck on a non-reading target must not hang the test run
            await asyncio.wait_for(self.server.wait_closed(), 5)
        except TimeoutError:
            pass

    def process_request(self, connection, request):
        self.auth_seen.append(request.headers.get("Authorization"))
        pod = request.path.split("/pods/")[1].split("/")[0]
        if pod == "forbidden":
            body = json.dumps(
                {
                    "kind": "Status",
                    "status": "Failure",
                    "reason": "Forbidden",
                    "code": 403,
                    "message": 'pods "forbidden" is forbidden: User "dev" cannot create resource '
                    '"pods/portforward" in API group "" in the namespace "team"',
                }
            )
            return Response(403, "Forbidden", Headers({"Content-Type": "application/json"}), body.encode())
        if pod == "missing":
            body = json.dumps({"kind": "Status", "code": 404, "message": 'pods "missing" not found'})
            return Response(404, "Not Found", Headers({"Content-Type": "application/json"}), body.encode())
        return None

    async def handler(self, ws) -> None:
        url = urlparse(ws.request.path)
        pod = url.path.split("/pods/")[1].split("/")[0]
        port = int(parse_qs(url.query)["ports"][0])
        prefix = port.to_bytes(2, "little")
        if pod == "split-prefix":  # the prefix may arrive in pieces; the client must still strip 2 bytes
            await ws.send(b"\x00" + prefix[:1])
            await ws.send(b"\x00" + prefix[1:])
        else:
            await ws.send(b"\x00" + prefix)
        await ws.send(b"\x01" + prefix)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await ws.send(
                b"\x01" + f"error forwarding port {port} to pod {pod}: connection refused".encode()
            )
            await ws.close()
            return

        async def to_target():
            async for msg in ws:
                if not msg:
                    self.empty_messages += 1
                    continue
                assert msg[0] == 0
                writer.write(msg[1:])
                await writer.drain()

        async def from_target():
            while data := await reader.read(32768):
                await ws.send(b"\x00" + data)

        t1 = asyncio.create_task(to_target())
        t2 = asyncio.create_task(from_target())
        await asyncio.wait({t1, t2}, return_when=asyncio.FIRST_COMPLETED)
        t1.cancel()
        t2.cancel()
        writer.close()
        await ws.close()

    def kube(self, token: str | None = None) -> KubeClient:
        cfg = Configuration(host=f"http://127.0.0.1:{self.port}")
        cfg.proxy = None
        if token:
            cfg.api_key = {"BearerToken": token}
            cfg.api_key_prefix = {"BearerToken": "Bearer"}
        return KubeClient(cfg, "team")


async def _tcp_server(handler):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _echo(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


def test_url_building():
    assert (
        portforward_url("https://10.96.0.1:6443", "a b", "p", 2222)
        == "wss://10.96.0.1:6443/api/v1/namespaces/a%20b/pods/p/portforward?ports=2222"
    )
    assert portforward_url("http://127.0.0.1:8001/", "ns", "p", 80).startswith("ws://127.0.0.1:8001/api/v1/")


def test_auth_headers_use_refresh_hook():
    cfg = Configuration(host="https://127.0.0.1:6443")
    calls = []

    def refresh(c):
        calls.append(1)
        c.api_key["BearerToken"] = f"tok{len(calls)}"

    cfg.api_key = {"BearerToken": "stale"}
    cfg.api_key_prefix = {"BearerToken": "Bearer"}
    cfg.refresh_api_key_hook = refresh
    assert auth_headers(cfg) == {"authorization": "Bearer tok1"}
    assert auth_headers(cfg) == {"authorization": "Bearer tok2"}


async def test_echo_10mb_integrity_and_prefix_split():
    server, port = await _tcp_server(_echo)
    async with FakeKubelet() as kubelet:
        for pod in ("shadow", "split-prefix"):
            reader, writer = await open_stream(kubelet.kube(token="s3cret"), "team", pod, port)
            payload = os.urandom(10 * 1024 * 1024)

            async def send(writer=writer, payload=payload):
                for i in range(0, len(payload), 100_000):
                    writer.write(payload[i : i + 100_000])
                    await writer.drain()

            sender = asyncio.create_task(send())
            got = await reader.readexactly(len(payload))
            await sender
            assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
            writer.close()
            await writer.wait_closed()
        assert kubelet.auth_seen == ["Bearer s3cret"] * 2
    server.close()


async def test_error_channel_becomes_exception():
    async with FakeKubelet() as kubelet:
        # nothing listens on port 1: the stand-in kubelet reports it on channel 1 and closes
        reader, writer = await open_stream(kubelet.kube(), "team", "shadow", 1)
        with pytest.raises(PortForwardError, match="connection refused"):
            await reader.read(100)
        writer.close()


async def test_handshake_errors_are_one_line():
    async with FakeKubelet() as kubelet:
        with pytest.raises(KubeError) as ei:
            await open_stream(kubelet.kube(), "team", "forbidden", 2222)
        assert str(ei.value) == "no permission to create pods/portforward in namespace team"
        with pytest.raises(KubeError, match=r'cannot port-forward to pod team/missing port 2222: pods "missing"'):
            await open_stream(kubelet.kube(), "team", "missing", 2222)


async def test_unreachable_api_server_fails_fast():
    cfg = Configuration(host="http://127.0.0.1:1")
    cfg.proxy = None
    t0 = time.monotonic()
    with pytest.raises(KubeError, match=r"cannot reach the Kubernetes API server at http://127\.0\.0\.1:1"):
        await open_stream(KubeClient(cfg, "x"), "x", "p", 1)
    assert time.monotonic() - t0 < 5


async def test_slow_reader_bounds_memory():
    """Reading paused by the protocol must stop reading the WebSocket, so the source stalls."""
    sent = 0
    total = 400 * 1024 * 1024
    chunk = os.urandom(1024 * 1024)

    async def source(reader, writer):
        nonlocal sent
        try:
            while sent < total:
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    server, port = await _tcp_server(source)
    async with FakeKubelet() as kubelet:
        reader, writer = await open_stream(kubelet.kube(), "team", "shadow", port, limit=64 * 1024)
        await asyncio.sleep(1.5)  # do not read at all
        transport = writer.transport
        assert not transport.is_reading()
        assert len(reader._buffer) <= 2 * 64 * 1024 + 256 * 1024
        stalled_at = sent
        assert stalled_at < 100 * 1024 * 1024, stalled_at
        await asyncio.sleep(0.5)
        assert sent - stalled_at <= 2 * 1024 * 1024  # still stalled
        # now drain some and see it flow again
        got = 0
        while got < 30 * 1024 * 1024:
            got += len(await reader.read(1 << 20))
        assert sent > stalled_at
        writer.close()
    server.close()


async def test_slow_writer_pauses_protocol():
    """The protocol is told pause_writing when the far end does not read, and resume when it does."""
    release = asyncio.Event()

    async def sink(reader, writer):
        await release.wait()
        while await reader.read(1 << 20):
            pass
        writer.close()

    server, port = await _tcp_server(sink)
    events: list[str] = []
    lost: list[BaseException | None] = []

    class Proto(asyncio.Protocol):
        def pause_writing(self):
            events.append("pause")

        def resume_writing(self):
            events.append("resume")

        def connection_lost(self, exc):
            lost.append(exc)

    async with FakeKubelet() as kubelet:
        tunnel = PortForwardTunnel(kubelet.kube(), "team", "shadow", port)
        transport, _ = await tunnel.create_connection(Proto)
        block = b"x" * (1024 * 1024)
        written = 0
        # A well-behaved producer writes until paused, then waits for resume. With a sink that
        # never reads, the pipeline fills up and the pause must become permanent.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            while events[-1:] != ["pause"]:
                transport.write(block)
                written += len(block)
            await asyncio.sleep(0.3)
            if events[-1:] == ["pause"]:
                break
        assert events[-1:] == ["pause"]
        assert written < 100 * 1024 * 1024, written
        assert transport.get_write_buffer_size() < 2 * 1024 * 1024
        release.set()
        for _ in range(500):
            if events[-1] == "resume":
                break
            await asyncio.sleep(0.02)
        assert events[-1] == "resume"
        transport.close()
        transport.close()
        for _ in range(200):
            if lost:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        assert lost == [None]  # exactly once
        assert not transport.can_write_eof()
    server.close()


async def test_keepalive_sends_empty_messages():
    server, port = await _tcp_server(_echo)
    async with FakeKubelet() as kubelet:
        tunnel = PortForwardTunnel(kubelet.kube(), "team", "shadow", port, keepalive=0.2)
        lost: list = []

        class Proto(asyncio.Protocol):
            def connection_lost(self, exc):
                lost.append(exc)

        transport, _ = await tunnel.create_connection(Proto)
        await asyncio.sleep(0.9)
        assert kubelet.empty_messages >= 2
        assert not lost  # pongs answered: still alive
        transport.abort()
        await asyncio.sleep(0.1)
        assert len(lost) == 1
    server.close()


async def test_asyncssh_over_tunnel(tmp_path):
    """asyncssh.connect(tunnel=PortForwardTunnel(...)) and a direct-tcpip stream through it."""
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    echo_server, echo_port = await _tcp_server(_echo)

    class Server(asyncssh.SSHServer):
        def connection_requested(self, dest_host, dest_port, orig_host, orig_port):
            return True

    authorized = asyncssh.import_authorized_keys(client_key.export_public_key().decode())
    ssh_server = await asyncssh.create_server(
        Server, "127.0.0.1", 0, server_host_keys=[host_key], authorized_client_keys=authorized
    )
    ssh_port = ssh_server.sockets[0].getsockname()[1]
    async with FakeKubelet() as kubelet:
        tunnel = PortForwardTunnel(kubelet.kube(), "team", "shadow", ssh_port)
        known = asyncssh.import_known_hosts(f"shadow {host_key.export_public_key().decode()}")
        async with asyncssh.connect(
            "shadow", tunnel=tunnel, username="kt", client_keys=[client_key], known_hosts=known
        ) as conn:
            reader, writer = await conn.open_connection("127.0.0.1", echo_port)
            payload = os.urandom(2 * 1024 * 1024)
            writer.write(payload)
            got = await reader.readexactly(len(payload))
            assert got == payload
            writer.close()
    ssh_server.close()
    echo_server.close()


async def test_under_uvloop_too():
    """connect runs on uvloop: the transport (and TCP_NODELAY on uvloop's socket wrapper) must work there."""
    uvloop = pytest.importorskip("uvloop")

    async def body():
        server, port = await _tcp_server(_echo)
        async with FakeKubelet() as kubelet:
            reader, writer = await open_stream(kubelet.kube(), "team", "shadow", port)
            sock = writer.transport.get_extra_info("websocket").transport.get_extra_info("socket")
            import socket as _s

            assert sock.getsockopt(_s.IPPROTO_TCP, _s.TCP_NODELAY)
            payload = os.urandom(3 * 1024 * 1024)
            writer.write(payload)
            assert await reader.readexactly(len(payload)) == payload
            writer.close()
        server.close()

    await asyncio.to_thread(uvloop.run, body())
