"""What exchange, mesh and preview share: the laptop's ports served by one shadow pod over ONE SSH session, and
the proof that a connection made in the pod reaches the laptop before any cluster traffic is sent there.

The shadow listens on the exposed target ports itself (started with --expose, readiness on its health
port: Ready only while a laptop session has every port attached); the session asks for each port once
and again after every reconnect (SSHTunnel.expose).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncssh

from ktproxy import lifecycle
from ktproxy.errors import KtError
from ktproxy.expose import ExposedPort, check_local_port
from ktproxy.shadow.pod import ShadowOptions

log = logging.getLogger("ktproxy")
T = TypeVar("T")

LOCAL_HOST = "127.0.0.1"
HEALTH_PORT_NAME = "kt-health"
HEALTH_PORTS = (2280, 2281, 2282, 2283)  # the first one no exposed port uses
PROOF_TIMEOUT = 30.0
# How long the banner waits for the node's service routing (kube-proxy) to follow the new endpoints.
SERVICE_PROOF_TIMEOUT = 20.0


async def check_local_ports(ports: list[ExposedPort], skip: bool) -> None:
    if skip:
        return
    for p in ports:
        await check_local_port(LOCAL_HOST, p.local)


async def cancel_task(task: asyncio.Task[Any]) -> None:
    """Clean-up step for a background task (a guard, a heartbeat): cancel it and let it finish."""
    task.cancel()
    with contextlib.suppress(BaseException):
        await task


def health_port(ports: list[ExposedPort]) -> int:
    used = {p.target_port for p in ports}
    return next(h for h in HEALTH_PORTS if h not in used)


@dataclass(frozen=True)
class ReverseOptions:
    """What the command line says about a reverse shadow: the pod's shape (global flags), how long to
    wait for it, and whether the local ports were left unchecked (--skip-port-checking)."""

    shadow: ShadowOptions
    timeout: float
    skip_local_check: bool = False


@dataclass(frozen=True)
class ReverseSpec:
    """One command's shadow: its role, name prefix, the ports it serves and the labels a Service selects."""

    role: str
    name_prefix: str
    ports: list[ExposedPort]
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    name: str | None = None  # a fixed pod name (mesh) instead of name_prefix + random

    def shadow_role(self) -> Any:
        from ktproxy.shadow.pod import ShadowRole

        health = health_port(self.ports)
        declared: dict[int, str] = {}
        for p in self.ports:
            declared.setdefault(p.target_port, p.container_port_name)
        numbers = ",".join(str(n) for n in declared)
        return ShadowRole(
            role=self.role,
            name_prefix=self.name_prefix,
            ports=(*((name, n) for n, name in declared.items()), (HEALTH_PORT_NAME, health)),
            args=("--expose", numbers, "--health-port", str(health)),
            health_port=HEALTH_PORT_NAME,
            labels=dict(self.labels),
            annotations=dict(self.annotations),
            name=self.name,
        )


class ReverseShadow:
    """The shadow pod and the one session that carries every exposed port back to the laptop."""

    def __init__(self, life: lifecycle.Lifecycle, kube: Any, options: ReverseOptions, spec: ReverseSpec) -> None:
        from ktproxy.shadow.session import ShadowSession
        from ktproxy.tunnel.keys import generate_session_keys
        from ktproxy.tunnel.session import SSHOptions, SSHTunnel

        self.life = life
        self.kube = kube
        self.spec = spec
        self.timeout = options.timeout
        self.skip_local_check = options.skip_local_check
        keys = generate_session_keys()
        self.shadow = ShadowSession(kube, kube.namespace, options.shadow, keys, role=spec.shadow_role())
        self.tunnel = SSHTunnel(self.shadow.connect, SSHOptions.for_session(keys))

    @property
    def pod_name(self) -> str:
        return self.shadow.pod.name if self.shadow.pod else "?"

    async def preflight(self) -> None:
        await self.life.until_stopped(self.shadow.preflight())

    async def start(self) -> None:
        """Pod, session with every port, pod Ready, path proven. Clean-up is registered as each exists."""
        life = self.life
        life.on_cleanup("shadow pod and secret", self.shadow.close)
        await life.until_stopped(self.shadow.start(timeout=self.timeout))
        life.on_cleanup("SSH session", self.tunnel.close)
        for p in self.spec.ports:
            await self.tunnel.expose(p.target_port, LOCAL_HOST, p.local)
        try:
            await life.until_stopped(self.tunnel.start())
        except (asyncssh.Error, ConnectionError) as exc:
            raise KtError(f"cannot open the SSH session to the shadow pod: {exc}") from None
        await life.until_stopped(self._wait_ready())
        if self.skip_local_check:
            log.info("Local ports not checked (--skip-port-checking): traffic fails until they listen")
        await life.until_stopped(all_or_none(prove_path(self.tunnel, p) for p in self.spec.ports))

    async def wait_serving(self, service: str) -> None:
        """Until Service `service` sends its traffic to this shadow only (its EndpointSlices say so)."""
        from ktproxy.cluster.endpoints import wait_for_addresses

        pod = self.shadow.pod
        assert pod is not None
        found = await self.kube.call(self.kube.core.read_namespaced_pod, pod.name, pod.namespace)
        ips = {a.ip for a in (found.status.pod_ips or []) if a.ip} or {found.status.pod_ip}
        if await self.life.until_stopped(wait_for_addresses(self.kube, pod.namespace, service, ips)):
            log.info("Service %s now sends its traffic to shadow pod %s only", service, pod.name)
        cluster_ip = await self.cluster_ip(service)
        if cluster_ip:
            await self.life.until_stopped(all_or_none(
                prove_service(self.tunnel, service, cluster_ip, p) for p in self.spec.ports))

    async def wait_released(self, service: str) -> None:
        """After the original selector is back: until the Service's cluster IP no longer leads here, so
        the shadow (and this machine) keep serving whatever kube-proxy still sends them until it follows
        the original pods; a further interrupt stops waiting."""
        cluster_ip = await self.cluster_ip(service)
        if cluster_ip and self.tunnel.is_up:
            await self.life.interruptible(all_or_none(
                prove_service(self.tunnel, service, cluster_ip, p, reaches=False) for p in self.spec.ports))

    async def cluster_ip(self, service: str) -> str | None:
        svc = await self.kube.call(self.kube.core.read_namespaced_service, service, self.kube.namespace)
        cluster_ip = svc.spec.cluster_ip if svc.spec else None
        return cluster_ip if cluster_ip and cluster_ip != "None" else None  # headless: no service routing

    async def _wait_ready(self) -> None:
        from ktproxy.shadow.pod import wait_ready

        pod = self.shadow.pod
        assert pod is not None
        await wait_ready(self.kube, pod.namespace, pod.name, self.shadow.options.image, self.timeout)


