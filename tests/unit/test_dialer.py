"""Dialer: every tunnel failure is a DialError (so the proxy always answers with a protocol reply),
and a name the cluster does not know is dialed directly when it may exist outside (B1)."""

from __future__ import annotations

import asyncio
import socket

import asyncssh
import pytest
from fake_shadow import FakeShadow

from ktproxy.cluster.errors import KubeError
from ktproxy.proxy import dialer as dialer_module
from ktproxy.proxy.dialer import Dialer, DialError
from ktproxy.routing import ClusterRules
from ktproxy.tunnel.session import SSHTunnel, TunnelDown


class Opener:
    """A tunnel stand-in: raises `error`, or waits forever; records what it was asked for."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error
        self.asked: list[tuple[str, int]] = []

    async def open_connection(self, host: str, port: int):
        self.asked.append((host, port))
        if self.error is not None:
            raise self.error
        await asyncio.Event().wait()


def rules() -> ClusterRules:
    # `dev` named by the user: kept though it is a TLD, so web.dev goes to the cluster first.
    return ClusterRules(namespace="default", cidrs=["10.96.0.0/12"], user_namespaces={"dev"})


@pytest.mark.parametrize("error", [
    TunnelDown("cannot reach the shadow: connection refused"),
    KubeError("cannot reach the Kubernetes API server"),  # from a pod replacement during a reconnect
    ValueError("a bug in a connector"),
    asyncssh.ConnectionLost("gone"),
], ids=["TunnelDown", "KubeError", "ValueError", "ConnectionLost"])
async def test_any_tunnel_failure_is_a_dial_error(error):
    # R1: an unmapped exception made the proxy close the client's socket without a reply.
    with pytest.raises(DialError) as caught:
        await Dialer(rules(), Opener(error)).dial("tomcat", 8080)
    assert caught.value.kind == "failure"
    assert str(error) in str(caught.value)


async def test_a_deadline_passed_waiting_for_the_session_is_a_timeout(monkeypatch):
    monkeypatch.setattr(dialer_module, "CONNECT_TIMEOUT", 0.1)
    with pytest.raises(DialError) as caught:
        await Dialer(rules(), Opener()).dial("10.96.0.10", 443)
    assert caught.value.kind == "timeout"


@pytest.mark.parametrize(("reason", "kind"), [
    ("Connection refused", "refused"),
    ("Name or service not known", "dns"),
    ("No route to host", "unreachable"),
    ("administratively prohibited", "failure"),
])
async def test_shadow_refusals_keep_their_kind(reason, kind):
    error = asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, reason)
    with pytest.raises(DialError) as caught:
        await Dialer(rules(), Opener(error)).dial("tomcat.default.svc.cluster.local", 80)
    assert caught.value.kind == kind


# -- B1: names the cluster does not know ---------------------------------------------------------------

NO_SUCH_NAME = asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "Name or service not known")


@pytest.fixture
async def local_site():
    """A loopback server, and a resolver that knows the test names only as 127.0.0.1."""
    async def hello(reader, writer):
        writer.write(b"hello from outside the cluster")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(hello, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


@pytest.fixture
async def fake_resolver(monkeypatch):
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo
    looked_up: list[str] = []

    async def getaddrinfo(host, port, *args, **kwargs):
        looked_up.append(host)
        if host in ("jira", "web.dev"):
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port))]
        if host == "127.0.0.1":
            return await real(host, port, *args, **kwargs)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")  # no query leaves the host

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    return looked_up


@pytest.mark.parametrize("name", ["jira", "web.dev"])
async def test_a_name_the_cluster_does_not_know_is_dialed_directly(name, local_site, fake_resolver):
    opener = Opener(NO_SUCH_NAME)
    reader, writer = await Dialer(rules(), opener).dial(name, local_site)
    assert await reader.read() == b"hello from outside the cluster"
    writer.close()
    assert opener.asked and fake_resolver == [name]


@pytest.mark.parametrize("host", ["10.96.0.10", "tomcat.default.svc.cluster.local", "tomcat.default.svc"])
async def test_no_direct_fallback_for_addresses_and_the_clusters_own_names(host, fake_resolver):
    with pytest.raises(DialError) as caught:
        await Dialer(rules(), Opener(NO_SUCH_NAME)).dial(host, 80)
    assert caught.value.kind == "dns" and fake_resolver == []


async def test_other_tunnel_failures_do_not_fall_back(fake_resolver):
    refused = asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "Connection refused")
    with pytest.raises(DialError, match="refused"):
        await Dialer(rules(), Opener(refused)).dial("jira", 80)
    assert fake_resolver == []


async def test_a_given_resolver_replaces_the_systems(local_site, fake_resolver):
    asked: list[str] = []

    async def resolve(name: str) -> list[str]:
        asked.append(name)
        return ["127.0.0.1"] if name == "intranet" else []

    dialer = Dialer(rules(), Opener(NO_SUCH_NAME), resolve=resolve)
    reader, writer = await dialer.dial("intranet", local_site)
    assert await reader.read() == b"hello from outside the cluster"
    writer.close()
    with pytest.raises(DialError) as caught:
        await dialer.dial("nosuchsvc", local_site)
    assert caught.value.kind == "dns"
    assert asked == ["intranet", "nosuchsvc"] and fake_resolver == []  # the system resolver never asked


# -- the real tunnel underneath ----------------------------------------------------------------------

@pytest.fixture
async def shadow():
    keys = asyncssh.generate_private_key("ssh-ed25519"), asyncssh.generate_private_key("ssh-ed25519")
    s = await FakeShadow(*keys).start()
    yield s
    await s.close()


async def test_a_channel_confirmed_after_the_dial_deadline_is_closed(shadow, monkeypatch):
    # R7: the shadow confirms the open after the dialer gave up; the channel must not stay open.
    ended = asyncio.Event()

    async def target(reader, writer):
        await reader.read()
        ended.set()
        writer.close()

    server = await asyncio.start_server(target, "127.0.0.1", 0)
    tunnel = SSHTunnel(shadow.connect, shadow.options())
    await tunnel.start()
    try:
        shadow.open_gate = asyncio.Event()
        monkeypatch.setattr(dialer_module, "CONNECT_TIMEOUT", 0.2)
        shadow.hosts["target.default.svc.cluster.local"] = "127.0.0.1"
        with pytest.raises(DialError) as caught:
            await Dialer(rules(), tunnel).dial("target", server.sockets[0].getsockname()[1])
        assert caught.value.kind == "timeout"
        shadow.open_gate.set()
        await asyncio.wait_for(ended.wait(), 5)
    finally:
        await tunnel.close()
        server.close()
