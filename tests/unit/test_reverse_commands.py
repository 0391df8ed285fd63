"""The pure parts of exchange, preview and forward: argument forms, banners, the shadow's role."""

from __future__ import annotations

import asyncio

import asyncssh
import pytest

from ktproxy.cluster import meta
from ktproxy.commands.exchange import banner as exchange_banner
from ktproxy.commands.forward import banner as forward_banner
from ktproxy.commands.forward import parse_ports
from ktproxy.commands.preview import banner as preview_banner
from ktproxy.errors import KtError, UsageError
from ktproxy.exchange.target import ExchangeTarget
from ktproxy.expose import ExposedPort
from ktproxy.forward.forwarder import Forwarder
from ktproxy.forward.targets import AddressPlan
from ktproxy.shadow.reverse import HEALTH_PORT_NAME, ReverseSpec, health_port


@pytest.mark.parametrize("text, expected", [
    (None, (None, None)),
    ("6060", (6060, None)),  # kt-connect: one number is the LOCAL port, REMOTE from the service
    ("6060:8080", (6060, 8080)),
    ("6060:http", (6060, "http")),
])
def test_forward_ports(text, expected) -> None:
    assert parse_ports(text) == expected


@pytest.mark.parametrize("text", ["abc", "0", "70000", "1:2:3", "6060:", ":8080"])
def test_forward_bad_ports(text) -> None:
    with pytest.raises(UsageError):
        parse_ports(text)


def test_banners_are_kt_connects() -> None:
    svc = type("Svc", (), {})()
    assert exchange_banner(ExchangeTarget("service", "tomcat", svc)) == \
        "Now all request to service 'tomcat' will be redirected to local"
    assert exchange_banner(ExchangeTarget("deployment", "tomcat", svc)) == \
        "Now all request to deployment 'tomcat' will be redirected to local"
    assert preview_banner("tomcat-v2") == "Now you can access your local service in cluster by name 'tomcat-v2'"
    plan = AddressPlan("10.0.0.7", 8080)
    assert forward_banner(plan, "127.0.0.1", 6060) == "Now you can access port 8080 of '10.0.0.7' via 'localhost:6060'"
    assert forward_banner(plan, "0.0.0.0", 6060).endswith("via '0.0.0.0:6060'")


def test_shadow_role_serves_every_target_port_once_with_its_name() -> None:
    ports = [ExposedPort(8080, 80, 8080, "http"), ExposedPort(9000, 9090, 9091), ExposedPort(9001, 90, 8080, "http")]
    role = ReverseSpec(meta.ROLE_EXCHANGE_SHADOW, "tomcat-kt-exchange-", ports, labels={"kt-target": "x"},
                       annotations={meta.KT_CONFIG: "service=tomcat"}).shadow_role()
    role.check()  # the API server would accept the ports
    assert role.ports == (("http", 8080), ("kt-9091", 9091), (HEALTH_PORT_NAME, 2280))
    assert role.args == ("--expose", "8080,9091", "--health-port", "2280")
    assert role.labels == {"kt-target": "x"} and role.annotations == {meta.KT_CONFIG: "service=tomcat"}
    assert role.new_name().startswith("tomcat-kt-exchange-")


def test_health_port_avoids_exposed_ports() -> None:
    assert health_port([ExposedPort(2280, 2280, 2280), ExposedPort(1, 2281, 2281)]) == 2282


class _Plan:
    """A dial plan whose cached answer still names a pod that was just replaced."""

    description = "service 'web'"

    def __init__(self) -> None:
        self.answers = [[("10.0.0.1", 80)], [("10.0.0.2", 80)]]
        self.fresh = False

    async def endpoints(self) -> list[tuple[str, int]]:
        return self.answers[1] if self.fresh else self.answers[0]

    def invalidate(self) -> None:
        self.fresh = True


class _Tunnel:
    def __init__(self) -> None:
        self.dialled: list[str] = []

    async def open_connection(self, host: str, port: int) -> tuple[str, str]:
        self.dialled.append(host)
        if host == "10.0.0.1":
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "Connection refused")
        return "reader", "writer"


async def test_forward_dials_the_replacement_pod_on_the_same_connection() -> None:
    tunnel = _Tunnel()
    assert await Forwarder(_Plan(), tunnel)._dial() == ("reader", "writer")
    assert tunnel.dialled == ["10.0.0.1", "10.0.0.2"]


