"""HTTP/2 (prior knowledge) client connections to the router's upstreams, pooled: streams from every
client connection that pick the same Upstream share one connection, or a few when one is full. A
connection that died, or got a GOAWAY, takes no new streams and leaves the pool.

What a connection needs from the streams it carries is RoutedStream's methods (h2_route.Stream has them).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import weakref
from typing import Protocol

import h2.events as ev
from h2.exceptions import NoAvailableStreamIDError, ProtocolError

from shadow_image.router.h2_conn import Headers, Side, new_connection
from shadow_image.router.table import Upstream

log = logging.getLogger("router.h2")

CONNECT_TIMEOUT = 10.0
# An upstream connection with no stream for this long is closed (routes come and go with developers).
IDLE_TIMEOUT = 120.0
# Streams put on one connection before its peer's SETTINGS told the real limit.
ASSUMED_MAX_STREAMS = 100

_STREAM_EVENTS = (ev.DataReceived, ev.ResponseReceived, ev.InformationalResponseReceived, ev.TrailersReceived,
                  ev.StreamEnded, ev.StreamReset)


class RoutedStream(Protocol):
    """A client's stream routed to an upstream, as the upstream connection carrying it sees it: told when
    it can be opened there, and every response event for it. Declared on this side so that the dependency
    runs one way only: h2_route knows this module, this module knows just this."""

    upstream: Upstream

    def open_on(self, up: UpstreamConn) -> None:
        """Open the stream on `up` now (it may find no stream id left there and go back to the pool)."""
        ...

    def unreachable(self, reason: str) -> None:
        """The connection this stream waited for could not be made."""
        ...

    def pump_request(self) -> None:
        """The upstream may take more: move on what of the request is buffered."""
        ...

    def informational(self, headers: Headers) -> None: ...

    def response_headers(self, headers: Headers, ended: bool) -> None: ...

    def response_data(self, data: bytes, flow_len: int) -> None: ...

    def response_trailers(self, headers: Headers) -> None: ...

    def response_end(self) -> None: ...

    def upstream_reset(self, code: int) -> None: ...

    def upstream_refused(self) -> None:
        """The upstream's GOAWAY says it never processed this stream."""
        ...

    def upstream_lost(self) -> None:
        """The connection closed under this stream."""
        ...


