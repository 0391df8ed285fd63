"""What `ktctl mesh` puts into the cluster, as data: names, the version mark, the Service's port map, the
router pod, the stuntman Service and a developer's mesh Service.

Names and labels are kt-connect's (`<svc>-kt-router`, `<svc>-kt-stuntman`, `<svc>-kt-mesh-<value>`), so
either tool recognises the other's objects. The routes live in the router pod's kt-mesh-routes
annotation (grammar: ktwire/routes.py), which the router reads through a downward API file: the
router needs no API credentials.
"""

from __future__ import annotations

import re
import secrets
import string
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ktproxy.cluster import meta
from ktproxy.errors import KtError, UsageError
from ktproxy.expose import named_ports_of, needs_pods, resolve_remote, selected_pods
from ktwire.routes import ROUTES_ANNOTATION, Route, format_routes, is_route

DEFAULT_KEY = "version"
_KEY = re.compile(r"^[a-z][a-z0-9_-]*$")  # kt-connect's rule for the key of --version-mark
# A label key's name part (manual mode makes the key a pod label): alphanumeric at both ends.
_LABEL_NAME = re.compile(r"^[a-z0-9]([a-z0-9_.-]{0,61}[a-z0-9])?$")
_MAX_NAME = 63

ROUTER_COMMAND = ["/opt/ktproxy/bin/python", "-m", "shadow_image.router"]
ROUTER_CONTAINER = "router"
ROUTER_MOUNT = "/etc/kt-router"
ROUTER_ANNOTATIONS_FILE = f"{ROUTER_MOUNT}/annotations"
ROUTER_HEALTH_NAME = "kt-health"
ROUTER_HEALTH_PORTS = (2280, 2281, 2282, 2283, 2284)
# Long enough for the router to finish the requests it carries when the last developer leaves (it is
# deleted only after the Service's cluster IP stopped leading to it): its drain (shadow_image/router/
# server.py DRAIN, 10 s) plus a margin to close and exit, else the kubelet kills it as the drain ends.
ROUTER_GRACE_SECONDS = 15

def router_name(service: str) -> str:
    return f"{service}-kt-router"


def stuntman_name(service: str) -> str:
    return f"{service}-kt-stuntman"


def mesh_prefix(service: str) -> str:
    return f"{service}-kt-mesh-"


def mesh_name(service: str, value: str) -> str:
    return mesh_prefix(service) + value


def random_value() -> str:
    """kt-connect's default: 5 random lower-case letters."""
    return "".join(secrets.choice(string.ascii_lowercase) for _ in range(5))


@dataclass(frozen=True)
class VersionMark:
    key: str
    value: str

    @property
    def route(self) -> Route:
        return (self.key, self.value)

    @property
    def header(self) -> str:
        """As the banner prints it: 'VERSION: abcde'."""
        return f"{self.key.upper()}: {self.value}"

    @property
    def label(self) -> str:
        return f"{self.key}={self.value}"


def parse_version_mark(text: str | None) -> VersionMark:
    """kt-connect's --versionMark: '' -> version:<rnd5>; 'V' -> version:V; 'K:V' -> K:V; 'K:' -> K:<rnd5>.
    kt-connect only warns about a bad key and uses `version`; a typo would then silently route by a
    header nobody sends, so here it is refused."""
    key, value = DEFAULT_KEY, ""
    text = (text or "").strip()
    if ":" in text:
        key, value = (part.strip() for part in text.split(":", 1))
    else:
        value = text
    if not _KEY.match(key):
        raise UsageError(f"--version-mark: key {key!r} must start with a lower-case letter and contain only "
                         "a-z, 0-9, '_' and '-'")
    value = value or random_value()
    if not is_route(key, value):
        raise UsageError(f"--version-mark: value {value!r} must be 1-40 of a-z, 0-9 and '-', starting and "
                         "ending with a letter or digit (it becomes part of a Service name)")
    return VersionMark(key, value)


def check_label_key(mark: VersionMark) -> None:
    """Manual mode makes KEY a pod label: the API server also wants it to end alphanumeric."""
    if not _LABEL_NAME.match(mark.key):
        raise UsageError(f"--version-mark: key {mark.key!r} is not a valid label name (it must end with a "
                         "letter or digit, at most 63 characters)")


def check_names(service: str, value: str | None = None) -> None:
    """Every object mesh names after the Service must be one DNS label."""
    names = [router_name(service), stuntman_name(service)]
    if value is not None:
        names.append(mesh_name(service, value))
    for name in names:
        if len(name) > _MAX_NAME:
            raise UsageError(f"service name '{service}' is too long to mesh: '{name}' would exceed "
                             f"{_MAX_NAME} characters" + (" (choose a shorter --version-mark)" if value else ""))


# -------------------------------------------------------------------------------------------- ports
@dataclass(frozen=True)
class MeshPort:
    """One TCP port of the meshed Service: the router listens on `target`, upstreams serve `service`."""

    service: int
    target: int
    target_name: str | None = None

    @property
    def container_port_name(self) -> str:
        """A named targetPort must resolve on the router as it did on the original pods."""
        return self.target_name or f"kt-{self.target}"


def port_map(service: Any, named: dict[str, int]) -> list[MeshPort]:
    """Every TCP port of the Service (the router takes the whole Service, so it serves every port, not
    only the exposed ones); one entry per target port (two service ports on one target: the first)."""
    out: list[MeshPort] = []
    for p in service.spec.ports or []:
        if (p.protocol or "TCP") != "TCP":
            continue
        _, number, tname = resolve_remote(service, p.port, named)
        if any(m.target == number for m in out):
            continue
        out.append(MeshPort(int(p.port), number, tname))
    if not out:
        raise KtError(f"service '{service.metadata.name}' has no TCP port to mesh")
    return out