async def test_forward_does_not_blame_the_pods_while_the_session_is_down() -> None:
    # A session being rebuilt is not a dead pod: no pod is dropped from the plan (which cost a fresh
    # endpoint list per connection) and the connection simply waits for a later attempt.
    from ktproxy.tunnel.supervisor import TunnelDown

    class Down(_Tunnel):
        async def open_connection(self, host: str, port: int) -> tuple[str, str]:
            self.dialled.append(host)
            raise TunnelDown("cannot reach the shadow")

    plan, tunnel = _Plan(), Down()
    assert await Forwarder(plan, tunnel)._dial() is None
    assert tunnel.dialled == ["10.0.0.1"] and not plan.fresh


async def test_first_failed_proof_cancels_the_others() -> None:
    from ktproxy.shadow.reverse import all_or_none

    cancelled = asyncio.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def failing() -> None:
        raise KtError("port 9090 did not reach this machine")

    with pytest.raises(KtError):
        await all_or_none([slow(), failing()])
    await asyncio.wait_for(cancelled.wait(), 1)


async def test_forward_closing_with_open_connections_logs_no_traceback() -> None:
    # Ctrl-C while a client is connected printed "Exception in callback ... task.exception()" (3.11).
    errors: list[dict] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    target_got = asyncio.Event()

    async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        target_got.set()
        await reader.read()

    upstream = await asyncio.start_server(target, "127.0.0.1", 0)
    up_port = upstream.sockets[0].getsockname()[1]

    class Plan(_Plan):
        async def endpoints(self) -> list[tuple[str, int]]:
            return [("127.0.0.1", up_port)]

    class Direct:
        async def open_connection(self, host: str, port: int) -> tuple[object, object]:
            return await asyncio.open_connection(host, port)

    forwarder = Forwarder(Plan(), Direct())
    server = await asyncio.start_server(forwarder.handle, "127.0.0.1", 0)
    _, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    await asyncio.wait_for(target_got.wait(), 5)
    await forwarder.close()
    server.close()
    upstream.close()
    writer.close()
    for _ in range(5):
        await asyncio.sleep(0)
    assert errors == []


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "192.0.2.7", "my-laptop.example"])
def test_forward_beyond_loopback_needs_the_explicit_flag(address: str) -> None:
    # G9: connect asks --proxy-auth for a non-loopback bind; forward has no authentication at all and
    # bound 0.0.0.0 silently.
    from ktproxy.commands.forward import check_address

    with pytest.raises(UsageError, match="--allow-remote-clients"):
        check_address(address, allow_remote_clients=False)


def test_forward_beyond_loopback_with_the_flag_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    from ktproxy.commands.forward import check_address

    with caplog.at_level("WARNING", logger="ktproxy"):
        check_address("0.0.0.0", allow_remote_clients=True)
    assert any("no authentication" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_forward_on_loopback_needs_nothing(address: str, caplog: pytest.LogCaptureFixture) -> None:
    from ktproxy.commands.forward import check_address

    with caplog.at_level("WARNING", logger="ktproxy"):
        check_address(address, allow_remote_clients=False)
    assert not caplog.records


def test_forward_refuses_a_wide_bind_on_the_command_line_before_any_api_call(tmp_path, capsys) -> None:
    from ktproxy.cli import main

    # No kubeconfig exists: the refusal must come first, as one line, exit 2.
    rc = main(["--kubeconfig", str(tmp_path / "none"), "forward", "svc/x", "8080", "--address", "0.0.0.0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "--allow-remote-clients" in err[0], err


async def test_an_idle_forwarded_connection_ends_without_a_traceback(monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    # G9: a forward idle for the relay's timeout logged an ERROR traceback ("Unhandled exception in
    # client_connected_cb"): the TimeoutError escaped Forwarder.handle.
    import ktproxy.proxy.relay as relay_mod

    monkeypatch.setattr(relay_mod, "IDLE_TIMEOUT", 0.2)
    errors: list[dict] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, context: errors.append(context))

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    upstream = await asyncio.start_server(silent, "127.0.0.1", 0)
    up_port = upstream.sockets[0].getsockname()[1]

    class Plan(_Plan):
        async def endpoints(self) -> list[tuple[str, int]]:
            return [("127.0.0.1", up_port)]

    class Direct:
        async def open_connection(self, host: str, port: int) -> tuple[object, object]:
            return await asyncio.open_connection(host, port)

    forwarder = Forwarder(Plan(), Direct())
    server = await asyncio.start_server(forwarder.handle, "127.0.0.1", 0)
    with caplog.at_level("DEBUG"):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the idle limit
        for _ in range(5):
            await asyncio.sleep(0)
    writer.close()
    server.close()
    upstream.close()
    assert errors == []
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL") or r.exc_info]
    assert any("no traffic" in r.getMessage() for r in caplog.records)
