"""Exposed ports and their owners: only --expose ports on all addresses (S1), newest session wins, the
previous one takes over; accepted connections go to the owner or are closed, never left hanging."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import asyncssh
import pytest

from shadow_image import inbound
from shadow_image.inbound import InboundForwarder
from shadow_image.ports import PortState, PortTable, Refused


class FakeChannel:
    """What an SSHForwarder on the channel side writes to."""

    def __init__(self) -> None:
        self.data = b""
        self.eof, self.closed = asyncio.Event(), asyncio.Event()

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def write(self, data: bytes) -> None:
        self.data += data

    def write_eof(self) -> None:
        self.eof.set()

    def close(self) -> None:
        self.closed.set()


class FakeSession:
    def __init__(self, name: str, mode: str = "serve") -> None:
        self.name, self.mode = name, mode
        self.release, self.opened = asyncio.Event(), asyncio.Event()
        self.opens: list[tuple[str, int]] = []
        self.channel = FakeChannel()

    async def open_forwarded(self, factory: Callable[[], asyncssh.SSHForwarder], listen_host: str, port: int,
                             orig_host: str, orig_port: int) -> object:
        self.opens.append((listen_host, port))
        if self.mode == "refuse":
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "SSH connection closed")
        if self.mode == "hang":
            await self.release.wait()
        side = factory()  # what asyncssh does once the laptop confirmed the channel
        side.connection_made(self.channel)  # type: ignore[arg-type]
        side.session_started()
        self.opened.set()
        if self.mode == "slow-return":  # asyncssh's create_connection resumes its caller a step later
            await asyncio.sleep(0.2)
        return self.channel, side


def test_only_exposed_ports_on_all_addresses_are_granted() -> None:
    a = FakeSession("a")
    with pytest.raises(Refused, match="without --expose"):
        PortTable().request(a, "", 8080)
    table = PortTable([8080])
    with pytest.raises(Refused, match="not exposed"):
        table.request(a, "", 9090)
    for host in ("127.0.0.1", "localhost", "10.0.0.1", "::1"):
        with pytest.raises(Refused, match="listen host"):
            table.request(a, host, 8080)
    for host in ("", "0.0.0.0", "::"):
        table.request(FakeSession(host), host, 8080)


def test_newest_session_owns_and_the_previous_takes_over() -> None:
    table = PortTable([8080, 9090])
    a, b = FakeSession("a"), FakeSession("b")
    port = table.ports[8080]
    att_a = table.request(a, "", 8080)
    att_b = table.request(b, "", 8080)
    assert [x.session for x in port.owners_newest_first()] == [b, a]
    with pytest.raises(Refused, match="already forwarded"):
        table.request(b, "", 8080)
    att_b.close()  # what asyncssh does on cancel-tcpip-forward and when b's session ends
    assert [x.session for x in port.owners_newest_first()] == [a]
    att_b.close()  # twice is harmless
    table.request(b, "", 8080)  # coming back makes b the newest again
    assert port.owners_newest_first()[0].session is b
    table.drop_session(b)
    att_a.close()
    assert port.owners_newest_first() == []
    assert table.states() == [PortState(8080, False, 0), PortState(9090, False, 0)]


def _free_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", 0))
        return s.getsockname()[1]


@pytest.fixture
async def table():
    t = PortTable([_free_port()])
    await t.start(InboundForwarder)
    yield t
    await t.close()


async def _send_and_read(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        async with asyncio.timeout(5):
            return await reader.read()
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


async def test_listeners_are_up_before_anyone_attaches(table: PortTable) -> None:
    [state] = table.states()
    assert state.listening and state.sessions == 0


async def test_no_owner_closes_the_connection_at_once(table: PortTable) -> None:
    [number] = table.ports
    assert await _send_and_read(number, b"hello") == b""


async def test_a_refusing_newest_session_falls_back_to_the_older_one(table: PortTable) -> None:
    [number] = table.ports
    old, new = FakeSession("old"), FakeSession("new", "refuse")
    table.request(old, "", number)
    table.request(new, "0.0.0.0", number)
    _, writer = await asyncio.open_connection("127.0.0.1", number)
    writer.write(b"early bytes")
    writer.write_eof()
    async with asyncio.timeout(5):
        await old.channel.eof.wait()
    assert old.channel.data == b"early bytes"  # written before the channel was open, none lost
    assert new.opens == [("0.0.0.0", number)] and old.opens == [("", number)]  # the host as each asked
    writer.close()


async def test_a_session_that_never_answers_does_not_hang_the_client(table: PortTable,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inbound, "OPEN_TIMEOUT", 0.2)
    [number] = table.ports
    dead = FakeSession("dead", "hang")
    table.request(dead, "", number)
    assert await _send_and_read(number, b"x") == b""
    dead.release.set()  # the confirmation comes after all: that channel must not stay open on the laptop
    async with asyncio.timeout(5):
        await dead.channel.closed.wait()


async def _bytes_keep_their_order() -> bytes:
    table = PortTable([_free_port()])
    await table.start(InboundForwarder)
    try:
        [number] = table.ports
        laptop = FakeSession("laptop", "slow-return")
        table.request(laptop, "", number)
        _, writer = await asyncio.open_connection("127.0.0.1", number)
        writer.write(b"sent before the channel was open|")
        await laptop.opened.wait()
        writer.write(b"sent after")
        writer.write_eof()
        async with asyncio.timeout(5):
            await laptop.channel.eof.wait()
        writer.close()
        return laptop.channel.data
    finally:
        await table.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_early_bytes_go_first_and_eof_last(loop: str) -> None:
    """The client's bytes from before the open go out before anything later, and its EOF after all of
    them (uvloop reads on despite a pause in connection_made; a 1 MB upload once arrived as a bare EOF)."""
    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        data = uvloop.run(_bytes_keep_their_order())
    else:
        data = asyncio.run(_bytes_keep_their_order())
    assert data == b"sent before the channel was open|sent after"