class UpstreamConn(asyncio.Protocol, Side[RoutedStream]):
    """One h2c client connection to an Upstream. Streams that arrive while it connects wait in
    `waiting` and are opened, in order, once it is up."""

    def __init__(self, pool: H2Pool, upstream: Upstream) -> None:
        Side.__init__(self, new_connection(client_side=True), None)
        self.pool = pool
        self.upstream = upstream
        self.ready = False
        self.draining = False  # GOAWAY received or stream ids exhausted: no new streams
        self.waiting: list[RoutedStream] = []
        self._settled = False  # the peer's SETTINGS arrived: its stream limit is known
        self._idle: asyncio.TimerHandle | None = None

    # -- pool side
    def can_take(self) -> bool:
        if self.closed or self.draining:
            return False
        limit = self.h2.remote_settings.max_concurrent_streams if self._settled else ASSUMED_MAX_STREAMS
        return len(self.streams) + len(self.waiting) < limit

    def take(self, stream: RoutedStream) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self.ready:
            stream.open_on(self)
        else:
            self.waiting.append(stream)

    def new_stream_id(self) -> int | None:
        try:
            return self.h2.get_next_available_stream_id()
        except NoAvailableStreamIDError:
            self.draining = True
            self.pool.forget(self)
            return None

    def release(self, stream_id: int) -> None:
        """A stream on this connection finished."""
        self.streams.pop(stream_id, None)
        if not self.streams and not self.waiting and not self.closed:
            if self.draining:
                self.close()
            elif self._idle is None:
                self._idle = asyncio.get_running_loop().call_later(IDLE_TIMEOUT, self._idle_out)

    def _idle_out(self) -> None:
        self._idle = None
        if not self.streams and not self.waiting:
            self.pool.forget(self)
            self.h2.close_connection()
            self.close()

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await loop.create_connection(lambda: self, self.upstream.host, self.upstream.port)
        except (OSError, TimeoutError) as e:
            if isinstance(e, TimeoutError):
                reason = "connection timed out"
            elif isinstance(e, socket.gaierror):  # the route's Service is gone
                reason = f"cannot resolve {self.upstream.host}: {e.strerror}"
            else:  # asyncio words a refusal as "Connect call failed (addr)": the errno says it better
                reason = os.strerror(e.errno) if e.errno and e.errno > 0 else str(e)
            log.warning("cannot reach %s: %s", self.upstream.label, reason)
            self.closed = True
            self.pool.forget(self)
            waiting, self.waiting = self.waiting, []
            for stream in waiting:
                stream.unreachable(reason)

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.ready = True
        self.flush()
        waiting, self.waiting = self.waiting, []
        for stream in waiting:
            stream.open_on(self)
        if not self.streams:
            self.release(0)

    def data_received(self, data: bytes) -> None:
        # h2 drops its unsent frames when a GOAWAY arrives: send them first.
        self.flush()
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as e:
            log.warning("%s broke HTTP/2: %s", self.upstream.label, e)
            self.pool.forget(self)
            self.close()
            return
        streams = self.streams
        for event in events:
            if isinstance(event, _STREAM_EVENTS):
                stream = streams.get(event.stream_id)  # type: ignore[union-attr]
                if stream is None:
                    if isinstance(event, ev.DataReceived):
                        self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    continue
                if isinstance(event, ev.DataReceived):
                    stream.response_data(event.data, event.flow_controlled_length)
                elif isinstance(event, ev.ResponseReceived):
                    stream.response_headers(event.headers, event.stream_ended is not None)
                elif isinstance(event, ev.TrailersReceived):
                    stream.response_trailers(event.headers)
                elif isinstance(event, ev.StreamEnded):
                    stream.response_end()
                elif isinstance(event, ev.StreamReset):
                    stream.upstream_reset(event.error_code)
                else:
                    stream.informational(event.headers)  # type: ignore[union-attr]
            elif isinstance(event, ev.WindowUpdated):
                if event.stream_id:
                    stream = streams.get(event.stream_id)
                    if stream is not None:
                        stream.pump_request()
                else:
                    self._pump_all()
            elif isinstance(event, ev.RemoteSettingsChanged):
                self._settled = True
                self._pump_all()
            elif isinstance(event, ev.ConnectionTerminated):
                self._goaway(event.last_stream_id or 0, event.error_code)
        self.mark()

    def _goaway(self, last_stream_id: int, error_code: int | None) -> None:
        self.draining = True
        self.pool.forget(self)
        for sid, stream in list(self.streams.items()):
            if sid > last_stream_id:
                # Never processed by the peer: the client may safely send it again.
                stream.upstream_refused()
        if not self.streams:
            self.close()
        elif error_code:
            log.warning("%s went away: %s", self.upstream.label, error_code)

    def _pump_all(self) -> None:
        for stream in list(self.streams.values()):
            stream.pump_request()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._pump_all()
        self.mark()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.upstream_lost()


class H2Pool:
    """Upstream connections by Upstream. One pool per event loop (pool_for())."""

    def __init__(self) -> None:
        self._conns: dict[tuple[str, int], list[UpstreamConn]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def attach(self, stream: RoutedStream) -> None:
        """Open `stream` on a connection to its upstream now, or once that connection is up."""
        upstream = stream.upstream
        key = (upstream.host, upstream.port)
        conns = self._conns.setdefault(key, [])
        for conn in conns:
            if conn.can_take():
                conn.take(stream)
                return
        conn = UpstreamConn(self, upstream)
        conns.append(conn)
        conn.take(stream)
        task = asyncio.get_running_loop().create_task(conn.connect())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def forget(self, conn: UpstreamConn) -> None:
        """`conn` takes no new streams (its current ones go on)."""
        conns = self._conns.get((conn.upstream.host, conn.upstream.port))
        if conns and conn in conns:
            conns.remove(conn)

    def connections(self, upstream: Upstream) -> list[UpstreamConn]:
        return list(self._conns.get((upstream.host, upstream.port), ()))


_POOLS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, H2Pool] = weakref.WeakKeyDictionary()


def pool_for(loop: asyncio.AbstractEventLoop) -> H2Pool:
    """The pool every H2Downstream on `loop` shares (upstream connections outlive client connections)."""
    pool = _POOLS.get(loop)
    if pool is None:
        pool = _POOLS[loop] = H2Pool()
    return pool
