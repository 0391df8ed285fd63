"""Loopback pieces for the router's HTTP/2 tests: h2c upstreams that say who answered, a small h2c
client, and a listener that hands connections to H2Downstream the way the router's protocol does
(read the client preface, then construct and feed it).

Upstreams all listen on one port number, each on its own loopback address (127.0.0.2, .3, ...), because
the route table maps a listening port to one upstream port and routes differ by host.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import random
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import h2.events as ev
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import StreamClosedError
from h2.settings import SettingCodes
from hyperframe.frame import GoAwayFrame

from shadow_image.router.h2_route import H2Downstream
from shadow_image.router.h2_upstream import H2Pool
from shadow_image.router.table import RouteTable, Upstream

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HANG = 60.0  # seconds after which a wait counts as a hang (never reached by a working router)


async def until(pred: Callable[[], object], what: str, tries: int = 2000) -> None:
    """Wait for pred() to hold (a bounded wait, so a broken router fails the test instead of hanging it)."""
    for _ in range(tries):  # 10 ms apart
        if pred():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def wait_reply(fut: asyncio.Future[Reply]) -> Reply:
    """The reply, or a failure instead of a hung test when a broken router never gives one."""
    async with asyncio.timeout(HANG):
        return await fut


def pattern(n: int, seed: int = 7) -> bytes:
    """n reproducible bytes that no bug reorders unnoticed."""
    return random.Random(seed).randbytes(n)


def common_port(hosts: Sequence[str]) -> int:
    """A TCP port free on every one of `hosts`."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = s.getsockname()[1]
        ok = True
        for host in hosts:
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    ok = False
                    break
        if ok:
            return port
    raise RuntimeError("no port free on all of " + ", ".join(hosts))


class LoopbackTable(RouteTable):
    """The real table, with route upstreams on loopback addresses instead of Service names (labels
    unchanged, so 502 bodies read as in the cluster)."""

    def __init__(self, listen_port: int, upstream_port: int, default_host: str, hosts: dict[str, str]) -> None:
        super().__init__("svc", {listen_port: upstream_port}, default_host=default_host)
        self.hosts = hosts

    def for_route(self, key: str, value: str, listen_port: int) -> Upstream:
        up = super().for_route(key, value, listen_port)
        return dataclasses.replace(up, host=self.hosts[value])


class _Peer(asyncio.Protocol):
    """An h2 connection on a transport, with a wait for flow-control credit."""

    def __init__(self, client_side: bool) -> None:
        self.conn = H2Connection(H2Configuration(client_side=client_side, header_encoding=None))
        self.transport: asyncio.Transport | None = None
        self._credit = asyncio.Event()
        self.closed = asyncio.get_running_loop().create_future()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def credit(self) -> None:
        self._credit.set()

    def send_goaway(self, last_stream_id: int, error_code: int = 0) -> None:
        """A GOAWAY written past h2, whose connection would refuse every frame after sending one."""
        frame = GoAwayFrame(0)
        frame.last_stream_id = last_stream_id
        frame.error_code = error_code
        self.flush()
        assert self.transport is not None
        self.transport.write(frame.serialize())

    async def send_body(self, sid: int, data: bytes, *, end: bool = True,
                        trailers: list[tuple[bytes, bytes]] | None = None,
                        progress: list[int] | None = None) -> None:
        try:
            await self._send_body(sid, data, end, trailers, progress)
        except StreamClosedError:  # the peer reset the stream: stop sending
            pass
        self.flush()

    async def _send_body(self, sid: int, data: bytes, end: bool, trailers: list[tuple[bytes, bytes]] | None,
                         progress: list[int] | None) -> None:
        off = 0
        while off < len(data):
            window = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            if window <= 0:
                self._credit.clear()
                await self._credit.wait()
                continue
            self.conn.send_data(sid, data[off:off + window])
            off += window
            if progress is not None:
                progress[0] = off
            self.flush()
            await asyncio.sleep(0)
        if trailers:
            self.conn.send_headers(sid, trailers, end_stream=True)
        elif end:
            self.conn.end_stream(sid)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        self._credit.set()


@dataclass
class Seen:
    headers: dict[bytes, bytes]
    body: bytearray = field(default_factory=bytearray)
    trailers: dict[bytes, bytes] = field(default_factory=dict)
    reset: int | None = None


