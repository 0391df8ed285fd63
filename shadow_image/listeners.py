"""Listening sockets. "All addresses" is one dual-stack socket, so IPv6-only clusters (whose kubelet
probes and Services reach the pod's IPv6 address) work as well as IPv4 ones."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

# Hosts that mean every address of the pod, in both families.
ALL_ADDRESSES = frozenset({"", "*", "::"})


class _Server(Protocol):
    sockets: Sequence[socket.socket]

    def is_serving(self) -> bool: ...
    def close(self) -> None: ...
    async def wait_closed(self) -> None: ...


def bind_tcp(host: str, port: int) -> list[socket.socket]:
    """Bound (not yet listening) TCP sockets for host:port; port 0 picks one port for all of them."""
    if host in ALL_ADDRESSES:
        return _bind_all(port)
    family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    return [_bound(socket.socket(family, socket.SOCK_STREAM), addr)]


def _bound(sock: socket.socket, addr: tuple, v6only: bool | None = None) -> socket.socket:
    try:
        if os.name == "posix":  # a restarted shadow must not wait out TIME_WAIT; on Windows this means steal
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if v6only is not None:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_all(port: int) -> list[socket.socket]:
    try:
        six = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:  # a kernel without IPv6
        return [_bound(socket.socket(socket.AF_INET, socket.SOCK_STREAM), ("0.0.0.0", port))]
    try:
        six.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    except (OSError, AttributeError):  # a platform that cannot mix families on one socket
        six.close()
        return bind_pair(port)
    try:
        return [_bound(six, ("::", port))]
    except OSError as exc:
        if exc.errno != errno.EADDRNOTAVAIL:  # IPv6 switched off in this pod's network namespace
            raise
        return [_bound(socket.socket(socket.AF_INET, socket.SOCK_STREAM), ("0.0.0.0", port))]


def bind_pair(port: int) -> list[socket.socket]:
    """One IPv6-only and one IPv4 socket on the same port: dual stack where one socket cannot be."""
    six = _bound(socket.socket(socket.AF_INET6, socket.SOCK_STREAM), ("::", port), v6only=True)
    try:
        four = _bound(socket.socket(socket.AF_INET, socket.SOCK_STREAM), ("0.0.0.0", six.getsockname()[1]))
    except BaseException:
        six.close()
        raise
    return [six, four]


class Listening:
    """The servers on the sockets of one address: one for a dual-stack socket, or one per family."""

    def __init__(self, servers: Sequence[_Server]) -> None:
        self._servers = list(servers)

    @property
    def sockets(self) -> list[socket.socket]:
        return [s for srv in self._servers for s in srv.sockets]

    @property
    def port(self) -> int:
        return self.sockets[0].getsockname()[1]

    def is_serving(self) -> bool:
        return bool(self._servers) and all(srv.is_serving() for srv in self._servers)

    def close(self) -> None:
        for srv in self._servers:
            srv.close()

    async def wait_closed(self) -> None:
        for srv in self._servers:
            await srv.wait_closed()


async def listen(host: str, port: int, start: Callable[[socket.socket], Awaitable[_Server]]) -> Listening:
    """Bind host:port and start a server on each socket with `start(sock)`."""
    socks = bind_tcp(host, port)
    servers: list[_Server] = []
    try:
        for sock in socks:
            servers.append(await start(sock))
    except BaseException:
        for srv in servers:
            srv.close()
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.close()
        raise
    return Listening(servers)


async def tcp_server(factory: Callable[[], asyncio.BaseProtocol], sock: socket.socket) -> asyncio.Server:
    """An asyncio server on an already bound socket (its one home, so every caller gets the same backlog)."""
    return await asyncio.get_running_loop().create_server(factory, sock=sock, backlog=512)


def describe(listening: Listening) -> str:
    """'[::]:2222' or '0.0.0.0:2222, [::]:2222' for the log."""
    out = []
    for sock in listening.sockets:
        host, port = sock.getsockname()[:2]
        out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return ", ".join(out)
