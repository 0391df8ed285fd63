"""The router pod's route list: its kt-mesh-routes annotation (`key:value,...`) and kt-ref-count (the number
of routes, decimal, as kt-connect counts its users), changed one route at a time.

Several developers write it at once: every write carries the resourceVersion it was computed from and a
409 means read again and retry (kt-connect's GET+Update had no retry, its fault d). A heartbeat stamp
on the pod also bumps the version; that costs one retry, never a lost route.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ktproxy.cluster import meta
from ktproxy.cluster.errors import Access, KubeError
from ktproxy.errors import KtError
from ktproxy.mesh.spec import routes_annotations
from ktwire.routes import ROUTES_ANNOTATION, Route, parse_routes

log = logging.getLogger("ktproxy.mesh.shared")

CONFLICT_RETRIES = 20


def parse(text: str | None) -> list[Route]:
    return parse_routes(text or "")


def routes_of(pod: Any) -> list[Route]:
    ann = (pod.metadata.annotations or {}) if pod.metadata else {}
    return parse(ann.get(ROUTES_ANNOTATION))


def with_route(routes: list[Route], route: Route) -> list[Route]:
    """`route` added (a value names one developer: a route with the same value and another key goes)."""
    return [r for r in routes if r[1] != route[1]] + [route]


def without_value(routes: list[Route], value: str) -> list[Route]:
    return [r for r in routes if r[1] != value]


def routes_patch(routes: list[Route], resource_version: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"metadata": {"annotations": routes_annotations(routes)}}
    if resource_version:
        body["metadata"]["resourceVersion"] = resource_version
    return body


async def read_router(kube: Any, namespace: str, name: str) -> Any | None:
    """The router pod, or None when there is none."""
    try:
        return await kube.call(kube.core.read_namespaced_pod, name, namespace,
                               access=Access("get", "pods", namespace))
    except KubeError as exc:
        if exc.status == 404:
            return None
        raise


async def update_routes(kube: Any, namespace: str, name: str, change: Callable[[list[Route]], list[Route]],
                        retries: int = CONFLICT_RETRIES) -> list[Route] | None:
    """Apply `change` to the router's routes, guarded by resourceVersion, retried on conflict. Returns
    the routes now in force, or None when the router pod does not exist (or is being deleted)."""
    for _ in range(retries):
        pod = await read_router(kube, namespace, name)
        if pod is None or pod.metadata.deletion_timestamp:
            return None
        current = routes_of(pod)
        wanted = change(current)
        if wanted == current and (pod.metadata.annotations or {}).get(meta.KT_REF_COUNT) == str(len(current)):
            return current
        try:
            await kube.call(kube.core.patch_namespaced_pod, name, namespace,
                            routes_patch(wanted, pod.metadata.resource_version),
                            access=Access("patch", "pods", namespace))
            return wanted
        except KubeError as exc:
            if exc.status == 404:
                return None
            if exc.status != 409:
                raise
            log.debug("router %s/%s changed while we wrote its routes; retrying", namespace, name)
    raise KtError(f"the routes of {name} keep changing under us; gave up after {retries} tries")


async def add_route(kube: Any, namespace: str, name: str, route: Route) -> list[Route] | None:
    return await update_routes(kube, namespace, name, lambda routes: with_route(routes, route))


async def remove_route(kube: Any, namespace: str, name: str, value: str) -> list[Route] | None:
    return await update_routes(kube, namespace, name, lambda routes: without_value(routes, value))
