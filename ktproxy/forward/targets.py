"""What forward's TARGET names in the cluster: `NAME | svc/NAME | pod/NAME | IP | DNS name` -> a dial plan
whose addresses are re-resolved as pods come and go (kt-connect and kubectl redial a dead pod forever).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from typing import Any

from ktproxy import expose
from ktproxy.cluster.client import KubeClient
from ktproxy.cluster.errors import KubeError
from ktproxy.cluster.objects import SERVICE_KINDS, read_pod, read_service, split_target
from ktproxy.errors import KtError, UsageError
from ktproxy.expose import Remote

log = logging.getLogger("ktproxy.forward.targets")

DEFAULT_TTL = 1.0  # seconds a dial plan's addresses are reused before the API is asked again

_POD_KINDS = {"pod", "pods", "po"}


class DialPlan:
    """Where a forwarded connection goes. `endpoints()` is asked on every new connection; its answer is
    reused for `ttl` seconds (call `invalidate()` after a failed dial to ask the cluster again)."""

    def __init__(self, description: str, remote_port: int, ttl: float = DEFAULT_TTL) -> None:
        self.description = description  # "service 'tomcat'", "pod 'web-1'", "'10.96.0.5'"
        self.remote_port = remote_port  # the port the user thinks of (service port, or REMOTE)
        self.ttl = ttl
        self._cached: list[tuple[str, int]] | None = None
        self._expires = 0.0
        self._lock = asyncio.Lock()

    @property
    def default_local_port(self) -> int:
        return self.remote_port

    async def endpoints(self) -> list[tuple[str, int]]:
        """(host, port) candidates, best first; raises KtError when there is none right now."""
        async with self._lock:
            if self._cached is not None and time.monotonic() < self._expires:
                return self._cached
            found = await self._resolve()
            self._cached, self._expires = found, time.monotonic() + self.ttl
            return found

    def invalidate(self) -> None:
        self._cached = None

    async def _resolve(self) -> list[tuple[str, int]]:
        raise NotImplementedError


class AddressPlan(DialPlan):
    """An IP or DNS name, dialled as-is through the tunnel (the shadow resolves cluster names)."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(f"'{host}'", port)
        self.host = host

    async def _resolve(self) -> list[tuple[str, int]]:
        return [(self.host, self.remote_port)]


def _pod_ready(pod: Any) -> bool:
    if pod.metadata and pod.metadata.deletion_timestamp:
        return False
    st = pod.status
    if not st or st.phase != "Running" or not st.pod_ip:
        return False
    return any(c.type == "Ready" and c.status == "True" for c in st.conditions or [])


class ServicePlan(DialPlan):
    """The Ready pods behind a Service, re-read from the API (selector included: it may be taken over)."""

    def __init__(self, kube: KubeClient, namespace: str, service: Any, port: Any, ttl: float = DEFAULT_TTL) -> None:
        super().__init__(f"service '{service.metadata.name}'", int(port.port), ttl)
        self.kube = kube
        self.namespace = namespace
        self.name = service.metadata.name
        self.port_name = port.name
        self.service_port = int(port.port)

    def _port_of(self, service: Any) -> Any:
        for p in service.spec.ports or []:
            if (self.port_name and p.name == self.port_name) or (not self.port_name and p.port == self.service_port):
                return p
        raise KtError(f"service '{self.name}' no longer has port {self.service_port}")

    async def _resolve(self) -> list[tuple[str, int]]:
        service = await read_service(self.kube, self.namespace, self.name)
        port = self._port_of(service)
        selector = service.spec.selector or {}
        if not selector:  # endpoints managed by hand: the cluster IP is the only way in
            ip = service.spec.cluster_ip
            if not ip or ip == "None":
                raise KtError(f"service '{self.name}' has neither a selector nor a cluster IP to forward to")
            return [(ip, self.service_port)]
        out = []
        for pod in await expose.selected_pods(self.kube, self.namespace, selector):
            if not _pod_ready(pod):
                continue
            target = port.target_port if port.target_port is not None else port.port
            if isinstance(target, str) and not target.isdigit():
                number = expose.container_port_numbers(pod).get(target)
                if number is None:
                    continue
            else:
                number = int(target)
            out.append((pod.status.pod_ip, number))
        if not out:
            raise KtError(f"no Ready pod behind service '{self.name}' right now")
        return out


