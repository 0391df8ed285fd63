"""The shared objects of an auto-mode mesh and their life: the stuntman Service, the router pod, the
Service's selector pointed at the router, and the way back (last one out, `recover`).

A mesh is shared by every developer meshing the Service; each one keeps it alive (heartbeat) and can
put the router back if it disappears. Set-up and the last-one-out decision run under the Service's
kt-lock (lock.py), so a developer joining never reuses a router another is deleting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ktproxy.cluster import meta
from ktproxy.cluster.errors import Access, KubeError
from ktproxy.errors import KtError
from ktproxy.exchange import holder, takeover
from ktproxy.mesh.routes import read_router
from ktproxy.mesh.spec import (
    MeshPort,
    Route,
    mesh_name,
    router_labels,
    router_name,
    router_pod,
    stuntman_name,
    stuntman_service,
)

log = logging.getLogger("ktproxy.mesh.shared")

GONE_TIMEOUT = 60.0  # a terminating router (grace 15 s) or shadow of the same name
# The set-up holds the lock while pods start: a second developer waits for it longer than exchange does.
LOCK_TRIES = 60
# On a leaving developer's shadow, written under the lock before it decides whether it is the last one
# out: its shadow may outlive that decision, and a second developer leaving must not count it.
LEAVING = "kt-mesh-leaving"


def is_meshed(service: Any) -> bool:
    """Does the Service's selector point at a router (auto mode), as switched by a kt tool?"""
    return (service.spec.selector or {}).get(meta.KT_ROLE) == meta.ROLE_ROUTER


async def mark_leaving(kube: Any, namespace: str, own: str) -> None:
    """Tag this developer's shadow as leaving (see LEAVING); a shadow already gone needs no tag."""
    now = int((await kube.cluster_time()).timestamp())
    try:
        await kube.call(kube.core.patch_namespaced_pod, own, namespace,
                        {"metadata": {"annotations": {LEAVING: str(now)}}}, access=Access("patch", "pods", namespace))
    except KubeError as exc:
        if exc.status != 404:
            raise


async def other_participants(kube: Any, namespace: str, service: str, own: str) -> list[str]:
    """Live auto-mode shadows of `service` other than `own` that are not leaving (a router's absence
    alone does not mean nobody meshes any more)."""
    from ktproxy.exchange.scale import parse_kt_config

    resp = await kube.call(kube.core.list_namespaced_pod, namespace,
                           label_selector=f"{meta.SELECTOR},{meta.KT_ROLE}={meta.ROLE_MESH_SHADOW}",
                           access=Access("list", "pods", namespace))
    out = []
    for pod in resp.items or []:
        annotations = takeover.annotations_of(pod)
        config = parse_kt_config(annotations.get(meta.KT_CONFIG))
        if (pod.metadata.name != own and not pod.metadata.deletion_timestamp and LEAVING not in annotations
                and config.get("service") == service and config.get("route") and config.get("mode") != "manual"):
            out.append(pod.metadata.name)
    return out


async def refuse_if_exchanged(kube: Any, namespace: str, service: Any) -> None:
    """Mesh joins a Service already meshed (its selector points at a router); an exchanged Service, or
    one selecting kt pods by hand, is refused naming the holder."""
    if is_meshed(service):
        return
    await holder.refuse_if_taken(kube, namespace, service)


def is_foreign_router(router: Any) -> bool:
    """A router pod ktctl did not make: kt-connect's nginx router keeps its routes in a file, so it has
    no kt-mesh-routes annotation (ours always has one, empty when no route is left)."""
    from ktwire.routes import ROUTES_ANNOTATION

    return ROUTES_ANNOTATION not in takeover.annotations_of(router)


