"""The router's HTTP/2 relay, in memory: a client h2 connection <-> H2Downstream <-> UpstreamConn <-> a
server h2 connection, bytes moved by hand, so each stream state decision is checked frame by frame."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import h2.events as ev
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import GoAwayFrame

from shadow_image.router import h2_conn, h2_route
from shadow_image.router.h2_conn import Side, new_connection
from shadow_image.router.h2_route import (
    H2Downstream,
    Half,
    Stream,
    bad_gateway,
    forwarded_headers,
    pump,
    selecting_headers,
)
from shadow_image.router.h2_upstream import ASSUMED_MAX_STREAMS, UpstreamConn
from shadow_image.router.table import RouteTable, Upstream


def goaway(last_stream_id: int, error_code: int = 0) -> bytes:
    """A GOAWAY frame made past h2, which refuses to send anything after one."""
    frame = GoAwayFrame(0)
    frame.last_stream_id = last_stream_id
    frame.error_code = error_code
    return frame.serialize()


def send_all(conn: H2Connection, sid: int, data: bytes) -> None:
    for off in range(0, len(data), 16384):
        conn.send_data(sid, data[off:off + 16384])


REQ = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"svc:80"), (b":path", b"/p")]


class Wire:
    """A transport that keeps what is written."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.closed = False
        self.half_closable = False  # a TCP transport (True) can write_eof
        self.eof = False

    def write(self, data: bytes) -> None:
        self.buf += data

    def can_write_eof(self) -> bool:
        return self.half_closable

    def write_eof(self) -> None:
        self.eof = True

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def take(self) -> bytes:
        data = bytes(self.buf)
        self.buf.clear()
        return data


class OnePool:
    """Every stream goes to the one upstream connection of the relay."""

    def __init__(self) -> None:
        self.up: UpstreamConn | None = None
        self.picked: list[Upstream] = []

    def attach(self, stream: Stream) -> None:
        self.picked.append(stream.upstream)
        assert self.up is not None
        if self.up.can_take():
            self.up.take(stream)

    def forget(self, conn: UpstreamConn) -> None:
        pass


class Relay:
    def __init__(self, *, client_window: int | None = None) -> None:
        self.table = RouteTable("svc", {80: 8080})
        self.table.set_routes([("version", "abcde")])
        self.pool = OnePool()
        self.client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.client.initiate_connection()
        if client_window is not None:
            self.client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: client_window})
        self.server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.server.initiate_connection()
        self.down_wire, self.up_wire = Wire(), Wire()
        self.down = H2Downstream(self.down_wire, self.table, 80, "10.1.2.3", pool=self.pool)  # type: ignore[arg-type]
        self.up = UpstreamConn(self.pool, self.table.default(80))  # type: ignore[arg-type]
        self.pool.up = self.up
        self.up.connection_made(self.up_wire)  # type: ignore[arg-type]
        self.at_client: list[ev.Event] = []
        self.at_server: list[ev.Event] = []
        self.server_acks = True
        self.client_acks = True

    async def settle(self) -> None:
        """Move bytes every way until nothing moves (each side flushes at the end of a loop turn)."""
        for _ in range(1000):
            await asyncio.sleep(0)
            moved = False
            if data := self.client.data_to_send():
                self.down.data_received(data)
                moved = True
            if data := self.down_wire.take():
                for e in self.client.receive_data(data):
                    self.at_client.append(e)
                    if isinstance(e, ev.DataReceived) and self.client_acks:
                        self.client.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                moved = True
            if data := self.up_wire.take():
                for e in self.server.receive_data(data):
                    self.at_server.append(e)
                    if isinstance(e, ev.DataReceived) and self.server_acks:
                        self.server.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                moved = True
            if data := self.server.data_to_send():
                self.up.data_received(data)
                moved = True
            if not moved:
                await asyncio.sleep(0)
                if not (self.client.data_to_send(0) or self.down_wire.buf or self.up_wire.buf):
                    return
        raise AssertionError("the relay never settled")

    def client_events(self, kind: type, sid: int = 1) -> list:
        return [e for e in self.at_client if isinstance(e, kind) and getattr(e, "stream_id", sid) == sid]

    def server_events(self, kind: type) -> list:
        return [e for e in self.at_server if isinstance(e, kind)]

    def body_at_client(self, sid: int = 1) -> bytes:
        return b"".join(e.data for e in self.client_events(ev.DataReceived, sid))