class PodPlan(DialPlan):
    """One pod by name; a pod its controller replaced has a new name, so this fails clearly then."""

    def __init__(self, kube: KubeClient, namespace: str, name: str, port: int, ttl: float = DEFAULT_TTL) -> None:
        super().__init__(f"pod '{name}'", port, ttl)
        self.kube = kube
        self.namespace = namespace
        self.name = name

    async def _resolve(self) -> list[tuple[str, int]]:
        try:
            pod = await read_pod(self.kube, self.namespace, self.name)
        except KubeError as exc:
            if exc.status == 404:
                raise KtError(f"pod '{self.name}' is gone (deleted or replaced); forward to its service to "
                              "follow replacements") from None
            raise
        if not _pod_ready(pod):
            phase = (pod.status.phase if pod.status else None) or "Pending"
            raise KtError(f"pod '{self.name}' is not ready ({phase})")
        return [(pod.status.pod_ip, self.remote_port)]


def _pick_service_port(service: Any, remote: Remote | None, named: dict[str, int]) -> Any:
    ports = list(service.spec.ports or [])
    name = service.metadata.name
    if not ports:
        raise KtError(f"service '{name}' has no ports")
    if remote is None:
        if len(ports) > 1:
            raise UsageError(f"service '{name}' has several ports, choose one with LOCAL:REMOTE "
                             f"(ports: {expose.describe_ports(service)})")
        return ports[0]
    port, _, _ = expose.resolve_remote(service, remote, named)
    return port


def _pick_pod_port(pod: Any, remote: Remote | None) -> int:
    named = expose.container_port_numbers(pod)
    if isinstance(remote, int):
        return remote  # a pod may listen on ports it never declared
    if isinstance(remote, str):
        if remote not in named:
            raise KtError(f"pod '{pod.metadata.name}' declares no port named '{remote}'")
        return named[remote]
    declared = [int(cp.container_port) for c in pod.spec.containers or [] for cp in c.ports or []]
    if len(declared) == 1:
        return declared[0]
    listed = ", ".join(map(str, declared)) or "none declared"
    raise UsageError(f"pod '{pod.metadata.name}' needs a port, give LOCAL:REMOTE (its ports: {listed})")


def _address(text: str) -> str | None:
    """The text if it is an IP address or a DNS name (has a dot), else None."""
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        return text if "." in text else None


async def resolve_forward(
    kube: KubeClient, namespace: str, text: str, remote: Remote | None, ttl: float = DEFAULT_TTL
) -> DialPlan:
    """The dial plan for `ktctl forward TARGET [LOCAL[:REMOTE]]`."""
    kind, name = split_target(text)
    if kind is None:
        host = _address(name)
        if host is not None:
            if not isinstance(remote, int):
                raise UsageError(f"a port must be specified because '{name}' is not a service name")
            return AddressPlan(host, remote)
        kind = "svc"
    if kind in SERVICE_KINDS:
        service = await read_service(kube, namespace, name)
        named: dict[str, int] = {}
        if remote is not None and expose.needs_pods(service):
            named = expose.named_ports_of(
                await expose.selected_pods(kube, namespace, service.spec.selector or {}))
        port = _pick_service_port(service, remote, named)
        return ServicePlan(kube, namespace, service, port, ttl)
    if kind in _POD_KINDS:
        pod = await read_pod(kube, namespace, name)
        return PodPlan(kube, namespace, name, _pick_pod_port(pod, remote), ttl)
    raise UsageError(f"cannot forward to {text!r}: give a service, svc/NAME, pod/NAME, an IP address or a DNS name")