async def refuse_foreign_router(kube: Any, namespace: str, service: str) -> None:
    """kt-connect's nginx router keeps its routes in a file, not in kt-mesh-routes: joining it would add
    a route nothing reads, and leaving would take it for an empty mesh and undo it under its users
    (clean leaves such a mesh alone for the same reason: mesh/clean.py)."""
    from ktwire.routes import ROUTES_ANNOTATION

    router = await read_router(kube, namespace, router_name(service))
    if router is not None and is_foreign_router(router):
        raise KtError(f"service '{service}' is meshed by another tool (router pod {router_name(service)} has no "
                      f"{ROUTES_ANNOTATION} annotation, as kt-connect's has not); ktctl cannot join it")


async def _exists(kube: Any, fn: Any, name: str, namespace: str, plural: str) -> Any | None:
    try:
        return await kube.call(fn, name, namespace, access=Access("get", plural, namespace))
    except KubeError as exc:
        if exc.status == 404:
            return None
        raise


async def check_value_free(kube: Any, namespace: str, service: str, value: str) -> None:
    """Refuse a version another developer uses (their `<svc>-kt-mesh-<value>` exists)."""
    name = mesh_name(service, value)
    for fn, plural in ((kube.core.read_namespaced_pod, "pods"), (kube.core.read_namespaced_service, "services")):
        found = await _exists(kube, fn, name, namespace, plural)
        if found is not None:
            who = takeover.annotations_of(found).get(meta.KT_USER) or "another user"
            raise KtError(f"{who} is meshing service '{service}' via version '{value}' ({plural[:-1]} {name} "
                          "exists); choose another with --version-mark")


async def delete_service(kube: Any, namespace: str, name: str) -> bool:
    """Delete one of our Services; False when it was not there (or not ours: then it is left alone)."""
    try:
        found = await kube.call(kube.core.read_namespaced_service, name, namespace,
                                access=Access("get", "services", namespace))
        if (found.metadata.labels or {}).get(meta.CONTROL_BY) != meta.KT:
            log.warning("service %s is not ktctl's; leaving it", name)
            return False
        await kube.call(kube.core.delete_namespaced_service, name, namespace,
                        access=Access("delete", "services", namespace))
        log.info("Deleted service %s", name)
        return True
    except KubeError as exc:
        if exc.status != 404:
            raise
        return False


async def create_service(kube: Any, namespace: str, body: dict[str, Any]) -> Any:
    name = body["metadata"]["name"]
    created = await kube.call(kube.core.create_namespaced_service, namespace, body,
                              access=Access("create", "services", namespace))
    log.info("Created service %s", name)
    return created


# ------------------------------------------------------------------------------------------ stuntman
async def ensure_stuntman(kube: Any, namespace: str, service: str, ports: list[MeshPort],
                          original: dict[str, str]) -> bool:
    """`<svc>-kt-stuntman` selecting the original pods: created when absent (True), else checked to be
    ours (kt-connect's or ours: control-by=kt)."""
    name = stuntman_name(service)
    found = await _exists(kube, kube.core.read_namespaced_service, name, namespace, "services")
    if found is None:
        if not original:
            raise KtError(f"service '{service}' has no selector (its endpoints are managed by hand); it cannot "
                          "be meshed in auto mode")
        now = int((await kube.cluster_time()).timestamp())
        try:
            await create_service(kube, namespace, stuntman_service(service, namespace, ports, original, now))
            return True
        except KubeError as exc:
            if exc.status != 409:
                raise
            found = await _exists(kube, kube.core.read_namespaced_service, name, namespace, "services")
    if found is not None and (found.metadata.labels or {}).get(meta.CONTROL_BY) != meta.KT:
        raise KtError(f"service '{name}' exists and was not created by ktctl; mesh needs that name")
    return False


async def wait_endpoints(kube: Any, namespace: str, name: str, like: str, limit: float = 30.0) -> bool:
    """Until Service `name` has ready endpoints whenever Service `like` has any (the stuntman must be
    a working upstream before the router sends default traffic to it)."""
    from ktproxy.cluster.endpoints import ready_addresses

    deadline = time.monotonic() + limit
    while True:
        try:
            want = await ready_addresses(kube, namespace, like)
            have = await ready_addresses(kube, namespace, name)
        except KubeError as exc:
            log.info("cannot confirm the endpoints of service %s (%s)", name, exc)
            return False
        if have or not want:
            return True
        if time.monotonic() > deadline:
            log.warning("service %s has no ready endpoints after %.0f s", name, limit)
            return False
        await asyncio.sleep(0.25)


