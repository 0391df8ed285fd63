"""`ktctl recover SVC`, and the matching `clean` hook: put a Service back whatever killed the exchange
(or mesh: mesh/shared.py recover_mesh).

Everything needed is on cluster objects: kt-selector/kt-lock on the Service, kt-config on exchange
shadows (kt-connect's `service=<svc>` or `app=<deploy>,replicas=<n>`) and on a scaled Deployment.
Shadows go first, so a still-running exchange's selector guard has no live shadow to re-point at.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from ktproxy.cluster import meta
from ktproxy.cluster.client import KubeClient
from ktproxy.cluster.errors import Access, KubeError
from ktproxy.cluster.kt_objects import kt_object
from ktproxy.cluster.objects import is_subset, read_service
from ktproxy.exchange import lock, scale, takeover
from ktproxy.mesh import shared as mesh
from ktproxy.shadow.pod import delete_shadow

log = logging.getLogger("ktproxy.cleanup.recover")

_SHADOW_ROLES = (meta.ROLE_EXCHANGE_SHADOW, meta.ROLE_ROUTER)


def _labels(obj: Any) -> dict[str, str]:
    return dict((obj.metadata.labels or {}) if obj.metadata else {})


def belongs_to(pod: Any, service: Any, deployments: list[str]) -> bool:
    """Is this kt pod an exchange shadow (or router) of `service`?"""
    labels = _labels(pod)
    if labels.get(meta.KT_ROLE) not in _SHADOW_ROLES:
        return False
    current = dict(service.spec.selector or {})
    config = scale.parse_kt_config(takeover.annotations_of(pod).get(meta.KT_CONFIG))
    return (
        (meta.KT_ROLE in current and is_subset(current, labels))  # selector mode: the Service points at it
        or is_subset(takeover.original_selector(service), labels)  # scale mode: it wears the app's labels
        or config.get("service") == service.metadata.name
        or config.get("app") in deployments
    )


async def recover(kube: KubeClient, namespace: str, name: str) -> list[str]:
    """Undo every kt change to Service NAME; returns one line per action (or the 'clean and tidy' line)."""
    service = await read_service(kube, namespace, name)
    # A mesh first (selector back, router, stuntman, every <svc>-kt-mesh-*): then nothing below sees
    # a router.
    meshed = await mesh.recover_mesh(kube, namespace, service)  # logged as they ran
    done: list[str] = []
    original = takeover.original_selector(service)
    deployments = []
    if original:
        resp = await kube.call(kube.apps.list_namespaced_deployment, namespace,
                               access=Access("list", "deployments.apps", namespace))
        deployments = [d for d in resp.items or [] if is_subset(original, scale.template_labels(d))]
    names = [d.metadata.name for d in deployments]
    pods = await kube.call(kube.core.list_namespaced_pod, namespace, label_selector=meta.SELECTOR,
                           access=Access("list", "pods", namespace))
    replicas: dict[str, int] = {}
    for pod in pods.items or []:
        if not belongs_to(pod, service, names):
            continue
        config = scale.parse_kt_config(takeover.annotations_of(pod).get(meta.KT_CONFIG))
        if config.get("app") in names and config.get("replicas", "").isdigit():
            replicas[config["app"]] = int(config["replicas"])
        await delete_shadow(kube, pod.metadata.name, namespace, quiet=True)
        done.append(f"Deleted shadow pod {pod.metadata.name}")
    if meta.KT_LOCK in takeover.annotations_of(service):
        await lock.release(kube, namespace, name)
        done.append(f"Removed the kt-lock of service {name}")
    if await takeover.restore_selector(kube, namespace, name):
        done.append(f"Restored the original selector of service {name}: {takeover.encode_selector(original)}")
    for dep in deployments:
        count = scale.recorded_replicas(dep) or replicas.get(dep.metadata.name)
        if count and (dep.spec.replicas or 0) == 0:
            await scale.scale_back(kube, namespace, dep.metadata.name, count)
            done.append(f"Scaled deployment {dep.metadata.name} back to {count}")
    for line in done:
        log.info("%s", line)
    return meshed + done or [f"Service {name} is clean and tidy, nothing would be done"]


async def _list(kube: KubeClient, namespace: str | None, namespaced: Any, everywhere: Any, plural: str,
                **kw: Any) -> list[Any]:
    """The items, or none when the user may not list them: a namespace-scoped account (the minimal Role
    in the README) can still run `clean` and `status` on what it may see."""
    try:
        if namespace is None:
            resp = await kube.call(everywhere, access=Access("list", plural), **kw)
        else:
            resp = await kube.call(namespaced, namespace, access=Access("list", plural, namespace), **kw)
    except KubeError as exc:
        if exc.status != 403:
            raise
        log.debug("not checking %s: %s", plural, exc)
        return []
    return list(resp.items or [])


async def changes(kube: KubeClient, namespace: str | None) -> list[str]:
    """What exchanges changed on objects ktproxy does not own: switched Service selectors and Deployments
    scaled to 0, one line each (for `ktctl status`; `ktctl recover SVC` puts them back)."""
    core, apps = kube.core, kube.apps
    services = await _list(kube, namespace, core.list_namespaced_service, core.list_service_for_all_namespaces,
                           "services")
    deployments = await _list(kube, namespace, apps.list_namespaced_deployment,
                              apps.list_deployment_for_all_namespaces, "deployments.apps")
    lines = []
    for svc in services:
        ann = takeover.annotations_of(svc)
        if meta.KT_SELECTOR in ann:
            lines.append(f"service {svc.metadata.namespace}/{svc.metadata.name}: selector switched by "
                         f"{ann.get(meta.KT_USER) or 'an unknown user'} (original "
                         f"{takeover.encode_selector(takeover.original_selector(svc))})")
    for dep in deployments:
        count = scale.recorded_replicas(dep)
        if count and (dep.spec.replicas or 0) == 0:
            lines.append(f"deployment {dep.metadata.namespace}/{dep.metadata.name}: scaled to 0 by an "
                         f"exchange (was {count})")
    return lines


# ------------------------------------------------------------------------------------------ clean hook
def _idle(pod: Any, now: datetime) -> float:
    return kt_object("pod", pod).idle(now) or 0.0


async def clean_hook(
    kube: KubeClient, namespace: str | None, now: datetime, threshold: float, dry_run: bool
) -> list[str]:
    """For `clean(..., hooks=)`: Services and Deployments whose exchange has no live shadow left
    (its heartbeat went stale, so clean removed it) are recovered; a stale kt-lock is dropped."""
    def listing(namespaced: Any, everywhere: Any, plural: str, **kw: Any) -> Any:
        return _list(kube, namespace, namespaced, everywhere, plural, **kw)

    core, apps = kube.core, kube.apps
    pods = await listing(core.list_namespaced_pod, core.list_pod_for_all_namespaces, "pods",
                         label_selector=meta.SELECTOR)
    live = [p for p in pods if _labels(p).get(meta.KT_ROLE) in _SHADOW_ROLES
            and _idle(p, now) <= threshold and not p.metadata.deletion_timestamp]
    services = await listing(core.list_namespaced_service, core.list_service_for_all_namespaces, "services")
    deployments = await listing(apps.list_namespaced_deployment, apps.list_deployment_for_all_namespaces,
                                "deployments.apps")
    lines: list[str] = []
    for svc in services:
        ns, name = svc.metadata.namespace, svc.metadata.name
        ann = takeover.annotations_of(svc)
        has_live = any(p.metadata.namespace == ns and belongs_to(p, svc, []) for p in live)
        # A Service pointing at a mesh router is the mesh hook's (mesh_clean): its router lives while
        # any participant does, whoever created it.
        if meta.KT_SELECTOR in ann and not has_live and not mesh.is_meshed(svc):
            lines.append(f"restore selector of service {ns}/{name} (its exchange is gone)")
            if not dry_run:
                await takeover.restore_selector(kube, ns, name)
        age = lock.lock_age(svc, now.timestamp())
        # A lock is stale after STALE_AFTER, or sooner when clean was asked to treat younger objects as
        # stale (--threshold below it): a set-up SIGKILLed after it locked left the Service refusing
        # everyone for 3 minutes after `clean --threshold-in-minutes 0` had removed all else it made.
        if age is not None and age >= min(threshold, lock.STALE_AFTER):
            lines.append(f"remove stale kt-lock of service {ns}/{name}")
            if not dry_run:
                await lock.release(kube, ns, name)
    for dep in deployments:
        ns, name = dep.metadata.namespace, dep.metadata.name
        count = scale.recorded_replicas(dep)
        users = [p for p in live if p.metadata.namespace == ns
                 and scale.parse_kt_config(takeover.annotations_of(p).get(meta.KT_CONFIG)).get("app") == name]
        if count and not users and (dep.spec.replicas or 0) == 0:
            lines.append(f"scale deployment {ns}/{name} back to {count} (its exchange is gone)")
            if not dry_run:
                try:
                    await scale.scale_back(kube, ns, name, count)
                except KubeError as exc:
                    lines.append(f"could not scale deployment {ns}/{name}: {exc}")
    return lines
