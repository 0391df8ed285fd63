"""`ktctl connect` wiring without a cluster: input checked before any API call, rules built once, free
ports for `-- CMD`, and a clean-up chain whose steps cannot skip each other. The cluster side is faked."""

from __future__ import annotations

import errno
import ipaddress
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from ktproxy import cli
from ktproxy.cluster.discovery import ClusterInfo
from ktproxy.commands import connect, options
from ktproxy.dataplane import DataPlane, DataPlaneSettings, is_loopback_bind
from ktproxy.errors import UsageError
from ktproxy.routing import ClusterRules


def _args(*argv: str) -> Any:
    args = cli.build_parser().parse_args(["connect", *argv])
    return args


@pytest.fixture
def no_api(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(args: Any) -> Any:
        raise AssertionError("the Kubernetes API was reached before the user's input was checked")

    monkeypatch.setattr(options, "kube_client", refuse)


# -- input first (R7 "late validation", S3) -----------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--include-ips", "10.0.0.0/8,not-a-cidr"], "not-a-cidr"),
    (["--proxy-host", "127.lan.example.com"], "--proxy-auth"),
    (["--proxy-host", "0.0.0.0"], "--proxy-auth"),
    (["--proxy-auth", "no-colon"], "user:password"),
    (["--proxy-port", "70000"], "--proxy-port"),
    (["--timeout", "0"], "--timeout"),
])
def test_bad_input_fails_before_any_api_call(no_api: None, argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        connect.run(_args(*argv))


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_binds_need_no_auth(host: str) -> None:
    assert is_loopback_bind(host)


@pytest.mark.parametrize("host", ["127.lan.example.com", "127.0.0.1.nip.io", "0.0.0.0", "::", "192.0.2.1"])
def test_names_that_look_like_loopback_are_not(host: str) -> None:
    # S3: a name starting with "127." can resolve to a LAN address; binding there needs --proxy-auth.
    assert not is_loopback_bind(host)
    with pytest.raises(UsageError, match="--proxy-auth"):
        DataPlane(ClusterRules(), object(), DataPlaneSettings(proxy_host=host))  # type: ignore[arg-type]


# -- rules built once discovery is done (2.6) ---------------------------------------------------------
def test_rules_are_built_from_discovery_and_normalised() -> None:
    found = ClusterInfo(service_cidrs=[ipaddress.ip_network("10.96.0.0/16")], domain="Cluster.Local.",
                        namespaces=["Default", "Demo"])
    extra = (ipaddress.ip_network("192.0.2.0/24"),)
    rules = connect.cluster_rules("default", False, found, extra)
    assert rules.domain == "cluster.local"  # ClusterRules' own normalisation ran on discovery's answer
    assert {"default", "demo"} <= rules.namespaces
    assert rules.is_cluster("svc.demo.svc.cluster.local") and rules.is_cluster("192.0.2.7")
    assert rules.is_cluster("10.96.0.1")


# -- ports ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, ports", [
    ([], (2223, 10053)),
    (["--proxy-port", "3000", "--dns-port", "-1"], (3000, -1)),
    (["--", "true"], (0, 0)),  # a command: free ports, another connect may hold the defaults
    (["--proxy-port", "3000", "--", "true"], (3000, 0)),
])
def test_ports(argv: list[str], ports: tuple[int, int]) -> None:
    args = _args(*argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    given = connect.check_input(args)
    assert (given.proxy_port, given.dns_port) == ports


# -- the whole command against a faked cluster -------------------------------------------------------
class _Cluster:
    """Fakes for the Kubernetes side of connect; records the clean-up steps in the order they ran."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, failing: set[str]) -> None:
        self.closed: list[str] = []
        cluster = self

        def closer(name: str) -> Any:
            def close(*_a: object) -> None:
                cluster.closed.append(name)
                if name in failing:
                    raise RuntimeError(f"{name} close failed")
            return close

        class Kube:
            namespace = "default"
            server_host = "192.0.2.10"
            close = closer("kube")

        class Shadow:
            def __init__(self, *_a: object) -> None:
                pass

            async def preflight(self) -> None:
                pass

            async def discover(self, domain: str | None) -> ClusterInfo:
                return ClusterInfo(service_cidrs=[ipaddress.ip_network("10.96.0.0/16")], namespaces=["default"])

            async def start(self, **_kw: object) -> None:
                pass

            async def connect(self, options: Any) -> Any:
                raise AssertionError("not dialled in this test")

            async def close(self) -> None:
                closer("shadow")()

        class Tunnel:
            def __init__(self, *_a: object) -> None:
                pass

            async def start(self) -> None:
                pass

            async def open_connection(self, host: str, port: int) -> Any:
                raise ConnectionError("no cluster here")

            async def close(self) -> None:
                closer("tunnel")()

        import ktproxy.cleanup.sweep as sweep
        import ktproxy.shadow.session as shadow_session

        async def no_sweep(*_a: object) -> None:
            pass

        monkeypatch.setattr(sweep, "start_up_sweep", no_sweep)

        monkeypatch.setattr(options, "kube_client", lambda args: Kube())
        monkeypatch.setattr(shadow_session, "ShadowSession", Shadow)
        monkeypatch.setattr(connect, "SSHTunnel", Tunnel)
        real_close = DataPlane.close

        async def plane_close(plane: DataPlane) -> None:
            await real_close(plane)
            closer("plane")()

        monkeypatch.setattr(DataPlane, "close", plane_close)


def test_clean_up_steps_cannot_skip_each_other(monkeypatch: pytest.MonkeyPatch, kt_log: Any) -> None:
    # R7: a raising plane.close() or tunnel.close() used to skip shadow.close(), and that one kube.close().
    cluster = _Cluster(monkeypatch, failing={"plane", "tunnel", "shadow"})
    code = connect.run(_args("--", sys.executable, "-c", "pass"))
    assert code == 0
    assert cluster.closed == ["plane", "tunnel", "shadow", "kube"]
    messages = [r.getMessage() for r in kt_log.records]
    assert any("`ktctl clean`" in m for m in messages), messages


def _hold(port: int) -> socket.socket | None:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError as exc:
        s.close()
        if exc.errno == errno.EADDRINUSE:
            return None  # held by someone else already: the case under test either way
        raise
    s.listen()
    return s


def test_command_runs_while_the_default_ports_are_taken(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Another connect holds 2223 and 10053: `ktctl connect -- CMD` binds free ports and CMD's env says where.
    _Cluster(monkeypatch, failing=set())
    held = [_hold(2223), _hold(10053)]
    out = tmp_path / "env"
    probe = ("import os, socket, sys, urllib.parse\n"
             "port = urllib.parse.urlsplit(os.environ['ALL_PROXY']).port\n"
             "assert urllib.parse.urlsplit(os.environ['http_proxy']).port == port\n"
             "socket.create_connection(('127.0.0.1', port), 5).close()\n"
             "open(sys.argv[1], 'w').write(str(port))\n")
    try:
        code = connect.run(_args("--", sys.executable, "-c", probe, str(out)))
    finally:
        for s in held:
            if s is not None:
                s.close()
    assert code == 0
    assert int(out.read_text()) not in (0, 2223)
