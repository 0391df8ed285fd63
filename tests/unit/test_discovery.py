"""Discovery for a user whose rights end at one namespace, and guessed ranges that must leave the
laptop's own networks alone. The client is a small fake returning the kubernetes package's own models,
so an attribute the client renamed (pod_i_ps -> pod_ips in kubernetes 37) fails here as it would live."""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import Any

import pytest
from kubernetes import client as k8s

from ktproxy.cluster import discovery
from ktproxy.cluster.discovery import covering, discover, local_addresses
from ktproxy.cluster.errors import KubeError

NS = "team"


def _pod(*ips: str, host_network: bool = False) -> k8s.V1Pod:
    return k8s.V1Pod(spec=k8s.V1PodSpec(containers=[], host_network=host_network),
                     status=k8s.V1PodStatus(pod_ip=ips[0] if ips else None,
                                            pod_ips=[k8s.V1PodIP(ip=ip) for ip in ips]))


def _svc(*ips: str) -> k8s.V1Service:
    return k8s.V1Service(spec=k8s.V1ServiceSpec(cluster_ip=ips[0], cluster_ips=list(ips)))


class NamespacedKube:
    """What a Role bound in one namespace may do: list pods and services there, nothing cluster-wide
    (403 for nodes, namespaces, ServiceCIDRs, kube-system), and no dry-run create either."""

    namespace = NS
    server_host = "192.0.2.1"

    def __init__(self, pods: list[k8s.V1Pod], services: list[k8s.V1Service]) -> None:
        self.api = k8s.ApiClient()
        self.core = k8s.CoreV1Api(self.api)
        self.pods = pods
        self.services = services
        self.calls: list[str] = []

    async def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        name = fn.__name__
        self.calls.append(name)
        ns = args[1] if name.startswith("read_namespaced") else args[0] if args else None
        if name == "list_namespaced_pod" and ns == NS:
            return k8s.V1PodList(items=self.pods)
        if name == "list_namespaced_service" and ns == NS:
            return k8s.V1ServiceList(items=self.services)
        raise KubeError(f"forbidden: cannot {name} ({ns or 'cluster scope'})", status=403, reason="Forbidden")


async def test_namespaced_user_discovers_without_traceback(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="ktproxy.cluster.discovery")
    kube = NamespacedKube([_pod("10.244.1.5", "fd00:244::5"), _pod("192.168.7.7", host_network=True)],
                          [_svc("10.96.0.50")])
    info = await discover(kube, local=[])  # type: ignore[arg-type]  # the fake has what discover uses
    assert [str(n) for n in info.pod_cidrs] == ["10.244.0.0/16", "fd00:244::/64"]
    assert [str(n) for n in info.service_cidrs] == ["10.96.0.0/16"]
    assert info.namespaces == ["default", "kube-system", NS]
    assert info.dns == "10.96.0.10" and info.sources["dns"].startswith("guessed")
    assert {"list_node", "list_namespace", "list_service_cidr"} <= set(kube.calls)
    # The refusals are debug lines; no traceback; the guesses are announced once, at WARNING.
    assert not [r for r in caplog.records if r.exc_info]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2 and all("guess" in w for w in warnings)
    assert "10.244.0.0/16" in warnings[1] and "10.96.0.0/16" in warnings[0]
    assert any("cannot list nodes" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)


async def test_guesses_stay_clear_of_the_laptops_networks() -> None:
    # The laptop sits on 192.168.1.0/24 and 10.20.30.0/24 (a corporate 10.x); the pods' /16 guesses
    # would swallow both.
    kube = NamespacedKube([_pod("192.168.50.3"), _pod("10.20.99.1"), _pod("10.20.30.40"), _pod("10.244.0.9")],
                          [_svc("10.96.0.50")])
    local = [ipaddress.ip_address(a) for a in ("192.168.1.17", "10.20.30.5", "127.0.0.1")]
    info = await discover(kube, local=local)  # type: ignore[arg-type]
    got = [str(n) for n in info.pod_cidrs]
    assert got == ["10.20.64.0/18", "10.244.0.0/16", "192.168.32.0/19"]
    for net in info.cidrs:
        assert not any(a in net for a in local)


def test_covering_narrows_or_drops(caplog: pytest.LogCaptureFixture) -> None:
    avoid = [ipaddress.ip_address("192.168.1.17"), ipaddress.ip_address("fd00:1::17")]
    assert [str(n) for n in covering(["192.168.1.200", "fd00:1::99", "fd00:2::1"], avoid=avoid)] == ["fd00:2::/64"]
    assert [str(n) for n in covering(["192.168.2.1"], avoid=avoid)] == ["192.168.2.0/23"]
    assert [str(n) for n in covering(["10.1.2.3"], avoid=avoid)] == ["10.1.0.0/16"]
    assert sum("on this machine's network" in r.getMessage() for r in caplog.records) == 2


def test_local_addresses_are_found_portably(monkeypatch: pytest.MonkeyPatch) -> None:
    # Loopback only: the host name resolves locally, and the "route towards" trick sends nothing.
    monkeypatch.setattr(socket, "gethostname", lambda: "localhost")
    found = local_addresses(["127.0.0.2"])
    assert ipaddress.ip_address("127.0.0.2") in found  # the target itself
    assert ipaddress.ip_address("127.0.0.1") in found  # what localhost resolves to / the source address
    assert local_addresses(["no such host.invalid."]) is not None


def test_discover_computes_local_addresses_towards_the_api_server(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr(discovery, "local_addresses", lambda towards: seen.append(list(towards)) or [])

    import asyncio

    asyncio.run(discover(NamespacedKube([], []), None))  # type: ignore[arg-type]
    assert seen == [["192.0.2.1"]]
