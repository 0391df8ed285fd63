"""`--expose LOCAL[:REMOTE][,...]`: parsing, and resolving each REMOTE against a Service.

kt-connect accepts only the target port as REMOTE and confuses users who type the service port (its
#367, #315). Here REMOTE may be the service port, the numeric target port, or a named target port (by
name or by the number it resolves to in a selected pod), so every spelling a user is likely to type works.
The result tells the shadow which container ports to declare: with the target port's NAME, a Service
whose targetPort is a name keeps resolving once its selector points at the shadow.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

from ktproxy.cluster import meta
from ktproxy.cluster.client import KubeClient
from ktproxy.cluster.errors import Access
from ktproxy.errors import KtError, UsageError

LOCAL_CHECK_TIMEOUT = 2.0

Remote = int | str  # a port number, or a port name (named targetPort / service port name)


@dataclass(frozen=True)
class PortPair:
    """One LOCAL[:REMOTE] item as typed."""

    local: int
    remote: Remote


@dataclass(frozen=True)
class ExposedPort:
    """A pair resolved against a Service (or, for preview, standing alone)."""

    local: int
    service_port: int  # the Service's `port` (preview: REMOTE)
    target_port: int  # the number the pods listen on
    target_name: str | None = None  # set when the Service's targetPort is a name

    @property
    def container_port_name(self) -> str:
        """The name the shadow declares this port under: the named targetPort itself, else kt-<n>."""
        return self.target_name or f"kt-{self.target_port}"


def _port_number(text: str, what: str, spec: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise UsageError(f"{what} {text!r} in {spec!r} is not a port number (1-65535)")
    return int(text)


def parse_port_pair(item: str, *, flag: str = "--expose", allow_names: bool = True) -> PortPair:
    """'8080' -> (8080, 8080); '8080:80' -> (8080, 80); '8080:http' -> (8080, 'http')."""
    item = item.strip()
    parts = item.split(":")
    if not item or len(parts) > 2 or not all(parts):
        raise UsageError(f"{flag} expects LOCAL[:REMOTE] (e.g. 8080 or 8080:80), got {item!r}")
    local = _port_number(parts[0], "local port", item)
    if len(parts) == 1:
        return PortPair(local, local)
    remote_text = parts[1]
    if remote_text.isdigit():
        return PortPair(local, _port_number(remote_text, "remote port", item))
    if allow_names and meta.is_port_name(remote_text):
        return PortPair(local, remote_text)
    kind = "a port number or port name" if allow_names else "a port number (1-65535)"
    raise UsageError(f"remote port {remote_text!r} in {item!r} is not {kind}")


def parse_expose(text: str, *, allow_names: bool = True) -> list[PortPair]:
    """`--expose 7001,8080:80` -> [PortPair(7001, 7001), PortPair(8080, 80)]; each port at most once."""
    if not text or not text.strip():
        raise UsageError("--expose expects LOCAL[:REMOTE][,...] (e.g. 8080 or 8080:80)")
    pairs = [parse_port_pair(item, allow_names=allow_names) for item in text.split(",")]
    for attr in ("local", "remote"):
        seen: set[Remote] = set()
        for p in pairs:
            value = getattr(p, attr)
            if value in seen:
                raise UsageError(f"{attr} port {value} appears twice in --expose {text!r}")
            seen.add(value)
    return pairs


# ------------------------------------------------------------------------------------------ service
def describe_ports(service: Any) -> str:
    """'8080->8080/http, 443->https' : port->targetPort, /name when the service port has one."""
    items = []
    for p in service.spec.ports or []:
        target = p.target_port if p.target_port is not None else p.port
        items.append(f"{p.port}->{target}" + (f"/{p.name}" if p.name else ""))
    return ", ".join(items) or "none"


def _named_target(p: Any) -> str | None:
    t = p.target_port
    return t if isinstance(t, str) and not t.isdigit() else None


def _numeric_target(p: Any) -> int:
    t = p.target_port
    if t is None:
        return int(p.port)
    return int(t) if not isinstance(t, str) or t.isdigit() else 0


def container_port_numbers(pod: Any) -> dict[str, int]:
    """{port name: containerPort} over the pod's containers (the first declaration of a name wins)."""
    out: dict[str, int] = {}
    for c in (pod.spec.containers or []) if pod.spec else []:
        for cp in c.ports or []:
            if cp.name and cp.name not in out:
                out[cp.name] = int(cp.container_port)
    return out


