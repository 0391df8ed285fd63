"""A minimal in-process SSH server standing in for the shadow, with the knobs the tunnel tests need.

It forwards direct-tcpip opens itself (loopback targets only in these tests) and grants tcpip-forward
by listening on 127.0.0.1:<port> and opening forwarded-tcpip channels for ("", port), as the shadow
does for exposed ports. Everything it counts is per session, so tests can say "exactly once".
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncssh

from ktproxy.tunnel.session import SSHOptions, connect_tcp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class FakeShadow:
    client_key: asyncssh.SSHKey
    host_key: asyncssh.SSHKey
    port: int = 0
    sessions: list[asyncssh.SSHServerConnection] = field(default_factory=list)
    forwards: list[tuple[int, int]] = field(default_factory=list)  # (session index, port) per request
    opens: list[tuple[int, str, int]] = field(default_factory=list)  # (session index, host, port)
    refuse_ports: dict[int, int] = field(default_factory=dict)  # port -> how many requests to refuse
    refuse_opens: bool = False
    die_on_open: int = 0  # the next N opens abort their session instead of answering
    open_gate: asyncio.Event | None = None  # opens wait for it before the shadow dials
    hosts: dict[str, str] = field(default_factory=dict)  # the pod's resolver, for names (no DNS query)
    acceptor: asyncssh.SSHAcceptor | None = None

    async def start(self) -> FakeShadow:
        authorized = asyncssh.import_authorized_keys(self.client_key.export_public_key().decode())
        self.acceptor = await asyncssh.create_server(
            lambda: _Server(self), "127.0.0.1", self.port, server_host_keys=[self.host_key],
            authorized_client_keys=authorized, keepalive_interval=0)
        self.port = self.acceptor.sockets[0].getsockname()[1]
        return self

    def options(self) -> SSHOptions:
        return SSHOptions(self.client_key, self.host_key.convert_to_public())

    async def connect(self, options: SSHOptions) -> asyncssh.SSHClientConnection:
        return await connect_tcp("127.0.0.1", self.port, options)

    def drop(self) -> None:
        """The shadow side loses every session (pod restarted, port-forward cut)."""
        for conn in self.sessions:
            conn.abort()

    async def close(self) -> None:
        self.drop()
        if self.acceptor is not None:
            self.acceptor.close()
            await self.acceptor.wait_closed()


class _Server(asyncssh.SSHServer):
    def __init__(self, shadow: FakeShadow) -> None:
        self.shadow = shadow
        self.index = -1
        self.conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        self.index = len(self.shadow.sessions)
        self.shadow.sessions.append(conn)

    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> Any:
        return self._open(dest_host, dest_port)

    async def _open(self, host: str, port: int) -> asyncssh.SSHTCPSession:
        shadow, conn = self.shadow, self.conn
        assert conn is not None
        shadow.opens.append((self.index, host, port))
        if shadow.die_on_open > 0:
            shadow.die_on_open -= 1
            conn.abort()
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "session aborted")
        if shadow.refuse_opens:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "Connection refused")
        if shadow.open_gate is not None:
            await shadow.open_gate.wait()
        return await conn.forward_connection(shadow.hosts.get(host, host), port)

    def server_requested(self, listen_host: str, listen_port: int) -> Any:
        shadow, conn = self.shadow, self.conn
        assert conn is not None
        shadow.forwards.append((self.index, listen_port))
        if shadow.refuse_ports.get(listen_port, 0) > 0:
            shadow.refuse_ports[listen_port] -= 1
            return False
        # Loopback only; connections arrive at the client as forwarded-tcpip for (listen_host, port).
        return conn.forward_local_port("127.0.0.1", listen_port, listen_host, listen_port)


@dataclass
class ScriptedConnector:
    """The connector the tunnel calls: counts calls and cancellations, and plays a script of
    outcomes (an exception to raise, or an awaitable to wait for first) before connecting."""

    shadow: FakeShadow
    script: list[BaseException | Callable[[], Awaitable[None]]] = field(default_factory=list)
    calls: int = 0
    cancelled: int = 0
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    failed: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, options: SSHOptions) -> asyncssh.SSHClientConnection:
        self.calls += 1
        self.entered.set()
        step = self.script.pop(0) if self.script else None
        try:
            if isinstance(step, BaseException):
                self.failed.set()
                raise step
            if step is not None:
                await step()
            return await self.shadow.connect(options)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
