"""Exposed ports and who owns them: the shadow binds every --expose port itself, at start-up, and hands
the connections it accepts to the newest SSH session that asked for the port (tcpip-forward).

The listeners never belong to a session, so a laptop that reconnects while the shadow still holds its dead
session (server keepalives take 90-120 s to notice) simply becomes the owner: nothing is bound again, so
nothing can be "in use". When the owner goes, the previous session still attached takes over; with none
left, accepted connections are closed at once and the pod reports not-ready.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import asyncssh

from shadow_image import listeners

log = logging.getLogger("shadow.ports")

# Listen hosts a tcpip-forward may name: all meaning "every address of the pod".
ANY_HOSTS = frozenset({"", "0.0.0.0", "::"})


class Session(Protocol):
    """What ownership needs from an SSH session (server.ShadowServer)."""

    name: str

    async def open_forwarded(self, factory: Callable[[], asyncssh.SSHForwarder], listen_host: str,
                             port: int, orig_host: str, orig_port: int) -> object: ...


class Refused(Exception):
    """A tcpip-forward the shadow does not grant; the message says why, for the log."""


class Attachment(asyncssh.SSHListener):
    """One session's tcpip-forward of one exposed port, kept by asyncssh where it would keep a listener it
    bound itself. asyncssh closes it on cancel-tcpip-forward and when the session ends: that only gives
    the port back to the previous session; the socket stays."""

    def __init__(self, port: ExposedPort, session: Session, listen_host: str) -> None:
        super().__init__()
        self.port, self.session, self.listen_host = port, session, listen_host

    def get_port(self) -> int:
        return self.port.number

    def close(self) -> None:
        self.port.detach(self)

    async def wait_closed(self) -> None:
        return None

    async def open(self, factory: Callable[[], asyncssh.SSHForwarder], orig_host: str,
                   orig_port: int) -> object:
        # The channel names the port as the session asked for it: asyncssh's client finds its forward by
        # exactly that (host, port) pair.
        return await self.session.open_forwarded(factory, self.listen_host, self.port.number, orig_host, orig_port)


@dataclass(frozen=True)
class PortState:
    port: int
    listening: bool
    sessions: int


class ExposedPort:
    def __init__(self, number: int) -> None:
        self.number = number
        self.listening: listeners.Listening | None = None
        self._owners: list[Attachment] = []  # oldest first; the last one gets new connections
        self._tasks: set[asyncio.Task[None]] = set()

    def owners_newest_first(self) -> list[Attachment]:
        return self._owners[::-1]

    def holds(self, session: Session) -> bool:
        return any(a.session is session for a in self._owners)

    def attach(self, session: Session, listen_host: str) -> Attachment:
        if self.holds(session):
            raise Refused(f"port {self.number} is already forwarded by this session")
        attachment = Attachment(self, session, listen_host)
        self._owners.append(attachment)
        return attachment

    def detach(self, attachment: Attachment) -> None:
        if attachment not in self._owners:
            return
        was_owner = self._owners[-1] is attachment
        self._owners.remove(attachment)
        if not was_owner:
            log.info("%s no longer waits as a standby for port %d", attachment.session.name, self.number)
        elif self._owners:
            log.info("laptop detached from port %d (%s); %s serves it again", self.number,
                     attachment.session.name, self._owners[-1].session.name)
        else:
            log.info("laptop detached from port %d (%s); no laptop attached: its connections are closed "
                     "until one attaches", self.number, attachment.session.name)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a connection's set-up as a task this port keeps (and cancels on close)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def state(self) -> PortState:
        return PortState(self.number, self.listening is not None and self.listening.is_serving(), len(self._owners))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.listening:
            self.listening.close()
            await self.listening.wait_closed()


class PortTable:
    """The --expose ports: bound at start, granted to sessions by tcpip-forward (only these, S1)."""

    def __init__(self, numbers: Iterable[int] = ()) -> None:
        self.ports = {n: ExposedPort(n) for n in numbers}

    async def start(self, protocol: Callable[[ExposedPort], asyncio.BaseProtocol]) -> None:
        """Listen on every exposed port, on all addresses; `protocol(port)` handles each connection."""
        for port in self.ports.values():
            port.listening = await listeners.listen(
                "", port.number, lambda sock, p=port: listeners.tcp_server(lambda: protocol(p), sock))
            log.info("exposed port %d listening on %s", port.number, listeners.describe(port.listening))

    def request(self, session: Session, listen_host: str, port: int) -> Attachment:
        """A session's tcpip-forward: it becomes the port's owner, or Refused says why not."""
        if not self.ports:
            raise Refused("this shadow exposes no ports (started without --expose)")
        if listen_host not in ANY_HOSTS:
            raise Refused(f"listen host {listen_host!r} is not allowed (only all addresses: '', 0.0.0.0, ::)")
        exposed = self.ports.get(port)
        if exposed is None:
            raise Refused(f"port {port} is not exposed (exposed: {self.describe()})")
        attachment = exposed.attach(session, listen_host)
        if all(p.holds(session) for p in self.ports.values()):
            log.info("laptop attached for ports %s (%s)", self.describe(), session.name)
        return attachment

    def drop_session(self, session: Session) -> None:
        """Forget a closed session everywhere (asyncssh normally closed its attachments already)."""
        for port in self.ports.values():
            for attachment in [a for a in port.owners_newest_first() if a.session is session]:
                port.detach(attachment)

    def states(self) -> list[PortState]:
        return [p.state() for p in self.ports.values()]

    def describe(self) -> str:
        return ",".join(str(n) for n in self.ports) or "none"

    async def close(self) -> None:
        for port in self.ports.values():
            await port.close()
