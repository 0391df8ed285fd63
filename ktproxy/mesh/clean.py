"""What `clean` and `status` know about meshes.

clean (run before the generic stale sweep, which never deletes a router or a stuntman itself): a
participant whose shadow and mesh Service have both gone stale loses its route and its objects; a
router of ours left with no live route, no live participant and a stale heartbeat is the dead's last
one out: the Service gets its selector back first, then router and stuntman go. A live participant's
router and stuntman are never touched, and neither is a router ktctl did not make (kt-connect's keeps
its routes in a file, so nothing here can tell whether its users are alive).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from ktproxy.cluster import meta
from ktproxy.cluster.errors import Access, KubeError
from ktproxy.cluster.kt_objects import kt_object
from ktproxy.errors import KtError
from ktproxy.exchange import takeover
from ktproxy.exchange.scale import parse_kt_config
from ktproxy.mesh.routes import read_router, remove_route, routes_of
from ktproxy.mesh.shared import (
    delete_participant,
    delete_service,
    is_foreign_router,
    is_meshed,
    remove_shared,
    restore_service,
    wait_router_released,
)
from ktproxy.mesh.spec import mesh_name, router_name, stuntman_name

log = logging.getLogger("ktproxy.mesh.shared")

STUNTMAN_SUFFIX = "-kt-stuntman"
ROUTER_SUFFIX = "-kt-router"


async def _list(kube: Any, namespace: str | None, kind: str, **kw: Any) -> list[Any]:
    """Pods or Services in scope; none when the user may not list them (a namespace-scoped account)."""
    plural = f"{kind}s"
    try:
        if namespace is None:
            fn = getattr(kube.core, f"list_{kind}_for_all_namespaces")
            resp = await kube.call(fn, access=Access("list", plural), **kw)
        else:
            fn = getattr(kube.core, f"list_namespaced_{kind}")
            resp = await kube.call(fn, namespace, access=Access("list", plural, namespace), **kw)
    except KubeError as exc:
        if exc.status != 403:
            raise
        return []
    return list(resp.items or [])


def _role(obj: Any) -> str | None:
    return (obj.metadata.labels or {}).get(meta.KT_ROLE)


def service_of(obj: Any) -> str | None:
    """The meshed Service a router, stuntman or participant object belongs to (its kt-config)."""
    service = parse_kt_config(takeover.annotations_of(obj).get(meta.KT_CONFIG)).get("service")
    if service and service != obj.metadata.name:  # kt-connect's mesh shadows name themselves there
        return service
    name = obj.metadata.name
    for suffix in (ROUTER_SUFFIX, STUNTMAN_SUFFIX):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return service


def _manual(obj: Any) -> bool:
    """A manual-mode shadow: the Service selects it directly, it needs no router."""
    return parse_kt_config(takeover.annotations_of(obj).get(meta.KT_CONFIG)).get("mode") == "manual"


def _live(obj: Any | None, now: datetime, threshold: float, kind: str) -> bool:
    if obj is None or obj.metadata.deletion_timestamp:
        return False
    return (kt_object(kind, obj).idle(now) or 0.0) <= threshold


class _View:
    """The kt objects of one scope, looked up by (namespace, name)."""

    def __init__(self, pods: list[Any], services: list[Any]) -> None:
        self.pods = {(p.metadata.namespace, p.metadata.name): p for p in pods}
        self.services = {(s.metadata.namespace, s.metadata.name): s for s in services}

    def participant_live(self, ns: str, service: str, value: str, now: datetime, threshold: float) -> bool:
        """A shadow pod or mesh Service with a fresh heartbeat: its ktctl is alive (a shadow being
        replaced has no pod for a moment, its Service still beats)."""
        name = mesh_name(service, value)
        return (_live(self.pods.get((ns, name)), now, threshold, "pod")
                or _live(self.services.get((ns, name)), now, threshold, "service"))

    def any_participant_live(self, ns: str, service: str, now: datetime, threshold: float) -> bool:
        """Any auto-mode participant of `service` (shadow pod or mesh Service, whatever its route) with
        a fresh heartbeat: its ktctl may be re-joining, so the mesh is not the sweep's to undo."""
        for kind, objs in (("pod", self.pods), ("service", self.services)):
            for (ons, _), obj in objs.items():
                if (ons == ns and _role(obj) == meta.ROLE_MESH_SHADOW and service_of(obj) == service
                        and not _manual(obj) and _live(obj, now, threshold, kind)):
                    return True
        return False


