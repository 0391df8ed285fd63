"""The one SSH session every proxied stream rides on.

It owns reconnection: when the transport (a port-forward, or plain TCP in tests) or the shadow pod
goes away, the next stream request, or the supervisor, rebuilds the session through the `connector`
the command supplied, and remote forwards are registered again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncssh

from ktproxy.keys import SessionKeys
from ktwire.sshwire import CIPHERS, MAX_PKTSIZE, WINDOW

log = logging.getLogger("ktproxy.tunnel")

Connector = Callable[["SSHOptions"], Awaitable[asyncssh.SSHClientConnection]]


class TunnelDown(ConnectionError):
    """The SSH session is gone and could not be rebuilt (yet)."""


@dataclass
class SSHOptions:
    client_key: asyncssh.SSHKey
    host_key: asyncssh.SSHKey  # the shadow's public host key: the only one accepted
    keepalive_interval: float = 15.0
    keepalive_count_max: int = 3
    ciphers: list[str] = field(default_factory=lambda: list(CIPHERS))

    def connect_kwargs(self) -> dict[str, Any]:
        """Arguments for asyncssh.connect shared by every transport."""
        return dict(
            username="kt",
            client_keys=[self.client_key],
            # Pinned: the only host key accepted is the one this session generated.
            known_hosts=([self.host_key], [], []),
            keepalive_interval=self.keepalive_interval,
            keepalive_count_max=self.keepalive_count_max,
            encryption_algs=self.ciphers,
            compression_algs=None,
            agent_path=None,
            config=[],
            preferred_auth=["publickey"],
            window=WINDOW,
            max_pktsize=MAX_PKTSIZE,
        )


    @classmethod
    def for_session(cls, keys: SessionKeys, **kwargs: Any) -> SSHOptions:
        return cls(keys.client_key, keys.host_key_public, **kwargs)


async def connect_tcp(host: str, port: int, options: SSHOptions) -> asyncssh.SSHClientConnection:
    """A session over plain TCP (the shadow server run locally, or any reachable address)."""
    return await asyncssh.connect(host, port, **options.connect_kwargs())


RemoteForward = tuple[str, int, Callable[..., Any]]


class SSHTunnel:
    """Opens streams through the shadow pod and keeps the session alive across failures."""

    def __init__(self, connector: Connector, options: SSHOptions, *, name: str = "shadow") -> None:
        self._connector = connector
        self._options = options
        self._name = name
        self._conn: asyncssh.SSHClientConnection | None = None
        self._lock = asyncio.Lock()
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False
        self._remote_forwards: list[RemoteForward] = []
        self._listeners: list[asyncssh.SSHListener] = []
        self.reconnects = 0

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def start(self) -> None:
        await self._ensure()
        self._supervisor = asyncio.create_task(self._supervise())

    async def _ensure(self) -> asyncssh.SSHClientConnection:
        conn = self._conn
        if conn is not None and not conn.is_closed():
            return conn
        async with self._lock:
            if self._conn is not None and not self._conn.is_closed():
                return self._conn
            if self._closing:
                raise TunnelDown("tunnel is closing")
            first = self._conn is None and self.reconnects == 0
            try:
                self._conn = await self._connector(self._options)
            except asyncssh.PermissionDenied as exc:
                raise TunnelDown(f"the {self._name} refused this session's key ({exc.reason})") from exc
            except asyncssh.HostKeyNotVerifiable as exc:
                raise TunnelDown(f"the {self._name}'s host key is not the pinned one ({exc.reason})") from exc
            except (TimeoutError, OSError, asyncssh.Error) as exc:
                raise TunnelDown(f"cannot reach the {self._name}: {exc}") from exc
            if not first:
                self.reconnects += 1
                log.info("session to the %s re-established", self._name)
            await self._register_remote_forwards()
            return self._conn

    async def _supervise(self) -> None:
        """Rebuild the session as soon as it drops, so the first request after an outage is quick."""
        delay = 0.5
        while not self._closing:
            conn = self._conn
            if conn is not None and not conn.is_closed():
                await conn.wait_closed()
                if self._closing:
                    return
                log.warning("session to the %s lost; reconnecting", self._name)
            try:
                await self._ensure()
                delay = 0.5
            except TunnelDown as exc:
                log.warning("%s; retrying in %.0f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)

    async def open_connection(self, host: str, port: int) -> tuple[asyncssh.SSHReader, asyncssh.SSHWriter]:
        """A TCP stream from the shadow pod to host:port (names resolved in the pod)."""
        conn = await self._ensure()
        try:
            return await conn.open_connection(host, port)
        except asyncssh.ChannelOpenError:
            raise
        except (OSError, asyncssh.Error) as exc:
            # The session died under us: one retry on a fresh session.
            log.debug("open_connection on a dead session (%s); retrying", exc)
            conn = await self._ensure()
            return await conn.open_connection(host, port)

    async def create_connection(self, session_factory: Callable[[], asyncssh.SSHTCPSession],
                                host: str, port: int) -> tuple[asyncssh.SSHTCPChannel, Any]:
        conn = await self._ensure()
        return await conn.create_connection(session_factory, host, port)

    async def forward_remote_port(self, listen_host: str, listen_port: int,
                                  handler: Callable[..., Any]) -> None:
        """A listener inside the pod whose connections are handed to `handler`; kept across reconnects."""
        self._remote_forwards.append((listen_host, listen_port, handler))
        conn = await self._ensure()
        self._listeners.append(await conn.start_server(handler, listen_host, listen_port))

    async def _register_remote_forwards(self) -> None:
        assert self._conn is not None
        self._listeners = []
        for host, port, handler in self._remote_forwards:
            self._listeners.append(await self._conn.start_server(handler, host, port))
            log.info("remote forward %s:%s registered again", host or "*", port)

    async def close(self) -> None:
        self._closing = True
        if self._supervisor:
            self._supervisor.cancel()
        if self._conn is not None:
            self._conn.close()
            try:
                await asyncio.wait_for(self._conn.wait_closed(), 5)
            except (TimeoutError, OSError):
                pass