# ------------------------------------------------------------------------------------------ router
async def wait_gone(kube: Any, namespace: str, name: str, limit: float = GONE_TIMEOUT) -> None:
    """Until pod `name` no longer exists (a terminating router or shadow of the same name)."""
    deadline = time.monotonic() + limit
    logged = False
    while await read_router(kube, namespace, name) is not None:
        if not logged:
            log.info("waiting for pod %s to go", name)
            logged = True
        if time.monotonic() > deadline:
            raise KtError(f"pod {name} is still being deleted after {limit:.0f} s; try again later")
        await asyncio.sleep(0.5)


async def ensure_router(kube: Any, namespace: str, service: Any, ports: list[MeshPort], route: Route,
                        options: Any, timeout: float) -> tuple[Any, bool]:  # noqa: ASYNC109 - a budget
    """The router pod, Ready: created with `route` as its only route when absent (True), else the
    existing one (the caller adds its route). A router being deleted is waited out first."""
    from ktproxy.shadow.pod import wait_ready

    name = router_name(service.metadata.name)
    pod = await read_router(kube, namespace, name)
    if pod is not None and pod.metadata.deletion_timestamp:
        await wait_gone(kube, namespace, name)
        pod = None
    created = False
    if pod is None:
        now = int((await kube.cluster_time()).timestamp())
        body = router_pod(service.metadata.name, namespace, ports, router_labels(service), [route],
                          options.image, now, image_pull_secrets=options.image_pull_secrets,
                          node_selector=options.node_selector)
        try:
            await kube.call(kube.core.create_namespaced_pod, namespace, body,
                            access=Access("create", "pods", namespace))
            created = True
            log.info("Creating router pod %s", name)
        except KubeError as exc:
            if exc.status != 409:
                raise
    try:
        pod = await wait_ready(kube, namespace, name, options.image, timeout, what="router pod", container="router")
    except BaseException:
        if created:  # ours and unused: nothing may be left behind by a failed set-up
            await asyncio.shield(delete_router(kube, namespace, service.metadata.name, grace=0))
        raise
    log.info("Router pod %s is ready (%s)", name, pod.status.pod_ip)
    return pod, created


async def delete_router(kube: Any, namespace: str, service: str, grace: int | None = None) -> bool:
    """Delete the router pod; grace None: its own termination grace, so it can finish what it carries."""
    name = router_name(service)
    kw: dict[str, Any] = {} if grace is None else {"grace_period_seconds": grace}
    try:
        await kube.call(kube.core.delete_namespaced_pod, name, namespace, access=Access("delete", "pods", namespace),
                        **kw)
        log.info("Deleted router pod %s", name)
        return True
    except KubeError as exc:
        if exc.status != 404:
            raise
        return False


def pod_ip(pod: Any) -> str | None:
    return pod.status.pod_ip if pod is not None and pod.status else None


async def switch_to_router(kube: Any, namespace: str, name: str, router: Any, user: str) -> bool:
    """Point the Service at the router unless it already does; True when this call switched it."""
    labels = {meta.KT_ROLE: meta.ROLE_ROUTER, meta.KT_TARGET: router.metadata.labels[meta.KT_TARGET]}
    service = await takeover.read(kube, namespace, name)
    current = dict(service.spec.selector or {})
    if current == labels and meta.KT_SELECTOR in takeover.annotations_of(service):
        return False
    if is_meshed(service):
        # Another router's labels (kt-connect's, or one re-created under new labels): re-point, keep
        # the saved original.
        await takeover.update_with_retry(kube, namespace, name, lambda svc: {
            "spec": {"selector": takeover.selector_patch(dict(svc.spec.selector or {}), labels)}})
        return True
    await takeover.switch_selector(kube, namespace, name, labels, user)
    return True


