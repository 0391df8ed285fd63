"""A connection accepted on an exposed port, relayed to the laptop over a forwarded-tcpip channel.

asyncssh's own SSHForwarder does the relaying (flow control both ways, half-close), as it does for the
shadow's direct-tcpip channels; this class only picks the session, opens the channel and hands over
what the client sent while it was opening.
"""

from __future__ import annotations

import asyncio
import functools
import logging

import asyncssh

from shadow_image.ports import Attachment, ExposedPort

log = logging.getLogger("shadow.inbound")

# A session whose peer died silently never answers a channel open; past this the client is let go
# instead of hanging until the server keepalive gives up on the session (90-120 s).
OPEN_TIMEOUT = 10.0


class _ChannelSide(asyncssh.SSHForwarder):
    def session_started(self) -> None:
        # asyncssh calls this right after the channel is open, before any other event runs: the only
        # moment the early bytes and EOF can go out ahead of what the client sends next.
        assert isinstance(self._peer, InboundForwarder)
        self._peer.channel_open()


class InboundForwarder(asyncssh.SSHForwarder):
    def __init__(self, port: ExposedPort) -> None:
        super().__init__()
        self._port = port
        self._orig = ("", 0)
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self._orig = (str(peer[0]), int(peer[1])) if peer else ("", 0)
        owners = self._port.owners_newest_first()
        if not owners:
            log.info("port %d: closed a connection from %s:%s: no laptop attached", self._port.number, *self._orig)
            transport.close()
            return
        self._port.spawn(self._connect(owners))

    def data_received(self, data: bytes, datatype: int | None = None) -> None:
        super().data_received(data, datatype)
        if self._peer is None and not self._paused and self._transport is not None:
            # Hold at most one read while the channel opens (uvloop ignores a pause in connection_made).
            self._paused = True
            self._transport.pause_reading()

    async def _connect(self, owners: list[Attachment]) -> None:
        for attachment in owners:
            opening = asyncio.ensure_future(attachment.open(functools.partial(_ChannelSide, self), *self._orig))
            try:
                done, _ = await asyncio.wait({opening}, timeout=OPEN_TIMEOUT)
            finally:
                if not opening.done():  # timed out, or the shadow is stopping
                    self.close()  # a channel that still opens finds us closed and closes too (channel_open)
            if not done:
                log.warning("port %d: %s did not open a channel within %.0f s; closed the connection from %s:%s",
                            self._port.number, attachment.session.name, OPEN_TIMEOUT, *self._orig)
                return
            exc = opening.exception()
            if exc is None:
                return
            # A session that is closing or has cancelled its forward: the next older one may serve.
            log.info("port %d: %s refused a channel: %r", self._port.number, attachment.session.name, exc)
        self.close()

    def channel_open(self) -> None:
        if self._transport is None:  # the client left, or we gave up, while the channel was opening
            self.close()
            return
        assert self._peer is not None
        if self._inpbuf:
            self._peer.write(self._inpbuf)
            self._inpbuf = b""
        if self._eof_received:
            self._peer.write_eof()
        if self._paused:
            self._paused = False
            self._transport.resume_reading()
