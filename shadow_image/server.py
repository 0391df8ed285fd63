"""The SSH server's policy for one session: key-only auth, no shell/exec/sftp, direct-tcpip to anywhere
(ktctl connect's dials), tcpip-forward only for the ports the shadow exposes (ports.py)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

import asyncssh

from shadow_image.ports import PortTable, Refused

log = logging.getLogger("shadow")

_session_ids = itertools.count(1)


class ShadowServer(asyncssh.SSHServer):
    def __init__(self, ports: PortTable, window: int, max_pktsize: int) -> None:
        self._ports = ports
        self._window, self._max_pktsize = window, max_pktsize
        self._conn: asyncssh.SSHServerConnection | None = None
        self.name = f"session #{next(_session_ids)}"

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        peer = conn.get_extra_info("peername")
        self.name += f" from {peer[0]}:{peer[1]}" if peer else ""
        log.info("%s: connected", self.name)

    def connection_lost(self, exc: Exception | None) -> None:
        self._ports.drop_session(self)
        log.info("%s: closed%s", self.name, f": {exc}" if exc else "")

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def auth_completed(self) -> None:
        log.info("%s: session key accepted", self.name)

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> bool:
        log.debug("direct-tcpip %s:%s", dest_host, dest_port)
        return True

    def server_requested(self, listen_host: str, listen_port: int) -> asyncssh.SSHListener | bool:
        try:
            return self._ports.request(self, listen_host, listen_port)
        except Refused as exc:
            log.warning("%s: refused tcpip-forward %r port %s: %s", self.name, listen_host, listen_port, exc)
            return False

    def session_requested(self) -> bool:
        log.warning("%s: refused a session (shell/exec/subsystem) request", self.name)
        return False

    async def open_forwarded(self, factory: Callable[[], asyncssh.SSHForwarder], listen_host: str,
                             port: int, orig_host: str, orig_port: int) -> object:
        """Open a forwarded-tcpip channel to the laptop for a connection accepted on an exposed port."""
        if self._conn is None:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "session not connected")
        return await self._conn.create_connection(factory, listen_host, port, orig_host, orig_port,
                                                  window=self._window, max_pktsize=self._max_pktsize)