async def resolve_port_map(kube: Any, service: Any, selector: dict[str, str]) -> list[MeshPort]:
    named: dict[str, int] = {}
    if needs_pods(service):
        named = named_ports_of(await selected_pods(kube, service.metadata.namespace, selector))
    return port_map(service, named)


def health_port(ports: Iterable[MeshPort]) -> int:
    used = {p.target for p in ports}
    return next(h for h in ROUTER_HEALTH_PORTS if h not in used)


def service_ports(ports: Iterable[MeshPort]) -> list[dict[str, Any]]:
    return [{"name": f"kt-{p.service}", "port": p.service, "targetPort": p.target, "protocol": "TCP"}
            for p in ports]


# ------------------------------------------------------------------------------------------- objects
def routes_annotations(routes: Iterable[Route]) -> dict[str, str]:
    """The router's route list and kt-ref-count (kt-connect's user count: here, the number of routes)."""
    routes = list(routes)
    return {ROUTES_ANNOTATION: format_routes(routes), meta.KT_REF_COUNT: str(len(routes))}


def _service(name: str, namespace: str, ports: Iterable[MeshPort], selector: dict[str, str],
             labels: dict[str, str], annotations: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": {**labels, meta.CONTROL_BY: meta.KT},
                     "annotations": dict(annotations)},
        "spec": {"type": "ClusterIP", "selector": dict(selector), "ports": service_ports(ports)},
    }


def stuntman_service(service: str, namespace: str, ports: Iterable[MeshPort], original: dict[str, str],
                     heartbeat: int) -> dict[str, Any]:
    """`<svc>-kt-stuntman`: the original pods under another name, the router's default upstream."""
    return _service(stuntman_name(service), namespace, ports, original, {},
                    {meta.KT_LAST_HEART_BEAT: str(heartbeat), meta.KT_CONFIG: f"service={service}"})


def mesh_config(service: str, route: Route) -> str:
    """kt-config of a developer's mesh objects: which Service, by which route (clean and status read it)."""
    return f"service={service},route={route[0]}:{route[1]}"


def mesh_service(service: str, namespace: str, route: Route, ports: Iterable[MeshPort],
                 shadow_labels: dict[str, str], user: str, heartbeat: int) -> dict[str, Any]:
    """`<svc>-kt-mesh-<value>`: one developer's shadow, the upstream of their route."""
    return _service(mesh_name(service, route[1]), namespace, ports,
                    {meta.KT_ROLE: shadow_labels[meta.KT_ROLE], meta.KT_TARGET: shadow_labels[meta.KT_TARGET]},
                    {meta.KT_ROLE: meta.ROLE_MESH_SHADOW},
                    {meta.KT_USER: user, meta.KT_LAST_HEART_BEAT: str(heartbeat),
                     meta.KT_CONFIG: mesh_config(service, route)})


def router_labels(service: Any) -> dict[str, str]:
    """The router's selector labels: those the Service already points at (a router being re-created
    must be picked by the switched selector), else a fresh kt-target."""
    selector = dict(service.spec.selector or {})
    if selector.get(meta.KT_ROLE) == meta.ROLE_ROUTER and selector.get(meta.KT_TARGET):
        return {meta.KT_ROLE: meta.ROLE_ROUTER, meta.KT_TARGET: selector[meta.KT_TARGET]}
    return {meta.KT_ROLE: meta.ROLE_ROUTER, meta.KT_TARGET: meta.random_suffix(20)}


def router_pod(service: str, namespace: str, ports: list[MeshPort], labels: dict[str, str],
               routes: Iterable[Route], image: str, heartbeat: int, *,
               image_pull_secrets: Iterable[str] = (), node_selector: dict[str, str] | None = None
               ) -> dict[str, Any]:
    """The router pod (see the module doc). Non-root and credential-free like the shadow."""
    from ktproxy.shadow.pod import container_security, pod_security

    routes = list(routes)
    health = health_port(ports)
    container: dict[str, Any] = {
        "name": ROUTER_CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": list(ROUTER_COMMAND),
        "args": ["--service", service,
                 "--port", ",".join(f"{p.target}:{p.service}" for p in ports),
                 "--health-port", str(health),
                 "--annotations", ROUTER_ANNOTATIONS_FILE],
        "ports": [*({"name": p.container_port_name, "containerPort": p.target, "protocol": "TCP"} for p in ports),
                  {"name": ROUTER_HEALTH_NAME, "containerPort": health, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": ROUTER_HEALTH_NAME},
                           "periodSeconds": 1, "failureThreshold": 3},
        "volumeMounts": [{"name": "kt-router", "mountPath": ROUTER_MOUNT, "readOnly": True}],
        "securityContext": container_security(),
    }
    spec: dict[str, Any] = {
        "containers": [container],
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": ROUTER_GRACE_SECONDS,
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,  # routes come from the downward API file
        "securityContext": pod_security(any(p.target < 1024 for p in ports)),
        "volumes": [{"name": "kt-router", "downwardAPI": {"items": [
            {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}]}}],
    }
    if image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": s} for s in image_pull_secrets]
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": router_name(service),
            "namespace": namespace,
            "labels": {**labels, meta.CONTROL_BY: meta.KT},
            "annotations": {meta.KT_CONFIG: f"service={service}", meta.KT_LAST_HEART_BEAT: str(heartbeat),
                            **routes_annotations(routes)},
        },
        "spec": spec,
    }
