"""Connections to upstreams (the stuntman Service, a developer's mesh Service): kept alive and pooled per
(host, port), parsed with llhttp, reporting each response to the client connection that owns them.

An UpstreamConnection has one owner at a time and reports to it through the methods of UpstreamOwner
(up_head, up_body, up_done, up_lost, up_upgraded, ...); in splice mode (WebSocket after 101, non-HTTP
bytes) it copies bytes to its peer and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any, Protocol

import httptools

from shadow_image.router import http1
from shadow_image.router.table import Upstream

log = logging.getLogger("router")

CONNECT_TIMEOUT = 5.0
POOL_IDLE = 30.0  # an idle pooled connection is closed after this (upstreams drop theirs too)
POOL_MAX = 256  # idle connections kept per upstream


class _SkipBody(Exception):
    """Raised from on_headers_complete for a HEAD answer: llhttp cannot be told the body is absent."""


class UpstreamOwner(Protocol):
    """What an UpstreamConnection reports to: the client connection whose request it serves
    (downstream.ClientConnection). Declared on this side so that the dependency runs one way only:
    downstream knows upstream, upstream knows just this."""

    def up_interim(self, conn: UpstreamConnection, status: int, reason: bytes,
                   headers: list[tuple[bytes, bytes]]) -> None: ...

    def up_head(self, conn: UpstreamConnection, status: int, reason: bytes,
                headers: list[tuple[bytes, bytes]]) -> int:
        """The response's head; returns how its body is framed for the client (an http1.RESP_* mode)."""
        ...

    def up_body(self, data: bytes) -> None: ...

    def up_done(self, conn: UpstreamConnection, keep_alive: bool, trailers: bytes) -> None: ...

    def up_lost(self, conn: UpstreamConnection, reason: str) -> None: ...

    def up_upgraded(self, conn: UpstreamConnection, rest: bytes) -> None: ...

    def flush(self) -> None:
        """The end of one round of reports (a read, an EOF, a close): write what they produced."""
        ...

    def upstream_full(self, full: bool) -> None: ...

    def splice_upstream_eof(self) -> bool | None:
        """In splice mode: the upstream half-closed; the return value is eof_received's."""
        ...

    def splice_lost(self) -> None: ...


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return f"name does not resolve ({exc.strerror or exc})"
    if isinstance(exc, TimeoutError):
        return f"no connection within {CONNECT_TIMEOUT:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


