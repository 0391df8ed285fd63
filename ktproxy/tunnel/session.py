"""The one SSH session every proxied stream rides on.

Reconnection has one owner, the supervisor (supervisor.py): when the transport (a port-forward, or
plain TCP in tests) or the shadow pod goes away, it rebuilds the session through the `connector` the
command supplied and asks for the exposed remote ports again (remote.py). Stream opens only wait for
the session, within their own deadline.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncssh

from ktproxy.tunnel.channels import close_channel, close_stream, open_shielded, session_gone
from ktproxy.tunnel.keys import SessionKeys
from ktproxy.tunnel.remote import ArrivalCallback, Exposure, PortRefused, RemotePorts
from ktproxy.tunnel.supervisor import StateCallback, Supervisor, TunnelDown
from ktwire.sshwire import CIPHERS, MAX_PKTSIZE, WINDOW

log = logging.getLogger("ktproxy.tunnel")

__all__ = ["Connector", "PortRefused", "SSHOptions", "SSHTunnel", "TunnelDown", "connect_tcp"]

T = TypeVar("T")

Connector = Callable[["SSHOptions"], Awaitable[asyncssh.SSHClientConnection]]


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


class SSHTunnel:
    """Opens streams through the shadow pod and keeps the session alive across failures."""

    def __init__(self, connector: Connector, options: SSHOptions, *, name: str = "shadow",
                 backoff: tuple[float, float] = (0.5, 10.0)) -> None:
        self._connector = connector
        self._options = options
        self._name = name
        self._ports = RemotePorts()
        self._supervisor: Supervisor[asyncssh.SSHClientConnection] = Supervisor(
            self._connect, name=name, backoff=backoff, on_down=lambda _conn: self._ports.release())

    @property
    def is_up(self) -> bool:
        return self._supervisor.is_up

    @property
    def reconnects(self) -> int:
        """Sessions rebuilt since start()."""
        return self._supervisor.reconnects

    @property
    def arrivals(self) -> list[ArrivalCallback]:
        """Callbacks called with (remote port, peer host, peer port) for each connection an exposed port
        relays to this machine."""
        return self._ports.arrivals

    @property
    def state_changed(self) -> list[StateCallback]:
        """Callbacks called with True when a session is up (ports granted), False when it dropped."""
        return self._supervisor.state_changed

    async def start(self) -> None:
        """The first connect (its failure is raised as TunnelDown); from then on the supervisor reconnects."""
        await self._supervisor.start()

    async def wait_up(self, timeout: float | None = None) -> asyncssh.SSHClientConnection:  # noqa: ASYNC109
        """The live session; TimeoutError after `timeout` s, TunnelDown when the attempt waited for fails."""
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        return await self._supervisor.wait_up(deadline)

    async def expose(self, remote_port: int, local_host: str, local_port: int) -> None:
        """Have the shadow listen on `remote_port` and relay its connections to local_host:local_port,
        on this session (at once, when up) and on every later one. Raises PortRefused if the live
        session's shadow will not listen there."""
        exposure = Exposure(remote_port, local_host, local_port)
        self._ports.add(exposure)
        conn = self._supervisor.session
        if conn is None or conn.is_closed():
            return  # the supervisor's next session asks for it before it counts as up
        try:
            await self._ports.request(conn, exposure)
        except Exception:
            if conn.is_closed():
                return  # the session died under the request: the next one asks again
            self._ports.discard(remote_port)
            raise
        except BaseException:
            self._ports.discard(remote_port)
            raise

    async def open_connection(self, host: str, port: int) -> tuple[asyncssh.SSHReader, asyncssh.SSHWriter]:
        """A TCP stream from the shadow pod to host:port (names resolved in the pod). Safe to cancel:
        bound it with the caller's own deadline (asyncio.timeout / wait_for)."""
        return await self._open(lambda conn: conn.open_connection(host, port), close_stream)

    async def create_connection(self, session_factory: Callable[[], asyncssh.SSHTCPSession],
                                host: str, port: int) -> tuple[asyncssh.SSHTCPChannel, Any]:
        return await self._open(lambda conn: conn.create_connection(session_factory, host, port), close_channel)

    async def _open(self, opener: Callable[[asyncssh.SSHClientConnection], Awaitable[T]],
                    discard: Callable[[T], None]) -> T:
        conn = await self._supervisor.wait_up()
        try:
            return await open_shielded(opener(conn), discard)
        except Exception as exc:
            if not session_gone(conn, exc):
                raise  # the shadow's answer (refused, no such name): a new session would say the same
            log.debug("stream open on a dead session (%s); retrying on the next one", exc)
        conn = await self._supervisor.wait_up(stale=conn)
        return await open_shielded(opener(conn), discard)

    async def _connect(self) -> asyncssh.SSHClientConnection:
        """One attempt: a session whose exposed ports are all granted, or an error and nothing open."""
        try:
            conn = await self._connector(self._options)
        except asyncssh.PermissionDenied as exc:
            raise TunnelDown(f"the {self._name} refused this session's key ({exc.reason})") from exc
        except asyncssh.HostKeyNotVerifiable as exc:
            raise TunnelDown(f"the {self._name}'s host key is not the pinned one ({exc.reason})") from exc
        try:
            await self._ports.request_all(conn)
        except BaseException as exc:
            self._ports.release()
            conn.close()
            if isinstance(exc, PortRefused):
                raise TunnelDown(str(exc)) from exc
            raise
        return conn

    async def close(self) -> None:
        """Stop reconnecting (awaited), close the remote listeners and the session."""
        await self._supervisor.close()
        self._ports.release()
