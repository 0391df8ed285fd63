"""SSHTunnel against an in-process SSH server: one reconnect owner, stream opens that wait for it
without disturbing it, and remote ports asked for again on every session."""

from __future__ import annotations

import asyncio
import logging

import asyncssh
import pytest
from fake_shadow import FakeShadow, ScriptedConnector, free_port

from ktproxy.cluster.errors import KubeError
from ktproxy.tunnel.channels import SESSION_CLOSED, session_gone
from ktproxy.tunnel.session import SSHTunnel, TunnelDown

FAST = (0.02, 0.1)  # back-off for tests that do not measure it


@pytest.fixture(scope="module")
def keys():
    return asyncssh.generate_private_key("ssh-ed25519"), asyncssh.generate_private_key("ssh-ed25519")


@pytest.fixture
async def shadow(keys):
    s = await FakeShadow(*keys).start()
    yield s
    await s.close()


class Echo:
    """A loopback TCP echo server that records when each of its connections ends."""

    def __init__(self) -> None:
        self.accepted = 0
        self.ended = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def start(self) -> Echo:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.ended.set()
            writer.close()


@pytest.fixture
async def echo():
    e = await Echo().start()
    yield e
    assert e.server is not None
    e.server.close()


async def roundtrip(reader, writer, payload: bytes = b"ping") -> bytes:
    writer.write(payload)
    await writer.drain()
    got = await asyncio.wait_for(reader.readexactly(len(payload)), 5)
    writer.close()
    return got


@pytest.fixture
async def make_tunnel(shadow):
    made: list[SSHTunnel] = []

    def make(connector=None, **kwargs) -> SSHTunnel:
        tunnel = SSHTunnel(connector or ScriptedConnector(shadow), shadow.options(), **kwargs)
        made.append(tunnel)
        return tunnel

    yield make
    for tunnel in made:
        await tunnel.close()


class States:
    """What the tunnel's state_changed callbacks reported."""

    def __init__(self, tunnel: SSHTunnel) -> None:
        self.seen: list[bool] = []
        self._up = asyncio.Event()
        tunnel.state_changed.append(self._changed)

    def _changed(self, up: bool) -> None:
        self.seen.append(up)
        if up:
            self._up.set()

    async def up_again(self) -> list[bool]:
        await asyncio.wait_for(self._up.wait(), 5)
        self._up.clear()
        return self.seen


async def closed(conn: asyncssh.SSHServerConnection) -> bool:
    await asyncio.wait_for(conn.wait_closed(), 5)
    return conn.is_closed()


# -- the supervisor ---------------------------------------------------------------------------------

async def test_supervisor_reconnects_in_the_background_without_any_request(shadow, make_tunnel, echo):
    # T1: nothing but the supervisor may bring the session back here.
    connector = ScriptedConnector(shadow)
    tunnel = make_tunnel(connector, backoff=FAST)
    await tunnel.start()
    states = States(tunnel)
    shadow.drop()
    assert await states.up_again() == [False, True]
    assert tunnel.reconnects == 1 and connector.calls == 2 and tunnel.is_up
    assert await roundtrip(*await tunnel.open_connection("127.0.0.1", echo.port)) == b"ping"


async def test_supervisor_survives_any_connector_error(shadow, make_tunnel, caplog):
    # R1: KubeError (API server blip) and even a bug's ValueError are failed attempts, retried.
    caplog.set_level(logging.WARNING, "ktproxy.tunnel")
    connector = ScriptedConnector(shadow)
    tunnel = make_tunnel(connector, backoff=FAST)
    await tunnel.start()
    connector.script = [KubeError("cannot reach the Kubernetes API server"), ValueError("odd header")]
    states = States(tunnel)
    shadow.drop()
    assert await states.up_again() == [False, True]
    assert connector.calls == 4 and tunnel.reconnects == 1
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) == 2, retries
    assert "cannot reach the Kubernetes API server" in retries[0] and "odd header" in retries[1]
    # Still supervising: another drop is noticed too.
    shadow.drop()
    assert await states.up_again() == [False, True, False, True]
    assert tunnel.reconnects == 2


