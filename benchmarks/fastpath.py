"""Experiment (tuning study): a Protocol-level relay between a local TCP connection and an SSH channel.

Measured: no gain over ktproxy/proxy/relay.py (CPU per GB and throughput unchanged within noise; the
cost is in asyncssh's packet layer, on both SSH ends alike), so it is NOT wired into the proxy. It lives
here so the tuning study can keep measuring it (`benchmarks.launch --fastpath`).

The stream relay (relay.py) moves each chunk through two StreamReaders, two tasks and a drain per
chunk. Here the local socket's protocol hands bytes straight to `SSHChannel.write` and the channel's
session hands received bytes straight to `transport.write`, like asyncssh's own SSHForwarder: no
buffers of our own, no tasks, no copies beyond the ones the transports make.

Semantics match relay.py:
- back-pressure: when one side's transport stops accepting writes (pause_writing), reading from the
  other side stops (pause_reading) until it drains; SSH windows then push back to the sender;
- half-close: EOF from one side becomes write_eof on the other; the opposite direction keeps flowing;
  both are closed once EOF has been seen both ways, or as soon as either side fails or closes.

API:
    stream = await open_stream(tunnel, host, port)   # tunnel: anything with create_connection(factory,
                                                     # host, port) -> (channel, session), e.g. SSHTunnel
                                                     # or an asyncssh connection; raises like
                                                     # open_connection (asyncssh.ChannelOpenError...)
    ... reply to the client (SOCKS5 success / "200 Connection established") ...
    await splice(reader, writer, stream)             # takes over the local connection until both end

`splice` detaches the local connection from its asyncio StreamReader: bytes the reader already
buffered (a client that pipelined data behind its handshake) are sent first.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncssh


class TunnelStream(asyncssh.SSHTCPSession[bytes]):
    """The SSH channel's side. Until `splice` attaches a local transport, received bytes are kept."""

    def __init__(self) -> None:
        self.chan: asyncssh.SSHTCPChannel[bytes] | None = None
        self._local: _LocalSide | None = None
        self._pending: list[bytes] = []
        self._pending_eof = False
        self.eof_received_from_channel = False
        self.closed = asyncio.get_running_loop().create_future()

    # asyncssh.SSHTCPSession callbacks
    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:  # type: ignore[override]
        self.chan = chan

    def data_received(self, data: bytes, datatype: Any) -> None:
        local = self._local
        if local is not None and local.transport is not None:
            local.transport.write(data)
        else:
            self._pending.append(data)

    def eof_received(self) -> bool:
        self.eof_received_from_channel = True
        local = self._local
        if local is None:
            self._pending_eof = True
            return True
        local.write_eof()
        # Keep the channel open while the local side still sends; close once both directions ended.
        return not local.eof_seen

    def pause_writing(self) -> None:  # the channel's send window/buffer is full: stop reading locally
        if self._local is not None and self._local.transport is not None:
            with contextlib.suppress(Exception):
                self._local.transport.pause_reading()

    def resume_writing(self) -> None:
        if self._local is not None and self._local.transport is not None:
            with contextlib.suppress(Exception):
                self._local.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._local is not None:
            self._local.close()
        if not self.closed.done():
            self.closed.set_result(None)

    # used by the local side and by callers
    def write(self, data: bytes) -> None:
        if self.chan is not None:
            with contextlib.suppress(Exception):
                self.chan.write(data)

    def write_eof(self) -> None:
        if self.chan is not None:
            with contextlib.suppress(Exception):
                self.chan.write_eof()

    def close(self) -> None:
        if self.chan is not None:
            self.chan.close()
        elif not self.closed.done():
            self.closed.set_result(None)