async def request(relay: Relay, headers: list[tuple[bytes, bytes]] = REQ, *, end: bool = False) -> int:
    sid = relay.client.get_next_available_stream_id()
    relay.client.send_headers(sid, headers, end_stream=end)
    await relay.settle()
    return sid


def test_selecting_headers_leave_out_pseudo_headers() -> None:
    hdrs = [(b":authority", b"abcde"), (b":path", b"/version"), (b"version", b"abcde")]
    assert selecting_headers(hdrs) == [(b"version", b"abcde")]


def test_forwarded_headers_keep_order_and_append_the_peer() -> None:
    out = forwarded_headers([*REQ, (b"x-forwarded-for", b"1.1.1.1"), (b"te", b"trailers"),
                             (b"x-forwarded-for", b"2.2.2.2")], "10.0.0.9")
    assert out[:4] == REQ  # pseudo-headers first, :authority untouched
    assert out[4:] == [(b"te", b"trailers"), (b"x-forwarded-for", b"1.1.1.1, 2.2.2.2, 10.0.0.9")]
    assert forwarded_headers(REQ, "::1")[-1] == (b"x-forwarded-for", b"::1")


def test_bad_gateway_names_the_route() -> None:
    up = RouteTable("svc", {80: 8080}).for_route("version", "abcde", 80)
    headers, body = bad_gateway(up, "Connection refused")
    assert (b":status", b"502") in headers
    assert (b"content-length", str(len(body)).encode()) in headers
    assert b"route 'VERSION: abcde' (svc-kt-mesh-abcde:8080): Connection refused" in body


async def test_pump_honours_windows_and_frame_size_and_acknowledges_what_moved() -> None:
    dst = Side(new_connection(client_side=False), Wire())  # type: ignore[arg-type]
    peer = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    peer.initiate_connection()
    peer.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 40000})
    peer.send_headers(1, REQ)
    dst.h2.receive_data(peer.data_to_send())
    peer.receive_data(dst.h2.data_to_send())
    dst.h2.receive_data(peer.data_to_send())  # the SETTINGS ACK: the 40000 window applies
    dst.h2.send_headers(1, [(b":status", b"200")])
    src = Side(new_connection(client_side=False), Wire())  # type: ignore[arg-type]
    half = Half()
    half.chunks.extend([b"a" * 30000, b"b" * 30000])
    half.end = True
    acked: list[int] = []
    src.h2.acknowledge_received_data = lambda n, sid: acked.append(n)  # type: ignore[method-assign]
    pump(half, src, 3, dst, 1)
    frames = [e for e in peer.receive_data(dst.h2.data_to_send()) if isinstance(e, ev.DataReceived)]
    assert [len(f.data) for f in frames] == [16384, 13616, 10000]  # 16 KiB frames, 40000 window
    assert acked == [40000]
    assert not half.done and sum(map(len, half.chunks)) == 20000
    peer.acknowledge_received_data(40000, 1)
    dst.h2.receive_data(peer.data_to_send())
    pump(half, src, 3, dst, 1)
    events = peer.receive_data(dst.h2.data_to_send())
    assert sum(len(e.data) for e in events if isinstance(e, ev.DataReceived)) == 20000
    assert any(isinstance(e, ev.StreamEnded) for e in events)  # END_STREAM only after every byte
    assert half.done and acked == [40000, 20000]


