"""What an exchange does to the cluster while it runs, in either mode, and how each change is undone at
clean-up (see commands/exchange.py for what a user sees).

After a sleep or an API outage longer than the clean threshold (issue 18, G3), the sweep may have deleted
the shadow and put back what the exchange changed:
- selector mode EXITS: the sweep's recover hook (or `ktctl recover`) restored the selector and dropped
  kt-selector, so someone else holds the Service now (G1: the guard stands down, never takes it back).
  The guard's one WARNING line says so, and the command ends (exit 1) with its usual clean-up, which
  leaves the Service as it is and deletes only our shadow.
- scale mode RE-ASSERTS: when the heartbeat finds the shadow gone (or a gap) and the Deployment is back
  above 0, it is scaled to 0 again under the Service's kt-lock, unless someone else holds the Service
  meanwhile (a selector exchange or mesh switched it, another scale-mode shadow wears its labels,
  another user's exchange scaled it): then the command ends with one line naming them. The session
  brings the shadow pod itself back on its next reconnect. A deliberate `ktctl recover` on a live
  scale-mode exchange looks the same as the sweep and is undone too: stop the exchange to end it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ktproxy import lifecycle
from ktproxy.cluster import meta
from ktproxy.errors import KtError
from ktproxy.exchange.target import ExchangeTarget
from ktproxy.expose import ExposedPort
from ktproxy.shadow import reverse
from ktproxy.shadow.reverse import ReverseOptions

log = logging.getLogger("ktproxy")


async def take_selector(life: lifecycle.Lifecycle, kube: Any, options: ReverseOptions, target: ExchangeTarget,
                        ports: list[ExposedPort]) -> None:
    """Selector mode: shadow up and proven, then the Service's selector switched to it under the kt-lock,
    guarded, and put back (then waited out) at clean-up."""
    from ktproxy.cluster.client import Access
    from ktproxy.exchange.holder import refuse_if_taken
    from ktproxy.exchange.lock import service_lock
    from ktproxy.exchange.takeover import encode_selector, guard_selector, read, switch_selector, target_labels

    ns = kube.namespace
    name = target.service_name
    labels = target_labels(meta.ROLE_EXCHANGE_SHADOW)
    spec = reverse.ReverseSpec(role=meta.ROLE_EXCHANGE_SHADOW, name_prefix=f"{name}-kt-exchange-", ports=ports,
                       labels=labels, annotations={meta.KT_CONFIG: f"service={name}"})
    shadow = reverse.ReverseShadow(life, kube, options, spec)
    await shadow.preflight()
    await life.until_stopped(kube.require([Access("patch", "services", ns)]))
    user = shadow.shadow.options.user
    # Ctrl-C while another user holds the lock ends the wait at once (nothing of ours exists yet).
    async with service_lock(kube, ns, name, until=life.until_stopped):
        # Read again under the lock: another exchange may have finished its set-up meanwhile.
        await life.until_stopped(refuse_if_taken(kube, ns, await read(kube, ns, name)))
        await shadow.start()
        # Not interruptible: a switch cancelled half-way could leave the selector changed with no
        # restore registered; it is one PATCH.
        original = await switch_selector(kube, ns, name, labels, user)
        guard = asyncio.create_task(guard_selector(kube, ns, name, labels, original, user))
        # G3: a guard that stood down (its WARNING says who holds the Service now) ends the exchange.
        guard.add_done_callback(lambda t: _stood_down(life, t))
        owner = (labels, encode_selector(original), user)
        life.on_cleanup(f"original selector of service {name}", _restore, kube, ns, name, shadow, guard, owner)
        life.on_cleanup("selector guard", reverse.cancel_task, guard)
    await shadow.wait_serving(name)


def _stood_down(life: lifecycle.Lifecycle, guard: asyncio.Task[str]) -> None:
    if not guard.cancelled() and guard.exception() is None:
        life.end(None)


async def _restore(kube: Any, ns: str, name: str, shadow: reverse.ReverseShadow, guard: asyncio.Task[str],
                   owner: tuple[dict[str, str], str, str]) -> None:
    """The original selector back, unless someone else holds the Service now: the guard stood down
    (recover, another developer), or took over since its last look (restore_selector checks `owner`
    under the resourceVersion it writes with). Then only our shadow goes."""
    from ktproxy.exchange.takeover import restore_selector

    if guard.done() and not guard.cancelled() and guard.exception() is None:
        log.info("Leaving service %s to %s (this exchange stood down)", name, guard.result())
        return
    await asyncio.shield(restore_selector(kube, ns, name, owner=owner))
    # The shadow goes only once the cluster IP leads to the original pods again: deleted at once, the
    # requests kube-proxy still sent its way were refused (make demo's first curl after Ctrl-C got a 502).
    await shadow.wait_released(name)


async def take_by_scale(life: lifecycle.Lifecycle, kube: Any, options: ReverseOptions, target: ExchangeTarget,
                        ports: list[ExposedPort], recover_wait: float) -> None:
    """Scale mode: a shadow wearing the Deployment's labels, the Deployment at 0, and back (waited for) at
    clean-up. Set up under the Service's kt-lock, like selector mode and mesh: the Service and the
    Deployment are read again under it, so a second scale-mode exchange, a selector exchange or a mesh
    that finished its set-up meanwhile is refused naming its holder; the Deployment's kt-user then names
    us to the ones that come later (refuse_if_taken)."""
    from ktproxy.cluster.client import Access
    from ktproxy.exchange import scale
    from ktproxy.exchange.holder import refuse_if_taken
    from ktproxy.exchange.lock import service_lock
    from ktproxy.exchange.takeover import read

    ns = kube.namespace
    svc = target.service_name
    deployment = target.deployment or await life.until_stopped(
        scale.deployment_for_service(kube, ns, target.service))
    name = deployment.metadata.name
    _refuse_if_scaled(deployment, svc)
    replicas = deployment.spec.replicas if deployment.spec.replicas is not None else 1
    spec = reverse.ReverseSpec(role=meta.ROLE_EXCHANGE_SHADOW, name_prefix=f"{name}-kt-exchange-", ports=ports,
                       labels=scale.shadow_labels(deployment),
                       annotations={meta.KT_CONFIG: scale.scale_config(name, replicas)})
    shadow = reverse.ReverseShadow(life, kube, options, spec)
    await shadow.preflight()
    await life.until_stopped(kube.require([Access("patch", "deployments.apps", ns),
                                           Access("get", "deployments.apps", ns),
                                           Access("patch", "services", ns)]))
    user = shadow.shadow.options.user
    async with service_lock(kube, ns, svc, until=life.until_stopped):
        await life.until_stopped(refuse_if_taken(kube, ns, await read(kube, ns, svc)))
        deployment = await life.until_stopped(scale.read_deployment(kube, ns, name))
        _refuse_if_scaled(deployment, svc)
        await shadow.start()
        # Not interruptible, like the selector switch: one PATCH, and its undo is registered right after.
        original = await scale.scale_down(kube, ns, deployment, user)
        life.on_cleanup(f"replicas of deployment {name}", _scale_back, life, kube, ns, name, original,
                        recover_wait)
        shadow.shadow.on_lost.append(lambda lost: _rescale(life, kube, ns, svc, name, user, shadow, lost))
    await shadow.wait_serving(svc)


async def _rescale(life: lifecycle.Lifecycle, kube: Any, ns: str, svc: str, name: str, user: str,
                   shadow: reverse.ReverseShadow, lost: Any) -> None:
    """After the shadow was lost (a sweep) or a heartbeat gap: the Deployment back to 0 if the sweep (or
    recover) scaled it up and nobody else holds the Service; else end the exchange with one line."""
    from ktproxy.cluster.errors import KubeError
    from ktproxy.exchange import scale
    from ktproxy.exchange.lock import service_lock
    from ktproxy.exchange.takeover import read, refuse_if_switched

    def end(why: str) -> None:
        life.end(f"deployment {name} was scaled back while this exchange was away (ktctl clean or recover) "
                 f"and {why}; the exchange (scale mode) has ended")

    try:
        deployment = await scale.read_deployment(kube, ns, name)
    except KubeError as exc:
        if exc.status == 404:
            return end("has been deleted")
        raise
    if not deployment.spec.replicas:
        who = scale.scaled_by(deployment)
        if who and who != user:
            end(f"{who} has scaled it to 0 for an exchange of their own")
        return  # still at 0: ours
    async with service_lock(kube, ns, svc, until=life.until_stopped):
        service = await read(kube, ns, svc)
        try:
            await refuse_if_switched(kube, ns, service)
        except KtError as exc:
            return end(f"someone else holds the service now ({exc})")
        gone = {n for kind, _, n in lost.gone if kind == "pod"}
        other = await _other_scale_shadow(kube, ns, service, {shadow.pod_name, *gone})
        if other:
            return end(f"{other} exchanges it in scale mode now")
        deployment = await scale.read_deployment(kube, ns, name)
        if deployment.spec.replicas:
            log.warning("deployment %s was scaled back to %d while this exchange was away (ktctl clean or "
                        "recover); scaling it to 0 again", name, deployment.spec.replicas)
            await scale.scale_down(kube, ns, deployment, user)


async def _other_scale_shadow(kube: Any, ns: str, service: Any, ours: set[str]) -> str | None:
    """The user of a live scale-mode shadow of `service` that is not one of `ours` (pod names)."""
    from ktproxy.cluster.client import Access
    from ktproxy.exchange import scale
    from ktproxy.exchange.takeover import annotations_of, original_selector

    terms = ",".join(f"{k}={v}" for k, v in sorted(
        {**original_selector(service), meta.KT_ROLE: meta.ROLE_EXCHANGE_SHADOW}.items()))
    pods = await kube.call(kube.core.list_namespaced_pod, ns, label_selector=terms,
                           access=Access("list", "pods", ns))
    for pod in pods.items or []:
        if pod.metadata.name in ours or pod.metadata.deletion_timestamp:
            continue
        if "app" in scale.parse_kt_config(annotations_of(pod).get(meta.KT_CONFIG)):
            return annotations_of(pod).get(meta.KT_USER) or "another user"
    return None


def _refuse_if_scaled(deployment: Any, service: str) -> None:
    from ktproxy.exchange import scale

    who = scale.scaled_by(deployment)
    if who:
        raise KtError(f"deployment '{deployment.metadata.name}' is already scaled to 0 by another exchange "
                      f"({who}; `ktctl recover {service}` puts it back if that exchange is gone)")


async def _scale_back(life: lifecycle.Lifecycle, kube: Any, ns: str, name: str, replicas: int,
                      wait: float) -> None:
    """Back to the original replicas, then wait for them (so the shadow goes only when they serve)."""
    from ktproxy.exchange import scale

    await asyncio.shield(scale.scale_back(kube, ns, name, replicas))
    log.info("Waiting for deployment %s to be ready (interrupt again to stop waiting)", name)
    if not await life.interruptible(scale.wait_ready(kube, ns, name, replicas, wait)):
        log.warning("stopped waiting; the deployment comes back on its own")