async def clean_hook(kube: Any, namespace: str | None, now: datetime, threshold: float,
                     dry_run: bool) -> list[str]:
    pods = await _list(kube, namespace, "pod", label_selector=meta.SELECTOR)
    kt_services = await _list(kube, namespace, "service", label_selector=meta.SELECTOR)
    view = _View(pods, kt_services)
    lines: list[str] = []
    with_router: set[tuple[str, str]] = set()
    for router in [p for p in pods if _role(p) == meta.ROLE_ROUTER]:
        ns, service = router.metadata.namespace, service_of(router)
        if not service:
            continue
        with_router.add((ns, service))
        lines += await _sweep_router(kube, view, router, ns, service, now, threshold, dry_run)
    # A Service still pointing at a router that is gone, with nobody left to re-create it.
    for svc in await _list(kube, namespace, "service"):
        ns, name = svc.metadata.namespace, svc.metadata.name
        if ((ns, name) in with_router or not is_meshed(svc) or meta.KT_SELECTOR not in takeover.annotations_of(svc)
                or view.any_participant_live(ns, name, now, threshold)):
            continue
        lines.append(f"restore selector of service {ns}/{name} (its mesh router is gone)")
        if not dry_run:
            await restore_service(kube, ns, name)
    for (ns, name), svc in view.services.items():
        service = name[: -len(STUNTMAN_SUFFIX)] if name.endswith(STUNTMAN_SUFFIX) else None
        if (not service or (ns, service) in with_router or _live(svc, now, threshold, "service")
                or view.any_participant_live(ns, service, now, threshold)):
            continue
        lines.append(f"delete service {ns}/{name} (stuntman of a mesh that is gone)")
        if not dry_run:
            await delete_service(kube, ns, name)
    return lines


async def _sweep_router(kube: Any, view: _View, router: Any, ns: str, service: str, now: datetime,
                        threshold: float, dry_run: bool) -> list[str]:
    from ktproxy.exchange.lock import service_lock

    lines: list[str] = []
    if is_foreign_router(router):
        # kt-connect's router keeps its routes in a file: no annotation tells who is alive, so its
        # mesh is never ours to take apart (joining refuses it for the same reason).
        if not _live(router, now, threshold, "pod") and not view.any_participant_live(ns, service, now, threshold):
            lines.append(f"left the mesh of service {ns}/{service} alone: router pod {router.metadata.name} is "
                         f"not ktctl's (`ktctl recover {service}` puts the service back)")
        return lines
    routes = routes_of(router)
    live = [r for r in routes if view.participant_live(ns, service, r[1], now, threshold)]
    for key, value in routes:
        if (key, value) in live:
            continue
        lines.append(f"remove route '{key.upper()}: {value}' of service {ns}/{service} (its ktctl is gone)")
        if not dry_run:
            await remove_route(kube, ns, router.metadata.name, value)
            lines += [f"  {line}" for line in await delete_participant(kube, ns, service, value)]
    if live:
        return lines
    if _live(router, now, threshold, "pod") or view.any_participant_live(ns, service, now, threshold):
        # Someone still beats the router, or a participant whose route is missing lives (its keeper
        # adds the route again): only a stale mesh with nobody left is undone.
        return lines
    lines.append(f"restore selector of service {ns}/{service}, delete {router_name(service)} and "
                 f"{stuntman_name(service)} (no live mesh left)")
    if dry_run:
        return lines
    try:
        # Under the lock, as a leaving developer decides: one joining meanwhile has added its route.
        async with service_lock(kube, ns, service):
            current = await read_router(kube, ns, router.metadata.name)
            if current is not None and (is_foreign_router(current) or routes_of(current)):
                lines[-1] = f"kept the mesh of service {ns}/{service} (a developer joined meanwhile)"
                return lines
            await restore_service(kube, ns, service)
            await wait_router_released(kube, ns, service, current.status.pod_ip if current and current.status
                                       else None)
            await remove_shared(kube, ns, service)
    except KubeError as exc:
        if exc.status != 404:  # the Service itself is gone: only the router and stuntman are left
            raise
        await remove_shared(kube, ns, service)
    except KtError as exc:
        lines[-1] = f"could not put back the mesh of service {ns}/{service}: {exc}"
    return lines


# ------------------------------------------------------------------------------------------ status
async def participants(kube: Any, namespace: str | None) -> list[str]:
    """One line per mesh participant (every user's: a shared Service concerns everyone meshing it)."""
    lines = []
    for pod in await _list(kube, namespace, "pod", label_selector=f"{meta.SELECTOR},{meta.KT_ROLE}="
                                                                  f"{meta.ROLE_MESH_SHADOW}"):
        config = parse_kt_config(takeover.annotations_of(pod).get(meta.KT_CONFIG))
        user = takeover.annotations_of(pod).get(meta.KT_USER) or "an unknown user"
        service = config.get("service") or "?"
        key, _, value = config.get("route", "").partition(":")
        if config.get("mode") == "manual":
            how = f"label {key}={value}" if value else "a version label"
            mode = "manual"
        else:
            how = f"header '{key.upper()}: {value}'" if value else "a header"
            mode = "auto"
        lines.append(f"service {pod.metadata.namespace}/{service}: meshed by {user} via {how} ({mode}, "
                     f"shadow {pod.metadata.name})")
    return lines