async def test_goaway_does_not_end_the_streams_it_spares() -> None:
    """h2 alone refuses every frame after a GOAWAY; the relay's connections keep receiving."""
    client = new_connection(client_side=True)
    server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    server.initiate_connection()
    client.send_headers(1, REQ, end_stream=True)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.send_headers(1, [(b":status", b"200")])
    server.send_data(1, b"after", end_stream=True)
    events = client.receive_data(goaway(1) + server.data_to_send())
    assert [type(e) for e in events] == [ev.ConnectionTerminated, ev.ResponseReceived, ev.DataReceived,
                                         ev.StreamEnded]


async def test_streams_are_routed_one_by_one() -> None:
    relay = Relay()
    await request(relay, [*REQ, (b"version", b"abcde")], end=True)
    await request(relay, [*REQ, (b"version", b"other")], end=True)
    await request(relay, [*REQ, (b"release", b"abcde")], end=True)
    assert [u.route for u in relay.pool.picked] == [("version", "abcde"), None, None]
    sent = relay.server_events(ev.RequestReceived)
    assert [dict(e.headers)[b"x-forwarded-for"] for e in sent] == [b"10.1.2.3"] * 3
    assert all(dict(e.headers)[b":authority"] == b"svc:80" for e in sent)


async def test_full_answer_then_reset_no_error_reaches_the_client_in_that_order() -> None:
    relay = Relay()
    sid = await request(relay)
    relay.client.send_data(sid, b"part of a body")
    await relay.settle()
    usid = relay.server_events(ev.RequestReceived)[0].stream_id
    relay.server.send_headers(usid, [(b":status", b"200")])
    relay.server.send_data(usid, b"done", end_stream=True)
    relay.server.reset_stream(usid, ErrorCodes.NO_ERROR)
    await relay.settle()
    assert relay.body_at_client(sid) == b"done"
    kinds = [type(e) for e in relay.at_client if getattr(e, "stream_id", 0) == sid]
    assert kinds[-2:] == [ev.StreamEnded, ev.StreamReset]
    assert relay.client_events(ev.StreamReset, sid)[0].error_code == ErrorCodes.NO_ERROR
    assert relay.down.streams == {} and relay.up.streams == {}


async def test_upstream_reset_mid_answer_resets_the_client_with_its_code() -> None:
    relay = Relay()
    sid = await request(relay, end=True)
    usid = relay.server_events(ev.RequestReceived)[0].stream_id
    relay.server.send_headers(usid, [(b":status", b"200")])
    relay.server.send_data(usid, b"half")
    relay.server.reset_stream(usid, ErrorCodes.ENHANCE_YOUR_CALM)
    await relay.settle()
    assert relay.client_events(ev.StreamReset, sid)[0].error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert relay.down.streams == {} and relay.up.streams == {}


async def test_client_reset_reaches_the_upstream_stream() -> None:
    relay = Relay()
    sid = await request(relay)
    relay.client.reset_stream(sid, ErrorCodes.CANCEL)
    await relay.settle()
    assert [e.error_code for e in relay.server_events(ev.StreamReset)] == [ErrorCodes.CANCEL]
    assert relay.down.streams == {} and relay.up.streams == {}


async def test_trailers_only_answer_ends_the_stream() -> None:
    relay = Relay()
    sid = await request(relay, end=True)
    usid = relay.server_events(ev.RequestReceived)[0].stream_id
    relay.server.send_headers(usid, [(b":status", b"200"), (b"grpc-status", b"14")], end_stream=True)
    await relay.settle()
    got = relay.client_events(ev.ResponseReceived, sid)[0]
    assert (b"grpc-status", b"14") in got.headers and got.stream_ended is not None
    assert relay.down.streams == {}


async def test_trailers_follow_the_data_both_ways() -> None:
    relay = Relay()
    sid = await request(relay)
    relay.client.send_data(sid, b"req")
    relay.client.send_headers(sid, [(b"x-req-trailer", b"1")], end_stream=True)
    await relay.settle()
    usid = relay.server_events(ev.RequestReceived)[0].stream_id
    assert relay.server_events(ev.TrailersReceived)[0].headers == [(b"x-req-trailer", b"1")]
    relay.server.send_headers(usid, [(b":status", b"200")])
    relay.server.send_data(usid, b"resp")
    relay.server.send_headers(usid, [(b"grpc-status", b"0")], end_stream=True)
    await relay.settle()
    assert relay.body_at_client(sid) == b"resp"
    assert relay.client_events(ev.TrailersReceived, sid)[0].headers == [(b"grpc-status", b"0")]


