"""exchange scale mode: the shadow takes the workload's labels and its Deployment goes to 0 and back.

The replica count is recorded twice: in the shadow's kt-config (`app=<deploy>,replicas=<n>`, kt-connect's
format, so either tool's recover/clean can scale back) and in the Deployment's own kt-config annotation,
so `recover` still knows it when the shadow is already gone (a sweep, an eviction). Only metadata is
annotated: the pod template is untouched and nothing rolls out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ktproxy.cluster import meta
from ktproxy.cluster.client import KubeClient
from ktproxy.cluster.errors import Access, KubeError
from ktproxy.errors import KtError, UsageError
from ktproxy.exchange.takeover import CONFLICT_RETRIES, annotations_of, original_selector

log = logging.getLogger("ktproxy.exchange.scale")

RECOVER_WAIT = 120.0  # kt-connect's --recoverWaitTime
POLL_INTERVAL = 1.0


def format_kt_config(values: dict[str, str | int]) -> str:
    return ",".join(f"{k}={v}" for k, v in values.items())


def parse_kt_config(text: str | None) -> dict[str, str]:
    """kt-config 'k=v,k=v' from the cluster; a malformed value reads as empty rather than failing."""
    try:
        return meta.parse_kv_list(text)
    except UsageError:
        return {}


def scale_config(deployment: str, replicas: int) -> str:
    """The exchange shadow's kt-config in scale mode."""
    return format_kt_config({"app": deployment, "replicas": replicas})


def recorded_replicas(deployment: Any) -> int | None:
    """The replica count scale mode recorded on the Deployment, if any."""
    value = parse_kt_config(annotations_of(deployment).get(meta.KT_CONFIG)).get("replicas")
    return int(value) if value and value.isdigit() else None


def match_labels(deployment: Any) -> dict[str, str]:
    sel = deployment.spec.selector
    return dict((sel.match_labels or {}) if sel else {})


def template_labels(deployment: Any) -> dict[str, str]:
    tpl = deployment.spec.template
    return dict((tpl.metadata.labels or {}) if tpl and tpl.metadata else {})


def shadow_labels(deployment: Any) -> dict[str, str]:
    """Labels for a scale-mode shadow: the Deployment's matchLabels, so the unchanged Service selects it."""
    return {**match_labels(deployment), meta.KT_ROLE: meta.ROLE_EXCHANGE_SHADOW}


async def deployment_for_service(kube: KubeClient, namespace: str, service: Any) -> Any:
    """The first Deployment (by name) whose pod template labels contain the Service's selector."""
    selector = original_selector(service)
    name = service.metadata.name
    if not selector:
        raise KtError(f"service '{name}' has no selector, so no deployment behind it can be scaled")
    resp = await kube.call(kube.apps.list_namespaced_deployment, namespace,
                           access=Access("list", "deployments.apps", namespace))
    found = sorted((d for d in resp.items or []
                    if all(template_labels(d).get(k) == v for k, v in selector.items())),
                   key=lambda d: d.metadata.name)
    if not found:
        raise KtError(f"no deployment in namespace {namespace} runs the pods of service '{name}'")
    if len(found) > 1:
        log.info("Using first matched deployment '%s'", found[0].metadata.name)
    return found[0]


async def _patch(kube: KubeClient, namespace: str, name: str, body: dict[str, Any]) -> Any:
    return await kube.call(kube.apps.patch_namespaced_deployment, name, namespace, body,
                           access=Access("patch", "deployments.apps", namespace))


async def scale_down(kube: KubeClient, namespace: str, deployment: Any, user: str | None = None,
                     tries: int = CONFLICT_RETRIES) -> int:
    """Record the replicas (and `user`, whom selector exchanges and meshes name as the holder) on the
    Deployment and set them to 0; returns the original count. Each write carries the resourceVersion of
    the Deployment it was computed from (`deployment` first, then a fresh read after a 409).

    A Deployment already at 0 with a recorded count (a crashed earlier exchange) keeps that count; so does
    our own write whose answer was lost (a 409 or no answer, then the read shows it)."""
    name = deployment.metadata.name
    for _ in range(tries):
        current = deployment.spec.replicas if deployment.spec.replicas is not None else 1
        replicas = recorded_replicas(deployment) if current == 0 and recorded_replicas(deployment) else current
        if current == 0 and user is not None and annotations_of(deployment).get(meta.KT_USER) == user \
                and recorded_replicas(deployment):
            return replicas  # ours already (a lost answer); the kt-lock keeps other exchanges out
        log.info("Scaling deployment %s from %d to 0", name, current)
        annotations: dict[str, str] = {meta.KT_CONFIG: format_kt_config({"replicas": replicas})}
        if user is not None:
            annotations[meta.KT_USER] = user
        try:
            await _patch(kube, namespace, name, {
                "metadata": {"annotations": annotations, "resourceVersion": deployment.metadata.resource_version},
                "spec": {"replicas": 0},
            })
            return replicas
        except KubeError as exc:
            if exc.status not in (409, None):
                raise
        deployment = await read_deployment(kube, namespace, name)
    raise KtError(f"deployment '{name}' keeps changing under us; gave up after {tries} tries, try again later")