class _UpstreamProto(_Peer):
    def __init__(self, server: H2Upstream) -> None:
        super().__init__(client_side=False)
        self.server = server
        self.streams: dict[int, Seen] = {}
        self.answered: set[int] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.accepted += 1
        self.server.protos.append(self)
        self.conn.initiate_connection()
        self.flush()

    def data_received(self, data: bytes) -> None:
        for e in self.conn.receive_data(data):
            if isinstance(e, ev.RequestReceived):
                seen = self.streams[e.stream_id] = Seen(dict(e.headers))
                self.server.seen.append(seen)
                if seen.headers[b":path"].startswith(b"/drop-once") and not self.server.dropped:
                    # As a kept-alive connection closed by its server just as a request was sent on it.
                    self.server.dropped = True
                    assert self.transport is not None
                    self.transport.abort()
                    return
                if seen.headers[b":path"].startswith(b"/rst"):
                    self.conn.reset_stream(e.stream_id, ErrorCodes.ENHANCE_YOUR_CALM)
                    self.answered.add(e.stream_id)
                elif seen.headers[b":path"].startswith(b"/early"):
                    # Answer before the request body ends, then refuse the rest of it.
                    self._spawn(self._answer(e.stream_id, seen, early=True))
                    self.answered.add(e.stream_id)
            elif isinstance(e, ev.DataReceived):
                self.conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                if e.stream_id in self.streams:
                    self.streams[e.stream_id].body += e.data
            elif isinstance(e, ev.TrailersReceived):
                self.streams[e.stream_id].trailers = dict(e.headers)
            elif isinstance(e, ev.StreamEnded) and e.stream_id not in self.answered:
                self.answered.add(e.stream_id)
                self._spawn(self._answer(e.stream_id, self.streams[e.stream_id]))
            elif isinstance(e, ev.StreamReset):
                if e.stream_id in self.streams:
                    self.streams[e.stream_id].reset = e.error_code
                    self.server.resets.append(e.error_code)
            elif isinstance(e, ev.WindowUpdated | ev.RemoteSettingsChanged):
                self.credit()
        self.flush()

    def _spawn(self, coro: object) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _answer(self, sid: int, seen: Seen, *, early: bool = False) -> None:
        path = seen.headers[b":path"].decode()
        name = self.server.name.encode()
        if path.startswith("/big"):
            n = int(path.split("=", 1)[1])
            self.conn.send_headers(sid, [(b":status", b"200"), (b"x-route", name),
                                         (b"content-length", str(n).encode())])
            self.flush()
            await self.send_body(sid, pattern(n), progress=self.server.progress)
            return
        if path.startswith("/goaway"):
            # Graceful shutdown: this stream is still served, nothing after it.
            self.send_goaway(sid)
            await asyncio.sleep(0.05)
        info = {
            "route": self.server.name,
            "path": path,
            "authority": seen.headers.get(b":authority", b"").decode(),
            "xff": seen.headers.get(b"x-forwarded-for", b"").decode(),
            "version": seen.headers.get(b"version", b"").decode(),
            "body_len": len(seen.body),
            "body_sha": hashlib.sha256(seen.body).hexdigest(),
            "trailers": {k.decode(): v.decode() for k, v in seen.trailers.items()},
        }
        body = json.dumps(info).encode()
        self.conn.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/json"),
                                     (b"x-route", name)])
        if path.startswith("/trailers"):
            await self.send_body(sid, body, trailers=[(b"grpc-status", b"0"), (b"grpc-message", b"ok")])
        else:
            await self.send_body(sid, body)
        if early:
            self.conn.reset_stream(sid, ErrorCodes.NO_ERROR)
            self.flush()
        if path.startswith("/goaway") and self.transport is not None:
            self.transport.close()