async def test_callers_with_short_deadlines_never_cancel_or_repeat_the_connect(shadow, make_tunnel):
    # R2: requests arriving while the session is being rebuilt (here: in back-off after a failed
    # attempt, then during a slow pod replacement) only wait; their 0.3 s deadlines must not cancel
    # the rebuild or start one of their own.
    release = asyncio.Event()
    slow_started = asyncio.Event()

    async def slow_pod_replacement() -> None:
        slow_started.set()
        await release.wait()

    connector = ScriptedConnector(shadow)
    tunnel = make_tunnel(connector)  # the default back-off: 0.5 s after the first failure
    await tunnel.start()
    connector.script = [OSError("port-forward refused"), slow_pod_replacement]
    shadow.drop()
    await asyncio.wait_for(connector.failed.wait(), 5)

    async def caller() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(tunnel.open_connection("127.0.0.1", 9), 0.3)

    await asyncio.gather(*(caller() for _ in range(5)))  # during the back-off
    await asyncio.wait_for(slow_started.wait(), 5)
    await asyncio.gather(*(caller() for _ in range(5)))  # during the slow connect
    assert (connector.calls, connector.cancelled) == (3, 0)
    release.set()
    await tunnel.wait_up(5)
    assert (connector.calls, connector.cancelled) == (3, 0)
    assert tunnel.reconnects == 1


async def test_caller_is_told_when_the_attempt_it_waits_for_fails(shadow, make_tunnel):
    connector = ScriptedConnector(shadow)
    tunnel = make_tunnel(connector, backoff=(0.05, 10))
    await tunnel.start()
    connector.script = [OSError("refused"), OSError("refused again")]
    shadow.drop()
    await asyncio.wait_for(connector.failed.wait(), 5)
    # In back-off: the caller wakes the supervisor early and gets that attempt's error, not a hang.
    with pytest.raises(TunnelDown, match="refused again"):
        await tunnel.wait_up(5)
    await tunnel.wait_up(5)
    assert connector.calls == 4


async def test_first_connect_failure_is_raised_by_start(shadow, make_tunnel):
    tunnel = make_tunnel(ScriptedConnector(shadow, script=[OSError("connection refused")]))
    with pytest.raises(TunnelDown, match="cannot reach the shadow: connection refused"):
        await tunnel.start()
    with pytest.raises(TunnelDown, match="not running"):
        await tunnel.open_connection("127.0.0.1", 9)


async def test_close_awaits_the_supervisor_and_closes_a_connect_that_lands_after_it(shadow, make_tunnel):
    release = asyncio.Event()
    connector = ScriptedConnector(shadow, script=[release.wait])
    tunnel = make_tunnel(connector)
    starting = asyncio.create_task(tunnel.start())
    await asyncio.wait_for(connector.entered.wait(), 5)
    await tunnel.close()  # while the first connect is still in flight
    release.set()
    with pytest.raises(TunnelDown, match="closed"):
        await starting
    assert len(shadow.sessions) == 1 and await closed(shadow.sessions[0])
    assert not tunnel.is_up

    running = make_tunnel(backoff=FAST)
    await running.start()
    await running.close()
    assert not [t for t in asyncio.all_tasks() if t.get_name().endswith("session supervisor")]


# -- stream opens -----------------------------------------------------------------------------------

async def test_open_on_a_session_that_dies_under_it_is_retried_once_on_the_next(shadow, make_tunnel, echo):
    # R4: asyncssh reports it as ChannelOpenError(OPEN_CONNECT_FAILED, 'SSH connection closed').
    connector = ScriptedConnector(shadow)
    tunnel = make_tunnel(connector, backoff=FAST)
    await tunnel.start()
    shadow.die_on_open = 1
    streams = await asyncio.wait_for(tunnel.open_connection("127.0.0.1", echo.port), 5)
    assert await roundtrip(*streams) == b"ping"
    assert [o[0] for o in shadow.opens] == [0, 1] and connector.calls == 2


async def test_a_refusal_from_the_shadow_is_not_retried(shadow, make_tunnel):
    connector = ScriptedConnector(shadow)
    tunnel = make_tunnel(connector)
    await tunnel.start()
    shadow.refuse_opens = True
    with pytest.raises(asyncssh.ChannelOpenError, match="Connection refused"):
        await tunnel.open_connection("127.0.0.1", 9)
    assert len(shadow.opens) == 1 and connector.calls == 1 and tunnel.is_up


async def test_a_channel_confirmed_after_the_callers_deadline_is_closed(shadow, make_tunnel, echo):
    # R7: the DNS stub bounds opens with wait_for; the late channel (and the pod's TCP connection
    # behind it) must not stay open for the rest of the session.
    tunnel = make_tunnel()
    await tunnel.start()
    shadow.open_gate = asyncio.Event()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(tunnel.open_connection("127.0.0.1", echo.port), 0.2)
    shadow.open_gate.set()
    await asyncio.wait_for(echo.ended.wait(), 5)
    assert echo.accepted == 1


