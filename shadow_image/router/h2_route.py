"""HTTP/2 cleartext (prior knowledge, as gRPC speaks it) through the router: each stream of a client
connection is routed on its own by RouteTable.pick(), and relayed as HTTP/2 to that upstream, matching
or not (telepresence #4055 hung when non-matching HTTP/2 was handed to an HTTP/1 path).

The HTTP/1 layer (downstream.py, which gets H2Downstream as its H2Layer from server.py) hands a
connection over when it sees the client preface: `H2Downstream(transport, table, listen_port, peer)`,
then `data_received` (the first call includes the preface), `connection_lost`, `pause_writing`,
`resume_writing`.

A Stream pairs the client's stream with one on a pooled upstream connection (h2_upstream.py, to which it
is a RoutedStream) and moves HEADERS, DATA, trailers, END_STREAM and RST_STREAM across, DATA only as fast
as the receiving side's windows and transport take it: received DATA is acknowledged when it was passed
on, not when it arrived, so nothing buffers more than a window per stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Iterable, Sequence

import h2.events as ev
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError, StreamClosedError, TooManyStreamsError
from hyperframe.frame import GoAwayFrame

from shadow_image.router.h2_conn import Headers, Side, new_connection
from shadow_image.router.h2_upstream import H2Pool, UpstreamConn, pool_for
from shadow_image.router.table import RepeatedRouteHeader, RouteTable, Upstream

log = logging.getLogger("router.h2")

_IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS"))
# After a connection error: GOAWAY, half-close, and read on (discarding) this long or this much before
# closing, so the client reads the GOAWAY instead of a TCP reset (as downstream.py does for HTTP/1).
LINGER_TIME = 2.0
LINGER_BYTES = 1 << 20
_DOWN_STREAM_EVENTS = (ev.DataReceived, ev.StreamEnded, ev.TrailersReceived, ev.StreamReset)


def selecting_headers(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """The headers a route may be picked by: pseudo-headers (:path, :authority, ...) never pick one."""
    return [(n, v) for n, v in headers if not n.startswith(b":")]


def forwarded_headers(headers: Iterable[tuple[bytes, bytes]], peer: str) -> Headers:
    """The request headers sent upstream: all of them, in order (:authority kept), with the client's
    address appended to x-forwarded-for (one field, as proxies conventionally keep it)."""
    out: Headers = []
    prior: bytes | None = None
    for name, value in headers:
        if name == b"x-forwarded-for":
            prior = value if prior is None else prior + b", " + value
        else:
            out.append((name, value))
    addr = peer.encode()
    out.append((b"x-forwarded-for", addr if prior is None else prior + b", " + addr))
    return out


def goaway_frame(last_stream_id: int) -> bytes:
    """GOAWAY (NO_ERROR) written past h2, whose connection would refuse every frame after sending one,
    including those of the streams the GOAWAY lets finish."""
    frame = GoAwayFrame(0)
    frame.last_stream_id = last_stream_id
    return frame.serialize()


def bad_gateway(upstream: Upstream, reason: str) -> tuple[Headers, bytes]:
    """The answer on a stream whose upstream cannot be reached: it names the route."""
    body = f"502 Bad Gateway: cannot reach {upstream.label}: {reason}\n".encode()
    return [(b":status", b"502"), (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode())], body


class Half:
    """One direction of a stream: DATA received but not yet passed on, and how it ends."""

    __slots__ = ("chunks", "done", "end", "trailers")

    def __init__(self) -> None:
        self.chunks: deque[bytes] = deque()
        self.end = False  # END_STREAM received: send it once `chunks` are out
        self.trailers: Headers | None = None
        self.done = False  # END_STREAM passed on (or this direction was abandoned)

    def drop(self) -> int:
        """Abandon what is buffered; returns its length, which the source still must acknowledge."""
        n = sum(map(len, self.chunks))
        self.chunks.clear()
        self.done = True
        return n


def pump(half: Half, src: Side | None, src_sid: int, dst: Side, dst_sid: int) -> None:
    """Pass on as much of `half` as dst's flow-control windows, frame size and transport take now, and
    acknowledge exactly that much to src (None: the router made the bytes itself)."""
    if dst.paused or half.done:
        return
    conn = dst.h2
    chunks = half.chunks
    if chunks:
        window = conn.local_flow_control_window(dst_sid)
        frame = conn.max_outbound_frame_size
        moved = 0
        while chunks and window > 0:
            chunk = chunks[0]
            n = len(chunk)
            if n > window or n > frame:
                n = min(window, frame)
                conn.send_data(dst_sid, chunk[:n])
                chunks[0] = chunk[n:]
            else:
                conn.send_data(dst_sid, chunk)
                chunks.popleft()
            window -= n
            moved += n
        if moved:
            dst.mark()
            if src is not None:
                src.h2.acknowledge_received_data(moved, src_sid)
                src.mark()
    if not chunks and half.end:
        if half.trailers:
            conn.send_headers(dst_sid, half.trailers, end_stream=True)
        else:
            conn.end_stream(dst_sid)
        half.done = True
        dst.mark()


class Stream:
    """A client stream and the upstream stream it was routed to."""

    __slots__ = ("answered", "down", "down_sid", "headers", "req", "resp", "retried", "stop_request", "up",
                 "up_sid", "upstream", "waiting")

    def __init__(self, down: H2Downstream, down_sid: int, upstream: Upstream, headers: Headers) -> None:
        self.down = down
        self.down_sid = down_sid
        self.upstream = upstream
        self.headers = headers
        self.up: UpstreamConn | None = None
        self.up_sid = 0
        self.req = Half()
        self.resp = Half()
        self.answered = False  # response HEADERS went to the client
        self.stop_request = False  # the response ended first: reset the client's request once it is out
        self.waiting = True  # not yet opened upstream
        self.retried = False

    @property
    def gone(self) -> bool:
        """The client's stream is over (reset, or its connection closed)."""
        return self.down.streams.get(self.down_sid) is not self

    # -- upstream connection
    def open_on(self, up: UpstreamConn) -> None:
        if not self.waiting:
            return
        sid = up.new_stream_id()
        if sid is None:
            up.pool.attach(self)
            return
        self.waiting = False
        req = self.req
        end = req.end and not req.chunks and not req.trailers
        try:
            up.h2.send_headers(sid, self.headers, end_stream=end)
        except TooManyStreamsError:
            # The peer lowered its stream limit below what we had on the wire: retrying is the client's.
            self._reset_down(ErrorCodes.REFUSED_STREAM)
            return
        if not end or self.retried:
            self.headers = []  # kept only while sending it again is possible (a request that is all headers)
        self.up, self.up_sid = up, sid
        up.streams[sid] = self
        req.done = end
        up.mark()
        self.pump_request()

    def unreachable(self, reason: str) -> None:
        """The upstream connection could not be made (or died before answering): a 502 naming the route."""
        self.waiting = False
        if self.gone:
            return
        self._drop_request()  # what the client sent meanwhile goes nowhere: give its window back
        if self.answered or self.resp.done:
            self._reset_down(ErrorCodes.INTERNAL_ERROR)
            return
        headers, body = bad_gateway(self.upstream, reason)
        self._response_headers(headers, False)
        if self.resp.done:
            return
        self.resp.chunks.append(body)
        self.resp.end = True
        self.stop_request = True
        self.up = None
        self.pump_response()

    # -- client -> upstream
    def request_data(self, data: bytes, flow_len: int) -> None:
        if flow_len > len(data):  # padding: nothing to pass on
            self.down.h2.acknowledge_received_data(flow_len - len(data), self.down_sid)
        req = self.req
        if req.done:
            self.down.h2.acknowledge_received_data(len(data), self.down_sid)
        elif data:
            req.chunks.append(data)
            self.pump_request()

    def request_trailers(self, headers: Headers) -> None:
        self.req.trailers = headers
        self.request_end()

    def request_end(self) -> None:
        self.req.end = True
        self.pump_request()

    def pump_request(self) -> None:
        up = self.up
        if up is None or self.req.done:
            return
        try:
            pump(self.req, self.down, self.down_sid, up, self.up_sid)
        except StreamClosedError:
            self.upstream_reset(ErrorCodes.STREAM_CLOSED)
            return
        self._maybe_finish()

    def client_reset(self, code: int) -> None:
        self.waiting = False
        if self.up is not None:
            self._reset(self.up, self.up_sid, code)
        self._abandon()

    # -- upstream -> client
    def informational(self, headers: Headers) -> None:
        if not self.answered:
            self._send_down_headers(headers, False)

    def response_headers(self, headers: Headers, ended: bool) -> None:
        self._response_headers(headers, ended)

    def response_data(self, data: bytes, flow_len: int) -> None:
        up = self.up
        if up is not None and flow_len > len(data):
            up.h2.acknowledge_received_data(flow_len - len(data), self.up_sid)
        if self.resp.done:
            if up is not None:
                up.h2.acknowledge_received_data(len(data), self.up_sid)
        elif data:
            self.resp.chunks.append(data)
            self.pump_response()

    def response_trailers(self, headers: Headers) -> None:
        self.resp.trailers = headers
        self.response_end()

    def response_end(self) -> None:
        self.resp.end = True
        self.pump_response()

    def pump_response(self) -> None:
        if not self.resp.done and not self.down.closed:
            try:
                pump(self.resp, self.up, self.up_sid, self.down, self.down_sid)
            except StreamClosedError:
                self.client_reset(ErrorCodes.CANCEL)
                return
        self._maybe_finish()

    def upstream_reset(self, code: int) -> None:
        if code == ErrorCodes.NO_ERROR and self.resp.end:
            # The upstream answered in full and wants no more of the request: deliver the answer, then
            # tell the client to stop sending.
            self._drop_request()
            self.stop_request = True
            self.pump_response()
            return
        if code == ErrorCodes.REFUSED_STREAM and not self.answered:
            self.upstream_refused()  # never processed (RFC 9113 8.7): perhaps sent again
            return
        self._reset_down(code)

    def upstream_refused(self) -> None:
        """The upstream's GOAWAY says it never processed this stream."""
        self._release_up()
        if self.answered:
            self._reset_down(ErrorCodes.INTERNAL_ERROR)
        elif not self._retry():
            self._reset_down(ErrorCodes.REFUSED_STREAM)

    def upstream_lost(self) -> None:
        """The upstream connection closed under this stream."""
        self.up = None
        if not self.answered and self._method() in _IDEMPOTENT and self._retry():
            # Most likely a kept-alive connection the upstream closed as we sent on it.
            return
        if self.resp.end:
            self._drop_request()
            self.pump_response()
        elif self.answered:
            self._reset_down(ErrorCodes.INTERNAL_ERROR)
        else:
            self.unreachable("the connection closed before a response")

    # -- internals
    def _method(self) -> bytes:
        for name, value in self.headers:
            if name == b":method":
                return value
        return b""

    def _retry(self) -> bool:
        """Send the request again on another connection, once, when it was all headers (nothing of it
        was acknowledged to the client and lost)."""
        if self.retried or not self.headers or self.gone:
            return False
        self.retried = True
        self.waiting = True
        self.req.done = False
        self.down.pool.attach(self)
        return True

    def _response_headers(self, headers: Headers, ended: bool) -> None:
        if self.answered:
            return
        self.answered = True
        self._send_down_headers(headers, ended)
        if ended and not self.resp.done:
            self.resp.end = True
            self.resp.done = True
            self._maybe_finish()

    def _send_down_headers(self, headers: Headers, ended: bool) -> None:
        down = self.down
        if down.closed:
            return
        try:
            down.h2.send_headers(self.down_sid, headers, end_stream=ended)
        except StreamClosedError:
            self.client_reset(ErrorCodes.CANCEL)
            return
        down.mark()

    def _drop_request(self) -> None:
        if not self.req.done:
            n = self.req.drop()
            if n:
                self.down.h2.acknowledge_received_data(n, self.down_sid)
                self.down.mark()

    def _reset(self, side: Side, sid: int, code: int) -> None:
        if side.closed:
            return
        try:
            side.h2.reset_stream(sid, code)
        except (StreamClosedError, ProtocolError):
            return
        side.mark()

    def _reset_down(self, code: int) -> None:
        self._reset(self.down, self.down_sid, code)
        self._abandon()

    def _abandon(self) -> None:
        """Both directions are over: give back what was buffered and leave both connections."""
        self._drop_request()
        n = self.resp.drop()
        if n and self.up is not None:
            self.up.h2.acknowledge_received_data(n, self.up_sid)
            self.up.mark()
        self._finish()

    def _maybe_finish(self) -> None:
        if self.resp.done:
            if self.stop_request and not self.req.end:
                self._reset(self.down, self.down_sid, ErrorCodes.NO_ERROR)
                self._drop_request()
            if self.req.done:
                self._finish()

    def _finish(self) -> None:
        down = self.down
        if down.streams.pop(self.down_sid, None) is self and not down.streams and down.ending:
            down.close()
        self._release_up()

    def _release_up(self) -> None:
        up = self.up
        if up is not None:
            self.up = None
            if up.streams.get(self.up_sid) is self:
                up.release(self.up_sid)