def named_ports_of(pods: list[Any]) -> dict[str, int]:
    """Named container ports of the first pod that declares any: a named targetPort resolves there."""
    for pod in pods:
        names = container_port_numbers(pod)
        if names:
            return names
    return {}


def resolve_remote(service: Any, remote: Remote, named: dict[str, int]) -> tuple[Any, int, str | None]:
    """(service port object, target port number, target name or None) for one REMOTE.

    Order: the service port (number or name), then the numeric target port, then a named target port
    (by name, or by the number a selected pod gives it). Raises with the ports to choose from.
    """
    ports = list(service.spec.ports or [])
    name = service.metadata.name

    def target_of(p: Any) -> tuple[int, str | None]:
        tname = _named_target(p)
        if tname is None:
            return _numeric_target(p), None
        if tname not in named:
            raise KtError(
                f"service '{name}' port {p.port} has named target port '{tname}', which no pod selected by "
                "the service declares"
            )
        return named[tname], tname

    matchers = (
        lambda p: p.port == remote or (p.name is not None and p.name == remote),
        lambda p: _named_target(p) is None and _numeric_target(p) == remote,
        lambda p: _named_target(p) == remote or (_named_target(p) in named and named[_named_target(p)] == remote),
    )
    for match in matchers:
        for p in ports:
            if match(p):
                return (p, *target_of(p))
    raise KtError(f"port {remote} is not a port of service '{name}' (ports: {describe_ports(service)})")


def needs_pods(service: Any) -> bool:
    """True when a targetPort is a name: resolving it needs a pod the Service selects."""
    return any(_named_target(p) for p in service.spec.ports or [])


async def selected_pods(kube: KubeClient, namespace: str, selector: dict[str, str]) -> list[Any]:
    """Pods matching `selector`, running and not terminating ones first."""
    if not selector:
        return []
    label_selector = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
    resp = await kube.call(kube.core.list_namespaced_pod, namespace, label_selector=label_selector,
                           access=Access("list", "pods", namespace))
    pods = list(resp.items or [])

    def rank(pod: Any) -> int:
        alive = not (pod.metadata and pod.metadata.deletion_timestamp)
        running = bool(pod.status and pod.status.phase == "Running")
        return 0 if alive and running else 1 if alive else 2

    return sorted(pods, key=rank)


async def resolve_expose(
    kube: KubeClient, service: Any, pairs: list[PortPair], selector: dict[str, str] | None = None
) -> list[ExposedPort]:
    """Resolve every pair against `service`; `selector` picks the pods for named target ports (default:
    the service's own selector; exchange passes the original one while the service is taken over)."""
    named: dict[str, int] = {}
    if needs_pods(service):
        sel = selector if selector is not None else (service.spec.selector or {})
        named = named_ports_of(await selected_pods(kube, service.metadata.namespace, sel))
    out: list[ExposedPort] = []
    for pair in pairs:
        p, number, tname = resolve_remote(service, pair.remote, named)
        twin = next((o for o in out if o.target_port == number), None)
        if twin is not None:
            raise UsageError(f"--expose gives target port {number} of service '{service.metadata.name}' twice "
                             f"(local ports {twin.local} and {pair.local})")
        out.append(ExposedPort(pair.local, int(p.port), number, tname))
    return out


def standalone_ports(pairs: list[PortPair]) -> list[ExposedPort]:
    """Pairs with no Service behind them (preview): service port = target port = REMOTE."""
    out = []
    for pair in pairs:
        if not isinstance(pair.remote, int):
            raise UsageError(f"remote port {pair.remote!r} must be a number here (there is no service to name it)")
        out.append(ExposedPort(pair.local, pair.remote, pair.remote))
    return out


# ------------------------------------------------------------------------------------------ local
async def check_local_port(host: str, port: int, connect_timeout: float = LOCAL_CHECK_TIMEOUT) -> None:
    """Fail unless something accepts TCP connections on host:port (kt-connect's check never ran)."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), connect_timeout)
    except (OSError, TimeoutError):
        raise KtError(
            f"nothing is listening on local port {port} (start it first, or pass --skip-port-checking)"
        ) from None
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