class H2Upstream:
    """An h2c server that answers with JSON naming itself and what it saw, or as the path asks:
    /big?n=N (N bytes of pattern()), /rst (RST_STREAM ENHANCE_YOUR_CALM), /trailers (grpc-style
    trailers), /early (answers before the request ends, then RST NO_ERROR), /goaway (GOAWAY then answer),
    /drop-once (the first such request finds its connection closed under it)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.accepted = 0
        self.protos: list[_UpstreamProto] = []
        self.seen: list[Seen] = []
        self.resets: list[int] = []
        self.progress = [0]
        self.dropped = False  # bytes of the last /big body handed to the connection
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> H2Upstream:
        self.server = await asyncio.get_running_loop().create_server(lambda: _UpstreamProto(self), host, port)
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for proto in self.protos:
                if proto.transport is not None:
                    proto.transport.close()
            await self.server.wait_closed()


@dataclass
class Reply:
    status: int = 0
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    trailers: dict[bytes, bytes] = field(default_factory=dict)
    reset: int | None = None

    def json(self) -> dict[str, object]:
        return json.loads(self.body)


class H2Client(_Peer):
    """A small h2c client: many concurrent request() calls share its one connection. `read` False
    stops acknowledging response data (a client that does not read)."""

    def __init__(self, *, window: int | None = None) -> None:
        super().__init__(client_side=True)
        self.replies: dict[int, tuple[Reply, asyncio.Future[Reply]]] = {}
        self.read = True
        self.unacked: list[tuple[int, int]] = []
        self._window = window

    @classmethod
    async def connect(cls, host: str, port: int, *, window: int | None = None) -> H2Client:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(lambda: cls(window=window), host, port)
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.conn.initiate_connection()
        if self._window is not None:
            self.conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: self._window})
        self.flush()

    def data_received(self, data: bytes) -> None:
        for e in self.conn.receive_data(data):
            entry = self.replies.get(getattr(e, "stream_id", 0))
            if isinstance(e, ev.ResponseReceived) and entry:
                entry[0].headers = dict(e.headers)
                entry[0].status = int(entry[0].headers[b":status"])
            elif isinstance(e, ev.DataReceived):
                if self.read:
                    self.conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                else:
                    self.unacked.append((e.flow_controlled_length, e.stream_id))
                if entry:
                    entry[0].body += e.data
            elif isinstance(e, ev.TrailersReceived) and entry:
                entry[0].trailers = dict(e.headers)
            elif isinstance(e, ev.StreamEnded) and entry and not entry[1].done():
                entry[1].set_result(entry[0])
            elif isinstance(e, ev.StreamReset) and entry and not entry[1].done():
                entry[0].reset = e.error_code
                entry[1].set_result(entry[0])
            elif isinstance(e, ev.WindowUpdated | ev.RemoteSettingsChanged):
                self.credit()
        self.flush()

    def resume_reading(self) -> None:
        self.read = True
        for n, sid in self.unacked:
            self.conn.acknowledge_received_data(n, sid)
        self.unacked.clear()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        for reply, fut in self.replies.values():
            if not fut.done():
                reply.reset = -1
                fut.set_result(reply)

    def start(self, path: str = "/", *, method: str = "GET", headers: Sequence[tuple[str, str]] = (),
              authority: str = "svc.test:80") -> tuple[int, asyncio.Future[Reply]]:
        sid = self.conn.get_next_available_stream_id()
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self.replies[sid] = (Reply(), fut)
        hdrs = [(b":method", method.encode()), (b":scheme", b"http"), (b":authority", authority.encode()),
                (b":path", path.encode())] + [(k.encode(), v.encode()) for k, v in headers]
        self.conn.send_headers(sid, hdrs, end_stream=method == "GET")
        self.flush()
        return sid, fut

    async def request(self, path: str = "/", *, method: str = "GET", headers: Sequence[tuple[str, str]] = (),
                      body: bytes = b"", trailers: list[tuple[bytes, bytes]] | None = None,
                      authority: str = "svc.test:80") -> Reply:
        sid, fut = self.start(path, method=method, headers=headers, authority=authority)
        if method != "GET":
            await self.send_body(sid, body, trailers=trailers)
        return await wait_reply(fut)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _Handover(asyncio.Protocol):
    """What the router's protocol does with HTTP/2: wait for the preface, then hand over."""

    def __init__(self, table: RouteTable, listen_port: int, pool: H2Pool | None) -> None:
        self.table, self.listen_port, self.pool = table, listen_port, pool
        self.buf = b""
        self.h2: H2Downstream | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.h2 is not None:
            self.h2.data_received(data)
            return
        self.buf += data
        if len(self.buf) < len(PREFACE):
            return
        assert self.buf.startswith(PREFACE), self.buf[:24]
        assert self.transport is not None
        peer = self.transport.get_extra_info("peername")[0]
        if self.pool is None:
            self.h2 = H2Downstream(self.transport, self.table, self.listen_port, peer)
        else:
            self.h2 = H2Downstream(self.transport, self.table, self.listen_port, peer, pool=self.pool)
        data, self.buf = self.buf, b""
        self.h2.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.h2 is not None:
            self.h2.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.h2 is not None:
            self.h2.pause_writing()

    def resume_writing(self) -> None:
        if self.h2 is not None:
            self.h2.resume_writing()


@contextlib.asynccontextmanager
async def router(table: RouteTable, host: str, port: int, pool: H2Pool | None = None) -> AsyncIterator[None]:
    """H2Downstream behind a listener on host:port, handed over per the router contract."""
    conns: list[_Handover] = []

    def accept() -> _Handover:
        conns.append(_Handover(table, port, pool))
        return conns[-1]

    server = await asyncio.get_running_loop().create_server(accept, host, port)
    try:
        yield
    finally:
        server.close()
        for conn in conns:
            if conn.transport is not None:
                conn.transport.close()
        await server.wait_closed()