async def test_upstream_lost_before_an_answer_gives_502_after_it_a_reset() -> None:
    relay = Relay()
    answered = await request(relay, end=True)
    unanswered = await request(relay, end=True)
    usid = relay.server_events(ev.RequestReceived)[0].stream_id
    relay.server.send_headers(usid, [(b":status", b"200")])
    await relay.settle()
    relay.up.connection_lost(None)
    await relay.settle()
    assert relay.client_events(ev.StreamReset, answered)[0].error_code == ErrorCodes.INTERNAL_ERROR
    got = relay.client_events(ev.ResponseReceived, unanswered)[0]
    assert dict(got.headers)[b":status"] == b"502"
    assert b"svc-kt-stuntman:8080" in relay.body_at_client(unanswered)
    assert relay.client_events(ev.StreamEnded, unanswered)


async def test_502_stops_a_request_body_still_coming() -> None:
    relay = Relay()
    sid = await request(relay)
    relay.up.connection_lost(None)
    await relay.settle()
    assert relay.client_events(ev.StreamEnded, sid)
    assert relay.client_events(ev.StreamReset, sid)[0].error_code == ErrorCodes.NO_ERROR
    assert relay.down.streams == {}


async def test_upstream_goaway_refuses_only_the_streams_it_never_saw() -> None:
    """Streams above its last-stream-id: sent again elsewhere when all headers, else refused."""
    relay = Relay()
    first = await request(relay, end=True)
    second = await request(relay)
    relay.client.send_data(second, b"body")
    third = await request(relay, end=True)
    seen = [e.stream_id for e in relay.server_events(ev.RequestReceived)]
    relay.up.data_received(goaway(seen[0]))
    await relay.settle()
    assert relay.client_events(ev.StreamReset, second)[0].error_code == ErrorCodes.REFUSED_STREAM
    assert not relay.client_events(ev.StreamReset, first)
    assert not relay.client_events(ev.StreamReset, third)
    assert len(relay.pool.picked) == 4  # the third asked the pool for a connection again
    assert relay.up.draining and not relay.up.can_take()


async def test_a_paused_client_transport_holds_back_the_upstream() -> None:
    relay = Relay()
    sid = await request(relay, end=True)
    usid = relay.server_events(ev.RequestReceived)[0].stream_id
    relay.down.pause_writing()
    relay.server.send_headers(usid, [(b":status", b"200")])
    send_all(relay.server, usid, b"x" * 300000)
    await relay.settle()
    assert relay.body_at_client(sid) == b""
    before = relay.server.local_flow_control_window(usid)
    relay.down.resume_writing()
    await relay.settle()
    assert relay.body_at_client(sid) == b"x" * 300000
    assert relay.server.local_flow_control_window(usid) > before  # acknowledged only once passed on


async def test_a_client_that_does_not_read_is_not_buffered_for() -> None:
    relay = Relay(client_window=1000)
    relay.client_acks = False
    await relay.settle()
    sid = await request(relay, end=True)
    usid = relay.server_events(ev.RequestReceived)[0].stream_id
    relay.server.send_headers(usid, [(b":status", b"200")])
    send_all(relay.server, usid, b"y" * 60000)
    await relay.settle()
    assert len(relay.body_at_client(sid)) == 1000
    # The upstream got back only what reached the client.
    assert relay.server.local_flow_control_window(usid) <= h2_conn.STREAM_WINDOW - 60000 + 1000


