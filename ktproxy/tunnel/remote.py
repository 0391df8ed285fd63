"""Reverse channels: ports the shadow listens on for us, connections relayed to a local address.

Each session asks the shadow once per port (tcpip-forward for ("", port)); the shadow then opens a
forwarded-tcpip channel per connection and asyncssh dials the local address and relays both ways,
half-close included. A session counts as up only when every port has been granted. Observers hear of
each arriving connection with the peer the shadow saw, which is how a command proves that traffic
sent to a Service really reaches the laptop.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncssh

log = logging.getLogger("ktproxy.tunnel")

# The shadow listens on its own chosen addresses; the request names only the port.
ANY_ADDRESS = ""


# remote port, and the peer (host, port) the shadow accepted the connection from
ArrivalCallback = Callable[[int, str, int], None]


class PortRefused(ConnectionError):
    """The shadow would not listen on a port for us."""


@dataclass(frozen=True)
class Exposure:
    remote_port: int
    local_host: str
    local_port: int

    def __str__(self) -> str:
        return f"remote port {self.remote_port} forwarded to {self.local_host}:{self.local_port}"


class RemotePorts:
    """The wanted exposures, and the listeners the current session holds for them."""

    def __init__(self) -> None:
        self._wanted: dict[int, Exposure] = {}
        self._listeners: dict[int, asyncssh.SSHListener] = {}
        self._session: asyncssh.SSHClientConnection | None = None
        self._announced: set[int] = set()
        self.arrivals: list[ArrivalCallback] = []

    def add(self, exposure: Exposure) -> None:
        old = self._wanted.get(exposure.remote_port)
        if old is not None:
            raise ValueError(f"remote port {old.remote_port} is already forwarded to "
                             f"{old.local_host}:{old.local_port}")
        self._wanted[exposure.remote_port] = exposure

    def discard(self, remote_port: int) -> None:
        self._wanted.pop(remote_port, None)

    async def request_all(self, conn: asyncssh.SSHClientConnection) -> None:
        """Ask a new session for every wanted port; raises PortRefused on the first refusal."""
        self.release()
        self._session = conn
        again = 0
        # Loop: an expose() while a request is in flight adds a port this session must also get.
        while missing := [e for port, e in self._wanted.items() if port not in self._listeners]:
            for exposure in missing:
                if self._session is not conn:
                    raise ConnectionError("the session was released while its ports were requested")
                again += not await self.request(conn, exposure)
        if again:
            log.info("%d remote port(s) forwarded again", again)

    async def request(self, conn: asyncssh.SSHClientConnection, exposure: Exposure) -> bool:
        """One port on `conn`; True when it is the port's first grant (and logged as such)."""
        port = exposure.remote_port
        try:
            listener = await conn.create_server(self._forwarder(conn, exposure), ANY_ADDRESS, port)
        except asyncssh.ChannelListenError as exc:
            raise PortRefused(f"the shadow refused to listen on port {port} ({exc})") from exc
        if conn is not self._session or self._wanted.get(port) != exposure or port in self._listeners:
            listener.close()  # a newer session (or a second request) already holds this port
            return False
        self._listeners[port] = listener
        if port in self._announced:
            return False
        self._announced.add(port)
        log.info("%s", exposure)
        return True

    def _forwarder(self, conn: asyncssh.SSHClientConnection,
                   exposure: Exposure) -> Callable[[str, int], Awaitable[asyncssh.SSHTCPSession]]:
        """What asyncssh's forward_remote_port does per connection (dial the local address and relay),
        after telling the observers who connected."""
        def session_factory(orig_host: str, orig_port: int) -> Awaitable[asyncssh.SSHTCPSession]:
            for callback in list(self.arrivals):
                try:
                    callback(exposure.remote_port, orig_host, orig_port)
                except Exception:  # an observer's bug must not cost the connection
                    log.exception("arrival callback failed")
            return conn.forward_connection(exposure.local_host, exposure.local_port)

        return session_factory

    def release(self) -> None:
        """Close the listeners of the session that ended (or of the tunnel, at close)."""
        listeners, self._listeners = self._listeners, {}
        self._session = None
        for listener in listeners.values():
            listener.close()