async def restore_service(kube: Any, namespace: str, name: str) -> bool:
    """The original selector back, if the Service points at a router (never undo someone's exchange)."""
    try:
        service = await takeover.read(kube, namespace, name)
    except KubeError as exc:
        if exc.status == 404:
            return False
        raise
    if not is_meshed(service):
        return False
    return await takeover.restore_selector(kube, namespace, name)


async def wait_router_released(kube: Any, namespace: str, service: str, router_ip: str | None,
                               limit: float = 20.0, grace: float = 1.0) -> None:
    """After the selector is restored: until the Service's EndpointSlices no longer name the router,
    then a short grace for the node's service routing to follow (used where no probe can tell)."""
    from ktproxy.cluster.endpoints import ready_addresses

    if router_ip:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            try:
                if router_ip not in await ready_addresses(kube, namespace, service):
                    break
            except KubeError:
                break
            await asyncio.sleep(0.25)
    await asyncio.sleep(grace)


async def remove_shared(kube: Any, namespace: str, service: str) -> list[str]:
    """Router (graceful) then stuntman, once nothing routes through them: the router's in-flight
    requests still use the stuntman, so it goes only after the router is gone."""
    done = []
    if await delete_router(kube, namespace, service):
        done.append(f"Deleted router pod {router_name(service)}")
    try:
        await wait_gone(kube, namespace, router_name(service))
    except KtError as exc:
        log.warning("%s", exc)
    if await delete_service(kube, namespace, stuntman_name(service)):
        done.append(f"Deleted service {stuntman_name(service)}")
    return done


async def delete_participant(kube: Any, namespace: str, service: str, value: str) -> list[str]:
    """One developer's objects: shadow pod + Secret and mesh Service (`<svc>-kt-mesh-<value>`)."""
    from ktproxy.shadow.pod import delete_shadow

    name = mesh_name(service, value)
    done = []
    if await delete_service(kube, namespace, name):
        done.append(f"Deleted service {name}")
    if await _exists(kube, kube.core.read_namespaced_pod, name, namespace, "pods") is not None:
        done.append(f"Deleted shadow pod {name}")
    for line in await delete_shadow(kube, name, namespace, quiet=True):
        done.append(line)
    return done


async def recover_mesh(kube: Any, namespace: str, service: Any) -> list[str]:
    """`ktctl recover SVC` for a meshed Service: original selector back at once, then router, stuntman,
    and every `<svc>-kt-mesh-*` shadow and Service (auto and manual), as kt-connect does. The selector
    goes first: a live participant re-creates a lost router only while the Service points at one.
    Returns one line per action, each already logged."""
    from ktproxy.shadow.pod import delete_shadow

    name = service.metadata.name
    done: list[str] = []

    def did(line: str) -> None:
        log.info("%s", line)
        done.append(line)

    original = takeover.original_selector(service)
    if await restore_service(kube, namespace, name):
        did(f"Restored the original selector of service {name}: {takeover.encode_selector(original)}")
    if await delete_router(kube, namespace, name, grace=0):
        done.append(f"Deleted router pod {router_name(name)}")
    if await delete_service(kube, namespace, stuntman_name(name)):
        done.append(f"Deleted service {stuntman_name(name)}")
    prefix = f"{name}-kt-mesh-"
    pods = await kube.call(kube.core.list_namespaced_pod, namespace,
                           label_selector=f"{meta.SELECTOR},{meta.KT_ROLE}={meta.ROLE_MESH_SHADOW}",
                           access=Access("list", "pods", namespace))
    for pod in pods.items or []:
        if pod.metadata.name.startswith(prefix):
            await delete_shadow(kube, pod.metadata.name, namespace, quiet=True)
            did(f"Deleted shadow pod {pod.metadata.name}")
    services = await kube.call(kube.core.list_namespaced_service, namespace, label_selector=meta.SELECTOR,
                               access=Access("list", "services", namespace))
    for svc in services.items or []:
        if svc.metadata.name.startswith(prefix) and await delete_service(kube, namespace, svc.metadata.name):
            done.append(f"Deleted service {svc.metadata.name}")
    return done