class _LocalSide(asyncio.Protocol):
    def __init__(self, stream: TunnelStream, transport: asyncio.Transport) -> None:
        self.stream = stream
        self.transport: asyncio.Transport | None = transport
        self.eof_seen = False
        self.closed = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.stream.write(data)

    def eof_received(self) -> bool:
        self.eof_seen = True
        self.stream.write_eof()
        if self.stream.eof_received_from_channel:
            self.stream.close()
            return False
        return True  # half-close: keep the socket open for the other direction

    def write_eof(self) -> None:
        if self.transport is not None:
            with contextlib.suppress(Exception):
                if self.transport.can_write_eof():
                    self.transport.write_eof()
            if self.eof_seen:
                self.close()

    def pause_writing(self) -> None:  # local socket is full: stop taking from the channel
        if self.stream.chan is not None:
            self.stream.chan.pause_reading()

    def resume_writing(self) -> None:
        if self.stream.chan is not None:
            self.stream.chan.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.stream.close()
        if not self.closed.done():
            self.closed.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_stream(tunnel: Any, host: str, port: int) -> TunnelStream:
    """A direct-tcpip channel to host:port whose session is a TunnelStream."""
    _chan, stream = await tunnel.create_connection(TunnelStream, host, port)
    return stream


async def splice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stream: TunnelStream) -> None:
    """Relay between the local connection (reader, writer) and `stream` until both have ended."""
    transport = writer.transport
    if transport.is_closing():
        stream.close()
        return
    buffered = bytes(getattr(reader, "_buffer", b""))  # what the handshake parser read ahead
    local_eof = reader.at_eof() or bool(getattr(reader, "_eof", False))
    local = _LocalSide(stream, transport)  # type: ignore[arg-type]
    transport.set_protocol(local)
    stream._local = local
    if buffered:
        stream.write(buffered)
    if local_eof:
        local.eof_received()
    elif getattr(reader, "_paused", False):
        transport.resume_reading()  # the StreamReader had paused on a full buffer
    pending, stream._pending = stream._pending, []
    for data in pending:
        transport.write(data)
    if stream._pending_eof:
        local.write_eof()
    try:
        await asyncio.wait([local.closed, stream.closed], return_when=asyncio.FIRST_COMPLETED)
        # One side is gone: the other is closed by the callbacks; wait briefly for it to finish.
        await asyncio.wait([local.closed, stream.closed], timeout=5)
    finally:
        local.close()
        stream.close()


def install_for_benchmark(server_module: Any) -> None:
    """benchmarks.launch --fastpath: route SOCKS and CONNECT tunnel streams through splice without
    editing server.py/dialer.py (absolute-URI HTTP proxying keeps the stream path)."""
    from ktproxy.proxy import dialer as dialer_module

    ProxyServer = server_module.ProxyServer
    stream_relay = server_module.relay
    orig_dial_http = ProxyServer._dial_http

    class _Tunnel:
        def __init__(self, tunnel: Any) -> None:
            self.tunnel = tunnel

        async def open_connection(self, host: str, port: int) -> tuple[Any, Any]:
            stream = await open_stream(self.tunnel, host, port)
            return stream, stream

    async def relay(a_reader: Any, a_writer: Any, b_reader: Any, b_writer: Any) -> None:
        if isinstance(b_reader, TunnelStream):
            await splice(a_reader, a_writer, b_reader)
        else:
            await stream_relay(a_reader, a_writer, b_reader, b_writer)

    async def dial_http(self: Any, host: str, port: int) -> Any:
        plain = dialer_module.Dialer(self.dialer.rules, self.dialer.tunnel.tunnel)
        saved, self.dialer = self.dialer, plain
        try:
            return await orig_dial_http(self, host, port)
        finally:
            self.dialer = saved

    orig_init = ProxyServer.__init__

    def init(self: Any, dialer: Any, *args: Any, **kwargs: Any) -> None:
        dialer.tunnel = _Tunnel(dialer.tunnel)
        orig_init(self, dialer, *args, **kwargs)

    ProxyServer.__init__ = init
    ProxyServer._dial_http = dial_http
    server_module.relay = relay