async def test_upstream_connection_limits_streams_until_the_peer_says() -> None:
    relay = Relay()
    up = UpstreamConn(relay.pool, relay.table.default(80))  # type: ignore[arg-type]
    up.waiting = [object()] * (ASSUMED_MAX_STREAMS - 1)  # type: ignore[list-item]
    assert up.can_take()
    up.waiting.append(object())  # type: ignore[arg-type]
    assert not up.can_take()


@pytest.mark.parametrize("code", [ErrorCodes.NO_ERROR, ErrorCodes.INTERNAL_ERROR])
async def test_client_goaway(code: int) -> None:
    """Without an error the client's streams go on; with one they are cancelled upstream."""
    relay = Relay()
    await request(relay, end=True)
    relay.down.data_received(goaway(0, code))
    await relay.settle()
    cancelled = [e.error_code for e in relay.server_events(ev.StreamReset)]
    assert cancelled == ([] if code == ErrorCodes.NO_ERROR else [ErrorCodes.CANCEL])
    assert relay.down_wire.closed == (code != ErrorCodes.NO_ERROR)


async def test_stop_sends_goaway_refuses_later_streams_and_closes_after_the_last() -> None:
    relay = Relay()
    relay.client.state_machine._transitions = h2_conn._TRANSITIONS  # type: ignore[misc]  # keep sending after GOAWAY
    sid = await request(relay, end=True)
    assert relay.down.close_if_idle() is False
    await relay.settle()
    gone = [e for e in relay.at_client if isinstance(e, ev.ConnectionTerminated)]
    assert [(e.error_code, e.last_stream_id) for e in gone] == [(ErrorCodes.NO_ERROR, sid)]
    late = await request(relay, end=True)
    assert relay.client_events(ev.StreamReset, late)[0].error_code == ErrorCodes.REFUSED_STREAM
    assert len(relay.server_events(ev.RequestReceived)) == 1
    usid = relay.server_events(ev.RequestReceived)[0].stream_id
    relay.server.send_headers(usid, [(b":status", b"204")], end_stream=True)
    await relay.settle()
    assert relay.client_events(ev.ResponseReceived, sid)
    assert relay.down_wire.closed and relay.down.close_if_idle() is True


async def test_client_half_close_answers_then_closes() -> None:
    relay = Relay()
    sid = await request(relay, end=True)
    assert relay.down.eof_received() is True  # keep writing: a stream is under way
    assert not relay.down_wire.closed
    usid = relay.server_events(ev.RequestReceived)[0].stream_id
    relay.server.send_headers(usid, [(b":status", b"200")], end_stream=True)
    await relay.settle()
    assert relay.client_events(ev.ResponseReceived, sid)
    assert relay.down_wire.closed
    assert Relay().down.eof_received() is False


async def test_unresolvable_route_upstream_gets_a_502_naming_route_and_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """A route whose Service is gone (its name does not resolve): 502 on that stream, naming both. The
    resolver's answer is stood in for, so that no DNS query leaves the machine."""
    import socket

    from shadow_image.router.h2_upstream import H2Pool

    async def no_such_name(*args: object, **kw: object) -> None:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(asyncio.get_running_loop(), "create_connection", no_such_name)
    table = RouteTable("svc", {80: 8080})
    table.set_routes([("version", "abcde")])
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    wire = Wire()
    down = H2Downstream(wire, table, 80, "10.1.2.3", pool=H2Pool())  # type: ignore[arg-type]
    client.send_headers(1, [*REQ, (b"version", b"abcde")], end_stream=True)
    down.data_received(client.data_to_send())
    events: list[ev.Event] = []
    for _ in range(100):
        await asyncio.sleep(0)
        events += client.receive_data(wire.take())
    assert dict(next(e for e in events if isinstance(e, ev.ResponseReceived)).headers)[b":status"] == b"502"
    body = b"".join(e.data for e in events if isinstance(e, ev.DataReceived))
    assert body == (b"502 Bad Gateway: cannot reach route 'VERSION: abcde' (svc-kt-mesh-abcde:8080): "
                    b"cannot resolve svc-kt-mesh-abcde: Name or service not known\n")
    assert any(isinstance(e, ev.StreamEnded) for e in events)


