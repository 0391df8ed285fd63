"""preview's Service: a new Service NAME whose selector is the preview shadow's labels.

A name taken by a Service that is not ours is refused (kt-connect let the create fail with a raw
AlreadyExists); one of ours whose heartbeat is stale (a killed preview) is replaced.

After a sleep or an API outage longer than the clean threshold (issue 18, G3) the sweep has deleted the
Service (and the shadow, which the session brings back on its next reconnect). The heartbeat's 404 (or
its gap) calls `reassert_service`: the Service is created again while the name is free (RE-ASSERT);
once another developer's preview or a Service not created by ktctl has the name, the preview EXITS with
one line naming it (never taken back from another holder).
"""

from __future__ import annotations

import logging
from typing import Any

from ktproxy.cluster import meta
from ktproxy.cluster.client import KubeClient
from ktproxy.cluster.errors import Access, KubeError
from ktproxy.cluster.kt_objects import DEFAULT_THRESHOLD
from ktproxy.errors import KtError
from ktproxy.exchange.takeover import annotations_of
from ktproxy.expose import ExposedPort

log = logging.getLogger("ktproxy.preview")


def build_service(
    name: str, namespace: str, ports: list[ExposedPort], selector: dict[str, str], user: str,
    heartbeat: int, external: bool = False,
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {meta.CONTROL_BY: meta.KT, meta.KT_ROLE: meta.ROLE_PREVIEW_SHADOW},
            "annotations": {meta.KT_USER: user, meta.KT_LAST_HEART_BEAT: str(heartbeat)},
        },
        "spec": {
            "type": "LoadBalancer" if external else "ClusterIP",
            "selector": dict(selector),
            "ports": [{"name": f"kt-{p.service_port}", "port": p.service_port, "targetPort": p.target_port,
                       "protocol": "TCP"} for p in ports],
        },
    }


def is_ours(service: Any) -> bool:
    labels = (service.metadata.labels or {}) if service.metadata else {}
    return labels.get(meta.CONTROL_BY) == meta.KT and labels.get(meta.KT_ROLE) == meta.ROLE_PREVIEW_SHADOW


def _taken(name: str) -> KtError:
    return KtError(f"service '{name}' already exists and was not created by ktctl")


async def check_free(kube: KubeClient, namespace: str, name: str, now: int, stale_after: float) -> None:
    """Raise unless NAME is free or a stale preview of ours (then remove that one)."""
    try:
        existing = await kube.call(kube.core.read_namespaced_service, name, namespace,
                                   access=Access("get", "services", namespace))
    except KubeError as exc:
        if exc.status == 404:
            return
        raise
    if not is_ours(existing):
        raise _taken(name)
    ann = annotations_of(existing)
    beat = ann.get(meta.KT_LAST_HEART_BEAT, "")
    if beat.isdigit() and now - int(beat) <= stale_after:
        raise KtError(f"service '{name}' is already previewed by {ann.get(meta.KT_USER) or 'another user'}")
    log.info("Replacing stale preview service %s", name)
    await delete_service(kube, namespace, name, uid=existing.metadata.uid)


async def create_service(
    kube: KubeClient, namespace: str, name: str, ports: list[ExposedPort], selector: dict[str, str],
    user: str, external: bool = False, stale_after: float = DEFAULT_THRESHOLD,
) -> Any:
    """Create the preview Service; its heartbeat is the caller's to keep (heartbeat.py, kind 'service')."""
    now = int((await kube.cluster_time()).timestamp())
    await check_free(kube, namespace, name, now, stale_after)
    body = build_service(name, namespace, ports, selector, user, now, external)
    try:
        created = await kube.call(kube.core.create_namespaced_service, namespace, body,
                                  access=Access("create", "services", namespace))
    except KubeError as exc:
        if exc.status == 409:  # created between our check and now
            raise _taken(name) from None
        raise
    log.info("Created service %s (%s)", name, "LoadBalancer" if external else "ClusterIP")
    return created


async def delete_service(kube: KubeClient, namespace: str, name: str, uid: str | None = None) -> None:
    """Delete a preview Service of ours; anything else by that name is left alone. With `uid` (the one
    this session created, or the stale one it replaces) only that very object goes: once another
    developer has replaced it (ours went stale during a sleep), theirs is not ours to delete. The UID is
    also the delete's precondition, so a replacement between our read and our delete is safe too."""
    from kubernetes.client import V1DeleteOptions, V1Preconditions

    try:
        existing = await kube.call(kube.core.read_namespaced_service, name, namespace,
                                   access=Access("get", "services", namespace))
        if not is_ours(existing):
            log.warning("service %s is not a ktctl preview; leaving it", name)
            return
        if uid is not None and existing.metadata.uid != uid:
            log.warning("service %s is now %s's preview (ours was replaced); leaving it", name,
                        annotations_of(existing).get(meta.KT_USER) or "another user")
            return
        kw: dict[str, Any] = {}
        if uid is not None:
            kw["body"] = V1DeleteOptions(preconditions=V1Preconditions(uid=uid))
        await kube.call(kube.core.delete_namespaced_service, name, namespace,
                        access=Access("delete", "services", namespace), **kw)
        log.info("Deleted service %s", name)
    except KubeError as exc:
        if exc.status == 409 and uid is not None:  # replaced between our read and our delete
            log.warning("service %s was replaced meanwhile; leaving it", name)
            return
        if exc.status != 404:
            raise


async def reassert_service(
    kube: KubeClient, namespace: str, name: str, ports: list[ExposedPort], selector: dict[str, str],
    user: str, uid: str | None, external: bool = False,
) -> str | None:
    """After the heartbeat found the Service gone (or a gap): our Service `uid` is still there (its UID
    returned), or was created again (the new UID). KtError (one line naming the new owner) when someone
    else has the name now."""
    try:
        existing = await kube.call(kube.core.read_namespaced_service, name, namespace,
                                   access=Access("get", "services", namespace))
    except KubeError as exc:
        if exc.status != 404:
            raise
        existing = None
    if existing is not None:
        if existing.metadata.uid == uid:
            return uid
        owner = f"{annotations_of(existing).get(meta.KT_USER) or 'another user'}'s preview" if is_ours(existing) \
            else "a Service not created by ktctl"
        raise KtError(f"service '{name}' was swept while this preview was away and is now {owner}")
    log.warning("service %s was deleted while this preview was away (ktctl clean); creating it again", name)
    created = await create_service(kube, namespace, name, ports, selector, user, external=external)
    return created.metadata.uid
