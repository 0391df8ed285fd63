"""--expose parsing, REMOTE resolution against a Service (service port, target port, named target port),
the shadow's container ports, and the local-port check."""

from __future__ import annotations

import asyncio
import socket

import pytest
from fake_kube import FakeKube, model, pod, service

from ktproxy.errors import KtError, UsageError
from ktproxy.expose import (
    ExposedPort,
    PortPair,
    check_local_port,
    parse_expose,
    parse_port_pair,
    resolve_expose,
    standalone_ports,
)

TOMCAT = service("tomcat", {"app": "tomcat"}, [{"name": "http", "port": 8080, "targetPort": 8080}])
MULTI = service("web", {"app": "web"}, [
    {"name": "http", "port": 80, "targetPort": 8080},
    {"name": "admin", "port": 9000, "targetPort": "mgmt"},
])


@pytest.mark.parametrize("text,expected", [
    ("8080", [PortPair(8080, 8080)]),
    ("8080:80", [PortPair(8080, 80)]),
    ("7001,8080:80", [PortPair(7001, 7001), PortPair(8080, 80)]),
    (" 9000:http ", [PortPair(9000, "http")]),
])
def test_parse_expose(text, expected):
    assert parse_expose(text) == expected


@pytest.mark.parametrize("text,message", [
    ("", "--expose expects LOCAL[:REMOTE]"),
    ("8080:", "--expose expects LOCAL[:REMOTE]"),
    ("1:2:3", "--expose expects LOCAL[:REMOTE]"),
    ("0", "local port '0' in '0' is not a port number"),
    ("70000:80", "local port '70000'"),
    ("80:99999", "remote port '99999'"),
    ("http", "local port 'http'"),
    ("80:Bad_Name", "remote port 'Bad_Name' in '80:Bad_Name' is not a port number or port name"),
    ("8080,8080:81", "local port 8080 appears twice"),
    ("8080:80,9090:80", "remote port 80 appears twice"),
])
def test_parse_expose_errors(text, message):
    with pytest.raises(UsageError) as err:
        parse_expose(text)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_names_can_be_refused():
    with pytest.raises(UsageError, match="not a port number"):
        parse_port_pair("80:http", allow_names=False)


async def test_remote_may_be_service_port_or_target_port():
    kube = FakeKube()
    svc = model("service", MULTI)
    kube.store.put("pod", pod("web-1", {"app": "web"}, ports=[{"name": "mgmt", "containerPort": 9901}]))
    got = await resolve_expose(kube, svc, parse_expose("1000:80"))
    assert got == [ExposedPort(1000, 80, 8080)]
    got = await resolve_expose(kube, svc, parse_expose("2000:8080"))
    assert got == [ExposedPort(2000, 80, 8080)]


async def test_named_target_port_by_service_port_name_and_number():
    kube = FakeKube()
    kube.store.put("pod", pod("web-1", {"app": "web"}, ports=[{"name": "mgmt", "containerPort": 9901}]))
    svc = model("service", MULTI)
    want = ExposedPort(7000, 9000, 9901, "mgmt")
    for remote in ("9000", "mgmt", "9901", "admin"):
        assert await resolve_expose(kube, svc, parse_expose(f"7000:{remote}")) == [want]
    assert want.container_port_name == "mgmt"
    assert ExposedPort(1, 80, 8080).container_port_name == "kt-8080"


async def test_named_target_port_without_a_pod_says_so():
    kube = FakeKube()
    with pytest.raises(KtError, match="named target port 'mgmt', which no pod selected by the service declares"):
        await resolve_expose(kube, model("service", MULTI), parse_expose("7000:9000"))


async def test_unknown_remote_is_one_line_with_the_ports():
    kube = FakeKube()
    with pytest.raises(KtError) as err:
        await resolve_expose(kube, model("service", TOMCAT), parse_expose("9999"))
    assert str(err.value) == "port 9999 is not a port of service 'tomcat' (ports: 8080->8080/http)"


async def test_same_target_twice_is_refused():
    kube = FakeKube()
    with pytest.raises(UsageError, match="gives target port 8080 of service 'web' twice"):
        await resolve_expose(kube, model("service", MULTI), parse_expose("1000:80,2000:8080"))


def test_standalone_ports():
    assert standalone_ports(parse_expose("8080:80")) == [ExposedPort(8080, 80, 80)]
    with pytest.raises(UsageError, match="must be a number"):
        standalone_ports(parse_expose("8080:http"))


async def test_check_local_port():
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await check_local_port("127.0.0.1", port)
    finally:
        server.close()
        await server.wait_closed()
    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
        with pytest.raises(KtError) as err:
            await check_local_port("127.0.0.1", free)
    assert str(err.value) == (f"nothing is listening on local port {free} "
                              "(start it first, or pass --skip-port-checking)")


def test_expose_accepts_only_names_the_shadow_can_declare():
    # One rule for both: --expose took "a--b", which the shadow's pod spec then refused.
    with pytest.raises(UsageError):
        parse_expose("8080:a--b")