async def test_upstream_refused_stream_is_sent_again_once() -> None:
    relay = Relay()
    sid = await request(relay, end=True)
    first = relay.server_events(ev.RequestReceived)[0].stream_id
    relay.server.reset_stream(first, ErrorCodes.REFUSED_STREAM)
    await relay.settle()
    again = relay.server_events(ev.RequestReceived)
    assert [e.stream_id for e in again] == [first, first + 2]  # the same connection still takes streams
    relay.server.reset_stream(first + 2, ErrorCodes.REFUSED_STREAM)
    await relay.settle()
    assert relay.client_events(ev.StreamReset, sid)[0].error_code == ErrorCodes.REFUSED_STREAM
    assert relay.down.streams == {} and relay.up.streams == {}


async def test_request_bodies_for_an_unreachable_upstream_give_the_window_back() -> None:
    """Bodies that arrived while the upstream was being dialled are acknowledged when it fails: the
    client's connection window does not shrink with each 502."""
    relay = Relay()
    held: list[Stream] = []
    relay.down.pool = SimpleNamespace(attach=held.append)  # type: ignore[assignment]
    await relay.settle()
    sids = []
    for _ in range(5):
        sid = relay.client.get_next_available_stream_id()
        relay.client.send_headers(sid, [*REQ, (b"version", b"abcde")])
        send_all(relay.client, sid, b"z" * 500000)
        sids.append(sid)
    await relay.settle()
    assert relay.client.outbound_flow_control_window == h2_conn.CONN_WINDOW - 2500000
    for stream in held:
        stream.unreachable("Connection refused")
    await relay.settle()
    for sid in sids:
        got = relay.client_events(ev.ResponseReceived, sid)[0]
        assert dict(got.headers)[b":status"] == b"502"
    assert relay.client.outbound_flow_control_window == h2_conn.CONN_WINDOW


@pytest.mark.parametrize("bad", [
    [(b"version", b" abcde")], [(b"version", b"abcde ")], [(b"version", b"abcde\t")], [(b"Version", b"abcde")],
    [(b"connection", b"close")], [(b"te", b"gzip")], [(b"content-length", b"x")], [(b":path", b"/again")],
])
async def test_a_malformed_request_resets_its_stream_alone_and_its_neighbours_are_answered(bad) -> None:
    """RFC 9113 8.1.1: a malformed request is a stream error; h2 alone would end the connection."""
    relay = Relay()
    relay.client.config.validate_outbound_headers = False
    relay.client.config.normalize_outbound_headers = False
    relay.client.send_headers(1, [*REQ, (b"version", b"abcde")], end_stream=True)
    relay.client.send_headers(3, [*REQ, *bad], end_stream=True)
    relay.client.send_headers(5, REQ, end_stream=True)  # all three in one read
    await relay.settle()
    assert [e.error_code for e in relay.client_events(ev.StreamReset, 3)] == [ErrorCodes.PROTOCOL_ERROR]
    assert not [e for e in relay.at_client if isinstance(e, ev.ConnectionTerminated)]
    served = relay.server_events(ev.RequestReceived)
    assert len(served) == 2 and [u.route for u in relay.pool.picked] == [("version", "abcde"), None]
    for e in served:
        relay.server.send_headers(e.stream_id, [(b":status", b"204")], end_stream=True)
    await relay.settle()
    assert relay.client_events(ev.ResponseReceived, 1) and relay.client_events(ev.ResponseReceived, 5)
    # The connection goes on.
    sid = await request(relay, [*REQ, (b"version", b"abcde")], end=True)
    assert sid == 7 and len(relay.server_events(ev.RequestReceived)) == 3