class H2Downstream(Side[Stream]):
    """One client's HTTP/2 connection, handed over by the router's protocol (see the module doc)."""

    def __init__(self, transport: asyncio.Transport, table: RouteTable, listen_port: int, peer: str, *,
                 pool: H2Pool | None = None) -> None:
        super().__init__(new_connection(client_side=False), transport)
        self.table = table
        self.listen_port = listen_port
        self.peer = peer
        self.pool = pool or pool_for(asyncio.get_running_loop())
        self.ending = False  # close once the last stream is done (the client half-closed, or we stop)
        self._last_stream: int | None = None  # after our GOAWAY: streams above this are refused
        self._lingered = -1  # >= 0: bytes discarded since a connection error's GOAWAY
        self.mark()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            if self._lingered >= 0:
                self._lingered += len(data)
                if self._lingered > LINGER_BYTES and self.transport is not None:
                    self.transport.close()
            return
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as e:
            log.info("client %s broke HTTP/2: %s", self.peer, e)
            self._abort()
            return
        streams = self.streams
        for event in events:
            if isinstance(event, _DOWN_STREAM_EVENTS):
                stream = streams.get(event.stream_id)  # type: ignore[union-attr]
                if stream is None:
                    if isinstance(event, ev.DataReceived):
                        self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, ev.DataReceived):
                    stream.request_data(event.data, event.flow_controlled_length)
                elif isinstance(event, ev.StreamEnded):
                    stream.request_end()
                elif isinstance(event, ev.TrailersReceived):
                    stream.request_trailers(event.headers)
                else:
                    stream.client_reset(event.error_code)  # type: ignore[union-attr]
            elif isinstance(event, ev.RequestReceived):
                self._request(event.stream_id, event.headers, event.stream_ended is not None)
            elif isinstance(event, ev.WindowUpdated):
                if event.stream_id:
                    stream = streams.get(event.stream_id)
                    if stream is not None:
                        stream.pump_response()
                else:
                    self._pump_all()
            elif isinstance(event, ev.RemoteSettingsChanged):
                self._pump_all()
            elif isinstance(event, ev.ConnectionTerminated) and event.error_code:
                # A GOAWAY without error only says the client opens no more streams; with one, it gave up.
                self._abort()
                return
        self.mark()

    def _request(self, sid: int, headers: Sequence[tuple[bytes, bytes]], ended: bool) -> None:
        if self._last_stream is not None and sid > self._last_stream:
            # Sent before the client saw our GOAWAY: never processed, so safe for it to retry elsewhere.
            self.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        try:
            upstream = self.table.pick(self.listen_port, selecting_headers(headers))
        except KeyError:
            self._reset_unrouted(sid)
            return
        except RepeatedRouteHeader as exc:
            self._bad_request(sid, str(exc), ended)
            return
        stream = Stream(self, sid, upstream, forwarded_headers(headers, self.peer))
        stream.req.end = ended
        self.streams[sid] = stream
        self.pool.attach(stream)

    def _bad_request(self, sid: int, reason: str, ended: bool) -> None:
        """The router's own 400 on one stream (the others go on); a request body still coming is refused
        with RST_STREAM NO_ERROR after the answer (RFC 9113 8.1)."""
        log.info("400 to %s on stream %d: %s", self.peer, sid, reason)
        body = f"ktproxy mesh: bad request: {reason}\n".encode()
        if self.h2.local_flow_control_window(sid) < len(body):  # no room for the text: a stream error then
            self.h2.reset_stream(sid, ErrorCodes.PROTOCOL_ERROR)
            return
        self.h2.send_headers(sid, [(b":status", b"400"), (b"content-type", b"text/plain; charset=utf-8"),
                                   (b"content-length", str(len(body)).encode())])
        self.h2.send_data(sid, body, end_stream=True)
        if not ended:
            try:
                self.h2.reset_stream(sid, ErrorCodes.NO_ERROR)
            except StreamClosedError:
                pass  # its END_STREAM came in the same read

    def _reset_unrouted(self, sid: int) -> None:
        log.warning("no upstream for port %s", self.listen_port)
        self.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)

    def _pump_all(self) -> None:
        for stream in list(self.streams.values()):
            stream.pump_response()

    def _abort(self) -> None:
        """A connection error: the GOAWAY h2 queued goes out, then a half-close; what the client still
        sends is read and dropped for a while (closing with unread bytes would send a TCP reset, which
        can destroy the GOAWAY before the client reads it)."""
        transport = self.transport
        if self.closed or transport is None or not transport.can_write_eof():  # type: ignore[attr-defined]
            self.close()
        else:
            self.flush()
            self.closed = True
            self._lingered = 0
            transport.write_eof()  # type: ignore[attr-defined]
            asyncio.get_running_loop().call_later(LINGER_TIME, transport.close)
        self._cancel_all()

    def _cancel_all(self) -> None:
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.client_reset(ErrorCodes.CANCEL)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._pump_all()
        self.mark()

    def eof_received(self) -> bool:
        """The client sends no more: answer the streams under way, then close (True keeps the transport
        open for writing)."""
        self.ending = True
        return bool(self.streams)

    def close_if_idle(self) -> bool:
        """At a router stop (called repeatedly until it returns True): a GOAWAY first, so the client
        opens no new stream here, and close once the streams under way are done."""
        if self.closed:
            return True
        if not self.ending:
            self.ending = True
            self._last_stream = last = self.h2.highest_inbound_stream_id
            self.transport.write(self.h2.data_to_send() + goaway_frame(last))  # type: ignore[attr-defined]
        if not self.streams:
            self.close()
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_all()
