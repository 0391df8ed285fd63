"""One accepted client connection: sniffed, then served as HTTP/1 (each request routed on its own),
handed to the HTTP/2 layer (an H2Layer, which server.py wires in), or spliced raw to the original pods.

HTTP/1 requests are handled strictly in order, one upstream exchange at a time per client connection:
pipelined requests wait (reading paused) until the ones before them are answered. Everything is callbacks
on asyncio protocols; a task exists only while a new upstream connection is being made.

Writes are batched: whatever one data_received produces for a transport goes out in one writelines at
its end (flush()), which also means a request whose bytes turn out malformed within the same read never
reaches an upstream at all.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import httptools

from shadow_image.router import http1, sniff
from shadow_image.router.table import RepeatedRouteHeader, RouteTable, Upstream
from shadow_image.router.upstream import Pool, UpstreamConnection, describe_error

log = logging.getLogger("router")

CLIENT_IDLE = 75.0  # a client connection with no request in progress (or a request stalled) is closed
UPSTREAM_IDLE = 300.0  # waiting for an upstream's next byte of a response
SPLICE_IDLE = 3600.0  # WebSocket and raw connections with no byte either way

# Why reading from the client is paused (a bit each; reading resumes when none is left).
_P_PIPELINE, _P_UPSTREAM, _P_CONNECT, _P_HOLD = 1, 2, 4, 8

SNIFF, H1, H2, RAW_WAIT, SPLICE, CLOSED, LINGER = range(7)
# Closing a socket with unread bytes makes the kernel send RST, which can destroy the answer (a 400, an
# early final response) before the client reads it; so the router half-closes and reads on for a while.
LINGER_TIME = 2.0
LINGER_BYTES = 1 << 20


class H2Handler(Protocol):
    """An HTTP/2 client connection as the HTTP/2 layer (h2_route.H2Downstream) takes it over: it is given
    every byte from the client preface on and the transport's events. When it also has eof_received
    (answered as asyncio.Protocol's) or close_if_idle (asked at a router stop), those are used too."""

    def data_received(self, data: bytes) -> None: ...

    def connection_lost(self, exc: Exception | None) -> None: ...

    def pause_writing(self) -> None: ...

    def resume_writing(self) -> None: ...


# Called as h2_layer(transport, table, listen_port, peer) once the client preface is complete. Passed in
# (Context.h2_layer) rather than imported, so that this module and the HTTP/2 layer know nothing of each other.
H2Layer = Callable[[asyncio.Transport, RouteTable, int, str], H2Handler]


class Context:
    """What all connections of one router share. Without an h2_layer, HTTP/2 connections are closed."""

    def __init__(self, table: RouteTable, pool: Pool, loop: asyncio.AbstractEventLoop, *,
                 client_idle: float = CLIENT_IDLE, upstream_idle: float = UPSTREAM_IDLE,
                 splice_idle: float = SPLICE_IDLE, h2_layer: H2Layer | None = None) -> None:
        self.table = table
        self.pool = pool
        self.loop = loop
        self.h2_layer = h2_layer
        self.client_idle = client_idle
        self.upstream_idle = upstream_idle
        self.splice_idle = splice_idle
        self.connections: set[ClientConnection] = set()  # for a graceful stop
        self.host = table.service.encode()  # Host for an HTTP/1.0 request that had none


class Exchange:
    """One request and its response."""

    __slots__ = ("close_after", "conn", "dead", "framing", "head", "http11", "is_head", "keep_alive",
                 "method", "pending", "request_done", "resp_mode", "resp_started", "retried", "sent_any",
                 "trailers", "upgrade", "upstream")

    def __init__(self, method: bytes, head: bytes, framing: int, upgrade: bool, upstream: Upstream,
                 keep_alive: bool, http11: bool) -> None:
        self.method = method
        self.head = head
        self.framing = framing
        self.upgrade = upgrade
        self.upstream = upstream
        self.keep_alive = keep_alive
        self.http11 = http11
        self.is_head = method == b"HEAD"
        self.pending: list[bytes] = [head]  # bytes for the upstream not yet written
        self.trailers: list[tuple[bytes, bytes]] = []
        self.conn: UpstreamConnection | None = None
        self.request_done = False
        self.sent_any = False
        self.resp_mode = http1.RESP_NONE
        self.resp_started = False
        self.close_after = False
        self.retried = False
        self.dead = False  # dropped: a connect still under way must not attach to it


class ClientConnection(asyncio.Protocol):
    def __init__(self, ctx: Context, listen_port: int) -> None:
        self.ctx = ctx
        self.listen_port = listen_port
        self.transport: Any = None
        self.peer: Any = None
        self.client = b"unknown"
        self.mode = SNIFF
        self._sniffed = b""
        self._timer: asyncio.TimerHandle | None = None
        self._last_rx = 0.0
        self._parser: httptools.HttpRequestParser | None = None
        self._queue: deque[Exchange] = deque()
        self._cur: Exchange | None = None  # the request being parsed, from its head's end to its end
        self._last: Exchange | None = None
        self._out: list[bytes] = []  # bytes for the client not yet written
        self._close_after_flush = False
        self._paused = 0
        self._write_paused = False
        self._bad: str | None = None
        self._bad_status = 400
        self._eof = False
        self._closed = False
        self._holding = False  # client bytes go to _hold (after an upgrade request, before the answer)
        self._hold: list[bytes] = []
        self._in_head = False
        self._head_size = 0
        # Bytes the parser took after a request's head that were no body (chunk lines, trailers), since the
        # last chunk's end: llhttp keeps a trailer field whole in memory until it ends, so it is capped too.
        self._framing = 0
        self._body_seen = 0  # body bytes in the current read
        self._framed = False  # a head or chunk ended in the current read: its bytes are not counted
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._peer: UpstreamConnection | None = None  # the other side in splice mode
        self._h2: H2Handler | None = None
        self._lingered = 0

    # --- asyncio.Protocol ----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.peer = transport.get_extra_info("peername")
        self.client = http1.client_address(self.peer)
        self.ctx.connections.add(self)
        loop = self.ctx.loop
        self._last_rx = loop.time()
        self._timer = loop.call_later(sniff.WAIT, self._sniff_timeout)

    def data_received(self, data: bytes) -> None:
        mode = self.mode
        if mode == H1:
            self._last_rx = self.ctx.loop.time()
            if self._holding:
                self._hold.append(data)
            else:
                self._h1(data)
                self.flush()
        elif mode == SPLICE:
            self._last_rx = self.ctx.loop.time()
            self._peer.transport.write(data)
        elif mode == H2:
            self._h2.data_received(data)
        elif mode == SNIFF:
            self._sniff(data)
        elif mode == RAW_WAIT:
            self._hold.append(data)
        elif mode == LINGER:
            self._lingered += len(data)
            if self._lingered > LINGER_BYTES:
                self.transport.close()

    def eof_received(self) -> bool | None:
        mode = self.mode
        if mode == H2:
            handler = getattr(self._h2, "eof_received", None)
            return handler() if handler is not None else None
        if mode == LINGER:
            return None
        self._eof = True
        if mode == SPLICE:
            peer = self._peer
            if not peer.closed and peer.transport.can_write_eof():
                peer.transport.write_eof()
            if peer.eof:
                peer.close()
                return None
            return True
        if mode == RAW_WAIT:
            return True
        if mode == SNIFF:
            if not self._sniffed:
                return None
            self._cancel_timer()
            self._start_raw(self._sniffed)
            return True
        if mode == H1 and (self._in_head or self._cur is not None):
            return None  # a request cut short: nothing more can be answered
        if self._queue:
            return True  # answer what was asked, then close (_finished)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.ctx.connections.discard(self)
        mode, self.mode = self.mode, CLOSED
        self._cancel_timer()
        if mode == H2:
            self._h2.connection_lost(exc)
            return
        if mode == SPLICE:
            self._peer.close()
            return
        for ex in self._queue:
            ex.dead = True
            if ex.conn is not None:
                ex.conn.owner = None
                ex.conn.abort()
        self._queue.clear()
        self._parser = None

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.mode == H2:
            self._h2.pause_writing()
        elif self.mode == SPLICE:
            self._peer.pause()
        elif self._queue and self._queue[0].conn is not None:
            self._queue[0].conn.pause()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.mode == H2:
            self._h2.resume_writing()
        elif self.mode == SPLICE:
            self._peer.resume()
        elif self._queue and self._queue[0].conn is not None:
            self._queue[0].conn.resume()

    def close_if_idle(self) -> bool:
        """At a stop: close now unless a request is under way (HTTP/1 between requests, or still sniffing);
        True when closed."""
        if self._closed:
            return True
        if self.mode == H2:  # the HTTP/2 layer decides (a GOAWAY first) if it knows how
            handler = getattr(self._h2, "close_if_idle", None)
            return bool(handler()) if handler is not None else False
        if (self.mode == H1 and not self._queue and not self._in_head and self._cur is None) or self.mode == SNIFF:
            self.transport.close()
            return True
        return False

    # --- reading control -----------------------------------------------------------------------------
    def _pause(self, reason: int) -> None:
        if not self._paused and not self._closed:
            self.transport.pause_reading()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        if self._paused & reason:
            self._paused &= ~reason
            if not self._paused and not self._closed:
                self.transport.resume_reading()

    def upstream_full(self, full: bool) -> None:
        """The upstream connection in use cannot take more (or can again)."""
        if full:
            self._pause(_P_UPSTREAM)
        else:
            self._resume(_P_UPSTREAM)

    # --- timers --------------------------------------------------------------------------------------
    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, delay: float) -> None:
        self._cancel_timer()
        self._timer = self.ctx.loop.call_later(delay, self._tick)

    def _tick(self) -> None:
        """One timer per connection, re-armed for whatever is idle now: cheaper than a timer per read."""
        self._timer = None
        if self._closed:
            return
        ctx = self.ctx
        now = ctx.loop.time()
        ex = self._queue[0] if self._queue else None
        waiting_upstream = False
        if self.mode == SPLICE:
            limit, last = ctx.splice_idle, max(self._last_rx, self._peer.last_rx)
        elif ex is not None and ex.request_done and ex.conn is not None:
            limit, last, waiting_upstream = ctx.upstream_idle, ex.conn.last_rx, True
        else:
            limit, last = ctx.client_idle, self._last_rx
        wait = last + limit - now
        if wait > 0:
            # Never later than upstream_idle: a request that ends before the next tick starts that wait.
            self._arm(min(wait, ctx.client_idle, ctx.upstream_idle))
            return
        if waiting_upstream and not ex.resp_started:
            conn, ex.conn = ex.conn, None
            conn.owner = None
            conn.abort()
            self._fail(ex, 504, f"ktproxy mesh: {ex.upstream.label} did not answer within {limit:g} s")
            self.flush()
            return
        self.transport.close()

    # --- sniffing ------------------------------------------------------------------------------------
    def _sniff(self, data: bytes) -> None:
        buf = self._sniffed + data if self._sniffed else data
        kind = sniff.classify(buf)
        if kind is None:
            self._sniffed = buf
            return
        self._sniffed = b""
        self._cancel_timer()
        if kind == sniff.H1:
            self.mode = H1
            self._parser = httptools.HttpRequestParser(self)
            self._arm(min(self.ctx.client_idle, self.ctx.upstream_idle))
            self._h1(buf)
            self.flush()
        elif kind == sniff.H2:
            self._start_h2(buf)
        elif kind == sniff.RAW:
            self._start_raw(buf)
        else:
            self._refuse_request_line(kind)

    def _refuse_request_line(self, kind: str) -> None:
        """An HTTP-shaped request line llhttp cannot parse: answered here (not passed raw to the original
        pods, which would bypass routing), then the connection lingers closed."""
        self.mode = H1
        if kind == sniff.NOT_IMPLEMENTED:
            status, text = 501, "ktproxy mesh: the request method is not one the router can route"
        else:
            status, text = 400, "ktproxy mesh: bad request: malformed request line"
        log.info("%d to %s: %s", status, self.client.decode(), text)
        self._out.append(http1.error_response(status, text, close=True))
        self._close_after_flush = True
        self.flush()

    def _sniff_timeout(self) -> None:
        self._timer = None
        if self.mode == SNIFF:
            buf, self._sniffed = self._sniffed, b""
            self._start_raw(buf)

    def _start_h2(self, buf: bytes) -> None:
        h2_layer = self.ctx.h2_layer
        if h2_layer is None:
            log.warning("HTTP/2 connection from %s closed: the router has no HTTP/2 layer", self.client.decode())
            self.mode = CLOSED
            self.transport.close()
            return
        self.mode = H2
        self._h2 = h2_layer(self.transport, self.ctx.table, self.listen_port, self.client.decode())
        if self._write_paused:
            self._h2.pause_writing()
        self._h2.data_received(buf)

    # --- raw bytes and spliced connections -----------------------------------------------------------
    def _start_raw(self, buf: bytes) -> None:
        self.mode = RAW_WAIT
        if buf:
            self._hold.append(buf)
        self._pause(_P_CONNECT)
        self.ctx.loop.create_task(self._raw_connect(self.ctx.table.default(self.listen_port)))

    async def _raw_connect(self, upstream: Upstream) -> None:
        try:
            conn = await self.ctx.pool.connect(upstream)
        except Exception as exc:
            log.info("non-HTTP connection from %s dropped: %s is unreachable: %s", self.client.decode(),
                     upstream.label, describe_error(exc))
            if not self._closed:
                self.transport.close()
            return
        if self._closed:
            conn.close()
            return
        self._splice(conn)
        self._resume(_P_CONNECT)

    def _splice(self, conn: UpstreamConnection) -> None:
        self.mode = SPLICE
        self._peer = conn
        conn.owner = self
        conn.start_splice(self.transport)
        if self._write_paused:
            conn.pause()
        held, self._hold = self._hold, []
        if held:
            conn.transport.writelines(held)
        if self._eof and conn.transport.can_write_eof():
            conn.transport.write_eof()
        self._holding = False
        self._resume(_P_HOLD)
        self._arm(min(self.ctx.splice_idle, self.ctx.client_idle))

    def splice_upstream_eof(self) -> bool | None:
        """The upstream half-closed a spliced connection: pass it on; close when both sides are done."""
        if not self.transport.is_closing() and self.transport.can_write_eof():
            self.transport.write_eof()
        if self._eof:
            self.transport.close()
            return None
        return True

    def splice_lost(self) -> None:
        if not self._closed:
            self.transport.close()

    # --- HTTP/1: requests ----------------------------------------------------------------------------
    def _h1(self, data: bytes) -> None:
        was_in_head = self._in_head
        self._body_seen = 0
        self._framed = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            rest = data[exc.args[0]:]
            ex = self._last
            if ex is not None and ex.upgrade and not ex.dead:
                # Bytes after a protocol switch request belong to the new protocol: held until the answer.
                self._holding = True
                self._pause(_P_HOLD)
                if rest:
                    self._hold.append(rest)
            elif rest:
                self._h1(rest)  # an h2c upgrade attempt served as plain HTTP/1.1: go on parsing
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, http1.BadRequest):
                self._reject(str(cause), cause.status)
            else:
                log.error("request callback failed", exc_info=cause)
                self._reject("the router could not handle it")
        except httptools.HttpParserError as exc:
            self._reject(str(exc) or type(exc).__name__)
        else:
            if self._in_head:
                if was_in_head:
                    self._head_size += len(data)
                if self._head_size > http1.MAX_HEAD:
                    self._reject("request head too large")
            elif self._cur is not None:
                # Counted per read, from the last head or chunk end on: at most one read over the limit.
                if not self._framed:
                    self._framing += len(data) - self._body_seen
                if self._framing > http1.MAX_HEAD:
                    self._reject("request trailer section too large")

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_size = 0
        self._url = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:
            headers = self._headers
            headers.append((name, value))
            self._head_size += len(name) + len(value) + 4
            if self._head_size > http1.MAX_HEAD or len(headers) > http1.MAX_HEADERS:
                raise http1.BadRequest("request head too large")
        else:
            trailers = self._cur.trailers
            trailers.append((name, value))
            if len(trailers) > http1.MAX_HEADERS:
                raise http1.BadRequest("too many trailer fields")

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        method = parser.get_method()
        if method == b"CONNECT":
            raise http1.BadRequest("CONNECT is not routed")
        if self._head_size > http1.MAX_HEAD:
            raise http1.BadRequest("request head too large")
        version = parser.get_http_version()
        headers = self._headers
        head, framing, upgrade = http1.prepare_request(method, self._url, version, headers, self.client,
                                                       parser.should_upgrade(), self.ctx.host)
        try:
            upstream = self.ctx.table.pick(self.listen_port, headers)
        except RepeatedRouteHeader as exc:
            raise http1.BadRequest(str(exc)) from None
        ex = Exchange(method, head, framing, upgrade, upstream, parser.should_keep_alive(), version == "1.1")
        self._cur = self._last = ex
        self._framing = 0
        self._framed = True
        queue = self._queue
        queue.append(ex)
        if len(queue) == 1:
            self._activate(ex)
        else:
            self._pause(_P_PIPELINE)

    def on_body(self, data: bytes) -> None:
        self._body_seen += len(data)
        ex = self._cur
        if ex.framing == http1.CHUNKED:
            ex.pending += (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            ex.pending.append(data)

    def on_chunk_complete(self) -> None:
        self._framing = 0
        self._framed = True

    def on_message_complete(self) -> None:
        ex, self._cur = self._cur, None
        if ex.framing == http1.CHUNKED:
            ex.pending.append(http1.format_trailers(ex.trailers))
        ex.request_done = True

    def _reject(self, reason: str, status: int = 400) -> None:
        """400 (or 501) for a request that cannot be forwarded safely; nothing of it reaches an upstream
        that has not already got its valid beginning, and that upstream connection is cut."""
        log.info("%d to %s: %s", status, self.client.decode(), reason)
        self._bad = reason
        self._bad_status = status
        self._parser = None
        self._holding = True
        self._hold = []
        self._pause(_P_HOLD)
        self._in_head = False
        ex, self._cur = self._cur, None
        if ex is not None and ex in self._queue:
            ex.dead = True
            conn, ex.conn = ex.conn, None
            active = self._queue[0] is ex
            if conn is not None:
                if ex.sent_any:
                    conn.owner = None
                    conn.abort()
                else:
                    conn.release(True)
            if active and ex.resp_started:
                self._close_after_flush = True
                return
            self._queue.remove(ex)
            if active:
                self._resume(_P_CONNECT | _P_UPSTREAM)
        if not self._queue:
            self._send_bad()

    def _send_bad(self) -> None:
        if self._bad_status == 501:
            text = f"ktproxy mesh: not implemented: {self._bad}"
        else:
            text = f"ktproxy mesh: bad request: {self._bad}"
        self._out.append(http1.error_response(self._bad_status, text, close=True))
        self._close_after_flush = True

    # --- HTTP/1: upstream exchange -------------------------------------------------------------------
    def _activate(self, ex: Exchange) -> None:
        conn = self.ctx.pool.take(ex.upstream)
        if conn is None:
            self._pause(_P_CONNECT)
            self.ctx.loop.create_task(self._connect(ex))
            return
        # _attach, inlined: this runs for every request
        ex.conn = conn
        conn.begin(self, ex.is_head)
        if self._write_paused:
            conn.pause()
        if conn.write_paused:
            self._pause(_P_UPSTREAM)

    def _attach(self, ex: Exchange, conn: UpstreamConnection) -> None:
        ex.conn = conn
        conn.begin(self, ex.is_head)
        if self._write_paused:
            conn.pause()
        if conn.write_paused:
            self._pause(_P_UPSTREAM)

    async def _connect(self, ex: Exchange) -> None:
        try:
            conn = await self.ctx.pool.connect(ex.upstream)
        except Exception as exc:
            if ex.dead or self._closed:
                return
            self._resume(_P_CONNECT)
            log.info("502 to %s: %s is unreachable: %s", self.client.decode(), ex.upstream.label,
                     describe_error(exc))
            self._fail(ex, 502, f"ktproxy mesh: {ex.upstream.label} is unreachable: {describe_error(exc)}")
            self.flush()
            return
        if ex.dead or self._closed:
            self.ctx.pool.put(conn)
            return
        self._resume(_P_CONNECT)
        self._attach(ex, conn)
        self.flush()

    def flush(self) -> None:
        """Write what this round of callbacks produced, for the upstream in use and for the client."""
        queue = self._queue
        if queue:
            ex = queue[0]
            conn = ex.conn
            if conn is not None and ex.pending and not conn.closed:
                pending, ex.pending = ex.pending, []
                if len(pending) == 1:
                    conn.transport.write(pending[0])
                else:
                    conn.transport.writelines(pending)
                ex.sent_any = True
        out = self._out
        if out:
            self._out = []
            if not self._closed:
                if len(out) == 1:
                    self.transport.write(out[0])
                else:
                    self.transport.writelines(out)
        if self._close_after_flush and not self._closed and self.mode != LINGER:
            self._linger()

    def _linger(self) -> None:
        """Half-close after the last answer and discard what the client still sends, until it closes too."""
        transport = self.transport
        if self._eof or not transport.can_write_eof():
            transport.close()
            return
        self.mode = LINGER
        self._parser = None
        for ex in self._queue:
            ex.dead = True
            if ex.conn is not None:
                ex.conn.owner = None
                ex.conn.abort()
        self._queue.clear()
        transport.write_eof()
        self._paused = 0
        transport.resume_reading()
        self._cancel_timer()
        self._timer = self.ctx.loop.call_later(LINGER_TIME, transport.close)

    # Reports from the UpstreamConnection serving the active exchange (queue[0]).
    def up_interim(self, conn: UpstreamConnection, status: int, reason: bytes,
                   headers: list[tuple[bytes, bytes]]) -> None:
        if not self._queue[0].http11:
            return  # an HTTP/1.0 client knows no interim answers (RFC 9110 15.2)
        self._out.append(http1.prepare_response(status, reason, headers, client_http11=True, head_request=False,
                                                client_keep_alive=True)[0])

    def up_head(self, conn: UpstreamConnection, status: int, reason: bytes,
                headers: list[tuple[bytes, bytes]]) -> int:
        ex = self._queue[0]
        if status == 101 and not ex.upgrade:
            raise http1.UnexpectedSwitch
        # positional (client_http11, head_request, client_keep_alive): this runs for every response
        head, mode, close = http1.prepare_response(status, reason, headers, ex.http11, ex.is_head, ex.keep_alive)
        ex.resp_mode = mode
        ex.resp_started = True
        # A refused protocol switch: the bytes the client sent after its request cannot be trusted as HTTP.
        ex.close_after = close or (ex.upgrade and status != 101)
        self._out.append(head)
        return mode

    def up_body(self, data: bytes) -> None:
        if self._queue[0].resp_mode == http1.RESP_CHUNKED:
            self._out += (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            self._out.append(data)

    def up_done(self, conn: UpstreamConnection, keep_alive: bool, trailers: bytes) -> None:
        ex = self._queue[0]
        if ex.resp_mode == http1.RESP_CHUNKED:
            self._out.append(trailers or b"0\r\n\r\n")
        ex.conn = None
        conn.release(keep_alive and ex.request_done)
        if not ex.request_done:
            ex.close_after = True  # answered before the request ended: its rest can go nowhere
        self._finished(ex)

    def up_lost(self, conn: UpstreamConnection, reason: str) -> None:
        ex = self._queue[0]
        ex.conn = None
        conn.owner = None
        conn.abort()
        self._resume(_P_UPSTREAM)
        if ex.resp_started:
            self._close_after_flush = True  # mid-response: the client must see it cut
            return
        if (not conn.got_bytes and conn.reused and not ex.retried and ex.request_done
                and ex.framing == http1.NO_BODY and ex.method in http1.IDEMPOTENT):
            # A kept-alive connection the upstream had closed: the request never reached it; once more.
            ex.retried = True
            ex.pending = [ex.head]
            self._pause(_P_CONNECT)
            self.ctx.loop.create_task(self._connect(ex))
            return
        log.info("502 to %s: %s %s", self.client.decode(), ex.upstream.label, reason)
        what = "closed the connection before answering" if not conn.got_bytes else reason
        self._fail(ex, 502, f"ktproxy mesh: {ex.upstream.label} {what}")

    def up_upgraded(self, conn: UpstreamConnection, rest: bytes) -> None:
        ex = self._queue.popleft()
        ex.conn = None
        self._parser = None
        if rest:
            self._out.append(rest)
        self.flush()
        self._splice(conn)

    def _fail(self, ex: Exchange, status: int, text: str) -> None:
        """The router's own answer instead of the upstream's."""
        close = not ex.request_done or not ex.keep_alive or ex.upgrade
        self._out.append(http1.error_response(status, text, close=close))
        ex.close_after = close
        ex.dead = True
        self._finished(ex)

    def _finished(self, ex: Exchange) -> None:
        queue = self._queue
        queue.popleft()
        if ex.close_after:
            self._close_after_flush = True
            return
        if queue:
            if len(queue) == 1:
                self._resume(_P_PIPELINE)
            self._activate(queue[0])
        elif self._bad is not None:
            self._send_bad()
        elif self._eof:
            self._close_after_flush = True