async def test_malformed_trailers_reset_the_stream_both_ways() -> None:
    relay = Relay()
    relay.client.config.validate_outbound_headers = False
    relay.client.config.normalize_outbound_headers = False
    sid = await request(relay, [*REQ, (b"version", b"abcde")])
    relay.client.send_headers(sid, [(b"X-Sum", b"1")], end_stream=True)
    other = await request(relay, REQ, end=True)
    assert [e.error_code for e in relay.client_events(ev.StreamReset, sid)] == [ErrorCodes.PROTOCOL_ERROR]
    assert [e.error_code for e in relay.server_events(ev.StreamReset)] == [ErrorCodes.PROTOCOL_ERROR]
    usid = relay.server_events(ev.RequestReceived)[-1].stream_id
    relay.server.send_headers(usid, [(b":status", b"204")], end_stream=True)
    await relay.settle()
    assert relay.client_events(ev.ResponseReceived, other)


ZERO_WINDOW_UPDATE = b"\x00\x00\x04\x08\x00\x00\x00\x00\x00" + b"\x00\x00\x00\x00"  # a connection error


async def test_a_connection_error_sends_goaway_half_closes_and_reads_on_for_a_while(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Closing at once with bytes unread would send a TCP reset that can destroy the GOAWAY."""
    monkeypatch.setattr(h2_route, "LINGER_TIME", 0.05)
    relay = Relay()
    relay.down_wire.half_closable = True
    await request(relay, end=True)
    relay.down.data_received(ZERO_WINDOW_UPDATE)
    events = relay.client.receive_data(relay.down_wire.take())
    assert [e.error_code for e in events if isinstance(e, ev.ConnectionTerminated)] == [ErrorCodes.PROTOCOL_ERROR]
    assert relay.down_wire.eof and not relay.down_wire.closed
    relay.down.data_received(b"x" * 1000)  # read and dropped
    assert not relay.down_wire.closed and not relay.down_wire.buf
    assert [e.error_code for e in relay.server_events(ev.StreamReset)] == []  # not yet flushed upstream
    await asyncio.sleep(0.1)
    assert relay.down_wire.closed


async def test_a_lingering_connection_closes_after_enough_bytes() -> None:
    relay = Relay()
    relay.down_wire.half_closable = True
    relay.down.data_received(relay.client.data_to_send() + ZERO_WINDOW_UPDATE)
    assert relay.down_wire.eof and not relay.down_wire.closed
    relay.down.data_received(b"x" * h2_route.LINGER_BYTES)
    assert not relay.down_wire.closed
    relay.down.data_received(b"x")
    assert relay.down_wire.closed


async def test_a_repeated_route_header_gets_a_400_on_its_stream_alone() -> None:
    relay = Relay()
    relay.client.send_headers(1, [*REQ, (b"version", b"other"), (b"version", b"abcde")], end_stream=True)
    relay.client.send_headers(3, [*REQ, (b"version", b"abcde"), (b"version", b"abcde")])  # a body to come
    relay.client.send_data(3, b"body", end_stream=True)
    relay.client.send_headers(5, [*REQ, (b"version", b"abcde")], end_stream=True)
    await relay.settle()
    for sid in (1, 3):
        assert [dict(e.headers)[b":status"] for e in relay.client_events(ev.ResponseReceived, sid)] == [b"400"]
        assert relay.body_at_client(sid) == b"ktproxy mesh: bad request: the route header VERSION more than once\n"
    assert [u.route for u in relay.pool.picked] == [("version", "abcde")]  # only stream 5 went upstream
    served = relay.server_events(ev.RequestReceived)
    assert len(served) == 1
    relay.server.send_headers(served[0].stream_id, [(b":status", b"204")], end_stream=True)
    await relay.settle()
    assert relay.client_events(ev.ResponseReceived, 5)
    sid = await request(relay, [*REQ, (b"version", b"abcde"), (b"VERSION", b"x")])  # its body never sent
    assert [dict(e.headers)[b":status"] for e in relay.client_events(ev.ResponseReceived, sid)] == [b"400"]
    assert [e.error_code for e in relay.client_events(ev.StreamReset, sid)] == [ErrorCodes.NO_ERROR]