async def read_deployment(kube: KubeClient, namespace: str, name: str) -> Any:
    return await kube.call(kube.apps.read_namespaced_deployment, name, namespace,
                           access=Access("get", "deployments.apps", namespace))


def scaled_by(deployment: Any) -> str | None:
    """Who scaled this Deployment to 0 in an exchange (its kt-user, else "another user"); None if nobody."""
    if recorded_replicas(deployment) is None or deployment.spec.replicas:
        return None
    return annotations_of(deployment).get(meta.KT_USER) or "another user"


async def scale_holder(kube: KubeClient, namespace: str, service: Any) -> str | None:
    """Who holds `service` through a scale-mode exchange, for holder.refuse_if_taken: a live scale-mode shadow
    wearing the Service's (original) selector, or a Deployment behind it scaled to 0 by an exchange.
    A user who may not list deployments is checked by the shadows alone."""
    selector = original_selector(service)
    if not selector:
        return None
    terms = ",".join(f"{k}={v}" for k, v in sorted({**selector, meta.KT_ROLE: meta.ROLE_EXCHANGE_SHADOW}.items()))
    pods = await kube.call(kube.core.list_namespaced_pod, namespace, label_selector=terms,
                           access=Access("list", "pods", namespace))
    for pod in pods.items or []:
        if not pod.metadata.deletion_timestamp and "app" in parse_kt_config(annotations_of(pod).get(meta.KT_CONFIG)):
            return annotations_of(pod).get(meta.KT_USER) or "another user"
    try:
        resp = await kube.call(kube.apps.list_namespaced_deployment, namespace,
                               access=Access("list", "deployments.apps", namespace))
    except KubeError as exc:
        if exc.status != 403:
            raise
        return None
    for dep in sorted(resp.items or [], key=lambda d: d.metadata.name):
        if all(template_labels(dep).get(k) == v for k, v in selector.items()):
            who = scaled_by(dep)
            if who:
                return who
    return None


async def scale_back(kube: KubeClient, namespace: str, name: str, replicas: int) -> None:
    """Set the replicas back and drop the record (a Deployment deleted meanwhile is not an error)."""
    log.info("Recovering deployment %s to %d replicas", name, replicas)
    try:
        await _patch(kube, namespace, name, {
            "metadata": {"annotations": {meta.KT_CONFIG: None, meta.KT_USER: None}},
            "spec": {"replicas": replicas},
        })
    except KubeError as exc:
        if exc.status != 404:
            raise
        log.warning("deployment %s/%s is gone; nothing to scale back", namespace, name)


async def wait_ready(
    kube: KubeClient, namespace: str, name: str, replicas: int,
    max_wait: float = RECOVER_WAIT, interval: float = POLL_INTERVAL,
) -> bool:
    """Wait until `replicas` pods of the Deployment are ready; False on timeout. Cancel to stop waiting
    (the command does on a second Ctrl-C)."""
    deadline = time.monotonic() + max_wait
    last = None
    while True:
        dep = await kube.call(kube.apps.read_namespaced_deployment, name, namespace,
                              access=Access("get", "deployments.apps", namespace))
        ready = (dep.status.ready_replicas if dep.status else None) or 0
        if ready >= replicas:
            return True
        if ready != last:
            log.info("Waiting for deployment %s: %d/%d pods ready", name, ready, replicas)
            last = ready
        if time.monotonic() >= deadline:
            log.warning("deployment %s has %d/%d pods ready after %.0f s; not waiting longer",
                        name, ready, replicas, max_wait)
            return False
        await asyncio.sleep(interval)