class UpstreamConnection(asyncio.Protocol):
    def __init__(self, pool: Pool, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.owner: UpstreamOwner | None = None
        self.closed = False
        self.reused = False  # has served a request before the current one
        self.got_bytes = False  # any response byte for the current request
        self.idle_since = 0.0
        self.last_rx = 0.0
        self.read_paused = False  # by the owner, because the client cannot take more
        self.write_paused = False
        self.splice_peer: Any = None  # a transport, in splice mode
        self.eof = False
        self._parser = httptools.HttpResponseParser(self)
        self._head_request = False
        self._status = 0
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._trailers: list[tuple[bytes, bytes]] = []
        self._in_body = False
        self._interim = False
        self._close_delimited = False
        self._parser_version = "1.1"
        # Bytes the parser took that were no body (a head, chunk lines, trailers) since the last head, chunk
        # or message end: llhttp keeps a field whole in memory until it ends, so this is capped.
        self._framing = 0
        self._body_seen = 0  # body bytes in the current read
        self._framed = False  # a head, chunk or message ended in the current read: its bytes are not counted
        self._heads = 0  # heads ended in the current read (for a HEAD answer: where the last one ends)
        self._tail = b""  # the previous read's last bytes, for a head end split between reads

    # --- owner's side -------------------------------------------------------------------------------
    def begin(self, owner: UpstreamOwner, head_request: bool) -> None:
        """Serve one request of `owner`."""
        self.owner = owner
        self._head_request = head_request
        self.got_bytes = False
        self._in_body = False
        self._close_delimited = False
        self._framing = 0
        self._tail = b""
        self.last_rx = self.pool.loop.time()

    def release(self, reusable: bool) -> None:
        """The owner is done with this connection: back to the pool or closed."""
        self.owner = None
        if self.read_paused:
            self.read_paused = False
            if not self.closed:
                self.transport.resume_reading()
        if reusable and not self.closed and not self.eof and not self.write_paused:
            self.reused = True
            self.pool.put(self)
        else:
            self.close()

    def pause(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            if not self.closed:
                self.transport.pause_reading()

    def resume(self) -> None:
        if self.read_paused:
            self.read_paused = False
            if not self.closed:
                self.transport.resume_reading()

    def start_splice(self, peer_transport: Any) -> None:
        """From now on every byte goes to peer_transport, and EOF is passed on as EOF."""
        self.splice_peer = peer_transport

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    # --- asyncio.Protocol ----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        peer = self.splice_peer
        if peer is not None:
            self.last_rx = self.pool.loop.time()
            peer.write(data)
            return
        owner = self.owner
        if owner is None:  # bytes nobody asked for: this connection's framing is lost
            self.abort()
            return
        self.got_bytes = True
        self.last_rx = self.pool.loop.time()
        self._body_seen = 0
        self._framed = False
        self._heads = 0
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            owner.up_upgraded(self, data[exc.args[0]:])
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _SkipBody):
                # Anything after a HEAD answer's head is not ours to forward, and the connection is reused
                # only if there was nothing: a fresh parser starts clean.
                self._parser = httptools.HttpResponseParser(self)
                reusable = self._nothing_after_heads(data) and http1.keep_alive(self._parser_version, self._headers)
                self._reason, self._headers, self._in_body = b"", [], False
                owner.up_done(self, reusable, b"")
            elif isinstance(cause, http1.UnexpectedSwitch):
                owner.up_lost(self, "answered 101 to a request that asked for no protocol switch")
            else:
                log.error("upstream callback failed", exc_info=cause)
                owner.up_lost(self, "sent a response the router cannot handle")
        except httptools.HttpParserError as exc:
            owner.up_lost(self, f"sent an invalid response ({exc})")
        else:
            # Counted per read, from the last head, chunk or message end on: at most one read over the limit.
            if not self._framed:
                self._framing += len(data) - self._body_seen
            if self._framing > http1.MAX_HEAD and self.owner is owner:
                owner.up_lost(self, f"sent a response head or trailer section over {http1.MAX_HEAD // 1024} KiB")
            elif self._head_request:
                self._tail = data[-3:]
        owner.flush()

    def _nothing_after_heads(self, data: bytes) -> bool:
        """Whether the read that ended a HEAD answer's head ends with it: llhttp does not say where it
        stopped, so the heads that ended in this read (interim ones, then the answer) are found by their
        blank lines (llhttp requires CRLF), the first possibly begun in the previous read."""
        buf = self._tail + data
        end = 0
        for _ in range(self._heads):
            end = buf.find(b"\r\n\r\n", end)
            if end < 0:
                return False
            end += 4
        return end == len(buf) and end > len(self._tail)

    def eof_received(self) -> bool | None:
        self.eof = True
        if self.splice_peer is not None:
            owner = self.owner
            return owner.splice_upstream_eof() if owner is not None else None
        owner = self.owner
        if owner is not None and self._close_delimited:
            self._close_delimited = False
            owner.up_done(self, False, b"")
            owner.flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.discard(self)
        peer = self.splice_peer
        if peer is not None:
            self.splice_peer = None
            owner = self.owner
            if owner is not None:
                owner.splice_lost()
            return
        owner = self.owner
        if owner is not None:
            if self._close_delimited:
                self._close_delimited = False
                owner.up_done(self, False, b"")
            else:
                owner.up_lost(self, describe_error(exc) if exc else "closed the connection")
            owner.flush()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.owner is not None:
            self.owner.upstream_full(True)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.owner is not None:
            self.owner.upstream_full(False)

    # --- llhttp callbacks ---------------------------------------------------------------------------
    # No on_message_begin (one Python call less per response): the state a message collects (_reason,
    # _headers, _trailers, _in_body) starts empty and is emptied again where each message ends
    # (on_message_complete; a HEAD answer's head, where the parser is replaced).

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_body:
            self._trailers.append((name, value))
        else:
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_body = True
        self._framing = 0
        self._framed = True
        self._heads += 1
        status = self._parser.get_status_code()
        self._interim = 100 <= status < 200 and status != 101
        owner = self.owner
        if self._interim:
            owner.up_interim(self, status, self._reason, self._headers)
            return
        mode = owner.up_head(self, status, self._reason, self._headers)
        self._close_delimited = mode == http1.RESP_EOF
        if self._head_request and status != 101:
            self._parser_version = self._parser.get_http_version()  # only the HEAD path needs it
            raise _SkipBody

    def on_body(self, data: bytes) -> None:
        self._body_seen += len(data)
        self.owner.up_body(data)

    def on_chunk_complete(self) -> None:
        self._framing = 0
        self._framed = True

    def on_message_complete(self) -> None:
        self._framing = 0
        self._framed = True
        self._reason = b""
        self._headers = []
        self._in_body = False
        if self._interim:
            self._interim = False
            return
        if self._parser.should_upgrade():
            return  # a 101: HttpParserUpgrade follows with the bytes after the head
        self._close_delimited = False
        trailers = b""
        if self._trailers:
            trailers = http1.format_trailers(self._trailers)
            self._trailers = []
        self.owner.up_done(self, self._parser.should_keep_alive(), trailers)


class Pool:
    """Idle keep-alive connections per (host, port), and new ones on demand."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._idle: dict[tuple[str, int], list[UpstreamConnection]] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    def take(self, upstream: Upstream) -> UpstreamConnection | None:
        conns = self._idle.get((upstream.host, upstream.port))
        while conns:
            conn = conns.pop()
            if not conn.closed and not conn.eof:
                return conn
        return None

    def put(self, conn: UpstreamConnection) -> None:
        conns = self._idle.get(conn.key)
        if conns is None:  # not setdefault: that would build a list for every put
            conns = self._idle[conn.key] = []
        elif len(conns) >= POOL_MAX:
            conn.close()
            return
        conn.idle_since = self.loop.time()
        conns.append(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(POOL_IDLE / 2, self._sweep)

    def discard(self, conn: UpstreamConnection) -> None:
        conns = self._idle.get(conn.key)
        if conns and conn in conns:
            conns.remove(conn)

    def _sweep(self) -> None:
        self._sweeper = None
        cutoff = self.loop.time() - POOL_IDLE
        for conns in self._idle.values():
            for conn in [c for c in conns if c.idle_since < cutoff]:
                conns.remove(conn)
                conn.close()
        if any(self._idle.values()):
            self._sweeper = self.loop.call_later(POOL_IDLE / 2, self._sweep)

    async def connect(self, upstream: Upstream) -> UpstreamConnection:
        """A new connection (never pooled yet); OSError or TimeoutError when it cannot be made."""
        key = (upstream.host, upstream.port)
        async with asyncio.timeout(CONNECT_TIMEOUT):
            _, conn = await self.loop.create_connection(lambda: UpstreamConnection(self, key),
                                                        upstream.host, upstream.port)
        sock = conn.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