async def all_or_none(coros: Iterable[Awaitable[T]]) -> list[T]:
    """gather(), except that the first failure cancels the others: no proof may run on against a tunnel
    the clean-up is already closing."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


async def prove_path(tunnel: Any, port: ExposedPort, limit: float = PROOF_TIMEOUT) -> None:
    """Open a stream from inside the pod to its own exposed port and see the shadow's listener hand it,
    through this session, to this machine (tunnel.arrivals: the peer is the pod's own loopback, which
    cluster traffic never is). Whether the local service then answers is the local port check's part."""
    from ktproxy.routing import is_loopback_host

    arrived = asyncio.Event()

    def seen(remote_port: int, host: str, _port: int) -> None:
        if remote_port == port.target_port and is_loopback_host(host):
            arrived.set()

    problem = f"a connection made in the shadow pod to its port {port.target_port} did not reach this machine"
    tunnel.arrivals.append(seen)
    try:
        try:
            _, writer = await asyncio.wait_for(tunnel.open_connection(LOCAL_HOST, port.target_port), limit)
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            raise KtError(f"{problem}: {getattr(exc, 'reason', None) or exc}") from None
        try:
            await asyncio.wait_for(arrived.wait(), limit)
        except TimeoutError:
            raise KtError(f"{problem} within {limit:g} s") from None
        finally:
            writer.close()
    finally:
        tunnel.arrivals.remove(seen)
    log.info("Checked: port %d of the shadow pod reaches this machine (local port %d)", port.target_port, port.local)


async def prove_service(tunnel: Any, service: str, cluster_ip: str, port: ExposedPort,
                        limit: float = SERVICE_PROOF_TIMEOUT, *, reaches: bool = True,
                        payload: bytes | None = None, connect_port: int | None = None) -> bool:
    """Connect from the shadow pod to the Service's cluster IP until such a connection lands on this
    machine (reaches=False: until one no longer does): only then does the node's service routing
    (kube-proxy) follow the endpoints. The EndpointSlices alone were not enough: on a loaded node
    kube-proxy lagged them by seconds, and the seed's `curl http://tomcat:8080` right after the banner
    still met the original pod (and right after Ctrl-C, the deleted shadow). Probe connections are closed
    unused. Needs the node to let a pod reach itself through its Service (hairpin); without it this gives
    up after `limit` s with a warning rather than failing the command.

    mesh: `payload` (a request carrying the developer's header) is sent on each probe connection, so a
    router between the two picks the route by it; `connect_port` connects there instead of the
    Service port (a router pod's own IP and target port); `service` then names what is probed."""
    from ktproxy.routing import is_loopback_host

    arrived = asyncio.Event()

    def seen(remote_port: int, host: str, _port: int) -> None:
        if remote_port == port.target_port and not is_loopback_host(host):
            arrived.set()

    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    dest_port = connect_port or port.service_port
    where = f"service {service} ({cluster_ip}:{dest_port})"
    tunnel.arrivals.append(seen)
    try:
        while loop.time() < deadline:
            arrived.clear()
            writer = None
            try:
                _, writer = await asyncio.wait_for(tunnel.open_connection(cluster_ip, dest_port), 3)
                if payload:
                    writer.write(payload)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(arrived.wait(), 1)
                if arrived.is_set() == reaches:
                    log.info("Checked: %s %s this machine", where, "reaches" if reaches else "no longer reaches")
                    return True
            except (asyncssh.Error, OSError, TimeoutError):
                pass
            finally:
                if writer is not None:
                    writer.close()
            await asyncio.sleep(0.3)
    finally:
        tunnel.arrivals.remove(seen)
    log.warning("connections to %s %s this machine after %g s: the cluster's service routing is slow to "
                "follow, or pods cannot reach themselves through a Service here",
                where, "did not reach" if reaches else "still reach", limit)
    return False