class _Conn:
    def __init__(self, closed: bool) -> None:
        self.closed = closed

    def is_closed(self) -> bool:
        return self.closed


def test_session_gone_tells_a_dying_session_from_a_refusal():
    # R4: while asyncssh tears a session down, is_closed() is still False but opens fail with this reason.
    dying = asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, SESSION_CLOSED)
    refused = asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "Connection refused")
    assert session_gone(_Conn(False), dying)  # type: ignore[arg-type]
    assert not session_gone(_Conn(False), refused)  # type: ignore[arg-type]
    assert session_gone(_Conn(True), refused)  # type: ignore[arg-type]


# -- remote ports -----------------------------------------------------------------------------------

async def connect_remote(port: int) -> bytes:
    """A client of the exposed port, on the shadow's side."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return await roundtrip(reader, writer, b"reverse")


async def test_exposed_port_is_asked_for_once_on_every_session(shadow, make_tunnel, echo, caplog):
    caplog.set_level(logging.INFO, "ktproxy.tunnel")
    remote = free_port()
    tunnel = make_tunnel(backoff=FAST)
    await tunnel.expose(remote, "127.0.0.1", echo.port)
    assert shadow.forwards == []  # asked for by start(), not before
    await tunnel.start()
    states = States(tunnel)
    assert shadow.forwards == [(0, remote)]
    assert await connect_remote(remote) == b"reverse"

    shadow.drop()
    await states.up_again()
    assert shadow.forwards == [(0, remote), (1, remote)]
    assert await connect_remote(remote) == b"reverse"
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count(f"remote port {remote} forwarded to 127.0.0.1:{echo.port}") == 1
    assert messages.count("1 remote port(s) forwarded again") == 1


async def test_expose_on_a_live_session_asks_at_once(shadow, make_tunnel, echo):
    tunnel = make_tunnel()
    await tunnel.start()
    remote = free_port()
    await tunnel.expose(remote, "127.0.0.1", echo.port)
    assert shadow.forwards == [(0, remote)]
    assert await connect_remote(remote) == b"reverse"
    with pytest.raises(ValueError, match="already forwarded"):
        await tunnel.expose(remote, "127.0.0.1", echo.port + 1)

    refused = free_port()
    shadow.refuse_ports[refused] = 1
    with pytest.raises(ConnectionError, match=f"refused to listen on port {refused}"):
        await tunnel.expose(refused, "127.0.0.1", echo.port)
    await tunnel.expose(refused, "127.0.0.1", echo.port)  # not kept after a refusal: may be asked again


async def test_a_refused_port_fails_the_attempt_and_it_is_retried(shadow, make_tunnel, echo):
    # Never a half-up session: up means every exposed port is granted.
    remote = free_port()
    connector = ScriptedConnector(shadow)
    tunnel = make_tunnel(connector, backoff=FAST)
    await tunnel.expose(remote, "127.0.0.1", echo.port)
    await tunnel.start()
    states = States(tunnel)
    shadow.refuse_ports[remote] = 1
    shadow.drop()
    assert await states.up_again() == [False, True]
    assert shadow.forwards == [(0, remote), (1, remote), (2, remote)]
    assert await closed(shadow.sessions[1]) and connector.calls == 3
    assert await connect_remote(remote) == b"reverse"


async def test_start_fails_clearly_when_a_port_is_refused(shadow, make_tunnel):
    remote = free_port()
    shadow.refuse_ports[remote] = 1
    tunnel = make_tunnel()
    await tunnel.expose(remote, "127.0.0.1", 9)
    with pytest.raises(TunnelDown, match=f"refused to listen on port {remote}"):
        await tunnel.start()
    assert await closed(shadow.sessions[0])


async def test_each_relayed_connection_is_reported_with_its_peer(shadow, make_tunnel, echo):
    # How exchange proves that traffic sent to the Service reaches this machine, not just the pod's port.
    seen: list[tuple[int, str, int]] = []
    tunnel = make_tunnel()
    tunnel.arrivals.append(lambda port, host, peer_port: seen.append((port, host, peer_port)))
    tunnel.arrivals.append(lambda *_: 1 / 0)  # a broken observer costs nothing but a log line
    remote = free_port()
    await tunnel.expose(remote, "127.0.0.1", echo.port)
    await tunnel.start()
    assert await connect_remote(remote) == b"reverse"
    assert len(seen) == 1
    port, host, peer_port = seen[0]
    assert port == remote and host == "127.0.0.1" and peer_port > 0
