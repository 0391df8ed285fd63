"""What both ends of the HTTP/2 relay share: how an h2 connection is configured, the Headers type, and
a `Side` (one h2 connection plus its transport, and the streams on it) that batches its writes and knows
whether it may take more data.

Flow control is the relay's whole memory bound: a Side never acknowledges received DATA itself; the
stream that moves the bytes to the other Side acknowledges them once that Side accepted them (h2.py
`acknowledge_received_data`), so a slow reader on one end throttles the writer on the other.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

from h2.config import H2Configuration
from h2.connection import ConnectionInputs, ConnectionState, H2Connection, H2ConnectionStateMachine
from h2.errors import ErrorCodes
from h2.events import StreamReset
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes
from h2.stream import H2Stream

Headers = list[tuple[bytes, bytes]]

# What a Side's streams are is its owner's business (an H2Downstream keeps h2_route.Streams, an
# UpstreamConn h2_upstream.RoutedStreams); a Side only keeps them by stream id, so it needs only a type.
StreamT = TypeVar("StreamT")

# Per stream: how much one side may send before we forwarded it; per connection: the sum. The
# connection window is several stream windows so that one stalled stream does not stall the others.
STREAM_WINDOW = 1 << 19
CONN_WINDOW = 1 << 22
# Inbound frames stay at the default 16 KiB: h2 4.4 applies a larger SETTINGS_MAX_FRAME_SIZE only to the
# next receive_data() call, so a peer that sends the ACK and a large frame in one segment gets a
# FRAME_SIZE_ERROR (seen with the h2 test client).
MAX_FRAME = 1 << 14
MAX_STREAMS = 256

# h2 treats a received GOAWAY as the end of the connection and refuses every later frame, but a GOAWAY
# only forbids new streams: the ones up to its last-stream-id still complete (RFC 9113 6.8; gRPC servers
# and curl send one before they finish). The relay decides itself when a connection that got one is
# done, so receiving GOAWAY keeps the connection open in the state machine.
_TRANSITIONS = dict(H2ConnectionStateMachine._transitions)
for _state in (ConnectionState.CLIENT_OPEN, ConnectionState.SERVER_OPEN):
    _TRANSITIONS[(_state, ConnectionInputs.RECV_GOAWAY)] = (None, _state)


class MalformedHeaders(ProtocolError):
    """A header block that decoded fine (so HPACK state is intact) but breaks RFC 9113 8.2/8.3: upper-case
    name, value with surrounding whitespace, connection-specific field, bad pseudo-headers, invalid
    content-length. A stream error (8.1.1), not a connection error."""


class _RelayStream(H2Stream):
    """h2's stream, with the checks it runs on a received header block (after the stream state machine
    accepted it) raising MalformedHeaders instead of a connection-ending ProtocolError."""

    def _initialize_content_length(self, headers):  # type: ignore[no-untyped-def]
        try:
            super()._initialize_content_length(headers)
        except MalformedHeaders:
            raise
        except ProtocolError as e:
            raise MalformedHeaders(str(e)) from e

    def _process_received_headers(self, headers, header_validation_flags, header_encoding):  # type: ignore[no-untyped-def]
        try:
            return super()._process_received_headers(headers, header_validation_flags, header_encoding)
        except ProtocolError as e:
            raise MalformedHeaders(str(e)) from e


class RelayConnection(H2Connection):
    """h2's connection where one malformed request (or response) resets its stream alone
    (RST_STREAM PROTOCOL_ERROR) and is reported as a StreamReset event, so the streams beside it, and the
    events of the same read, carry on. h2 itself would end the whole connection with GOAWAY."""

    def _begin_new_stream(self, stream_id, allowed_ids):  # type: ignore[no-untyped-def]
        stream = super()._begin_new_stream(stream_id, allowed_ids)
        stream.__class__ = _RelayStream
        return stream

    def _receive_headers_frame(self, frame):  # type: ignore[no-untyped-def]
        try:
            return super()._receive_headers_frame(frame)
        except MalformedHeaders as e:
            self.config.logger.debug("malformed header block on stream %d: %s", frame.stream_id, e)
            stream = self.streams[frame.stream_id]
            event = StreamReset(stream_id=frame.stream_id, error_code=ErrorCodes.PROTOCOL_ERROR, remote_reset=False)
            return stream.reset_stream(ErrorCodes.PROTOCOL_ERROR), [event]


def new_connection(client_side: bool) -> H2Connection:
    """An h2 connection with the relay's settings. Headers stay bytes; what we forward was validated
    on the way in, so outbound validation is skipped (it would only cost time)."""
    config = H2Configuration(client_side=client_side, header_encoding=None,
                             validate_outbound_headers=False, normalize_outbound_headers=False)
    conn = RelayConnection(config=config)
    conn.state_machine._transitions = _TRANSITIONS  # type: ignore[misc]
    settings = {SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW, SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS}
    if client_side:
        settings[SettingCodes.ENABLE_PUSH] = 0
    conn.initiate_connection()
    # Applied by h2 once the peer acknowledges them, as RFC 9113 6.5.3 wants.
    conn.update_settings(settings)  # type: ignore[arg-type]
    conn.increment_flow_control_window(CONN_WINDOW - 65535)
    return conn


class Side(Generic[StreamT]):
    """One h2 connection of the relay and the transport under it. Frames h2 queues are written once per
    loop iteration (mark()), however many streams produced them."""

    def __init__(self, conn: H2Connection, transport: asyncio.BaseTransport | None) -> None:
        self.h2 = conn
        self.transport: asyncio.BaseTransport | None = transport
        self.streams: dict[int, StreamT] = {}
        self.paused = False  # the transport's buffer is full: move no DATA into it
        self.closed = False
        self._flush_due = False
        self._loop = asyncio.get_running_loop()

    def mark(self) -> None:
        """h2 queued frames: write them at the end of this loop iteration."""
        if not self._flush_due and not self.closed:
            self._flush_due = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_due = False
        data = self.h2.data_to_send()
        if data and not self.closed and self.transport is not None:
            self.transport.write(data)  # type: ignore[attr-defined]

    def close(self) -> None:
        """Write what is queued (a GOAWAY, say) and close the transport."""
        if self.closed:
            return
        self.flush()
        self.closed = True
        if self.transport is not None:
            self.transport.close()
