"""What an exchange does to the cluster while it runs, in either mode, and how each change is undone at
clean-up (see commands/exchange.py for what a user sees)."""

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
    from ktproxy.exchange.lock import service_lock
    from ktproxy.exchange.takeover import guard_selector, read, refuse_if_taken, switch_selector, target_labels

    ns = kube.namespace
    name = target.service_name
    labels = target_labels(meta.ROLE_EXCHANGE_SHADOW)
    spec = reverse.ReverseSpec(role=meta.ROLE_EXCHANGE_SHADOW, name_prefix=f"{name}-kt-exchange-", ports=ports,
                       labels=labels, annotations={meta.KT_CONFIG: f"service={name}"})
    shadow = reverse.ReverseShadow(life, kube, options, spec)
    await shadow.preflight()
    await life.until_stopped(kube.require([Access("patch", "services", ns)]))
    user = shadow.shadow.options.user
    async with service_lock(kube, ns, name):
        # Read again under the lock: another exchange may have finished its set-up meanwhile.
        await life.until_stopped(refuse_if_taken(kube, ns, await read(kube, ns, name)))
        await shadow.start()
        # Not interruptible: a switch cancelled half-way could leave the selector changed with no
        # restore registered; it is one PATCH.
        original = await switch_selector(kube, ns, name, labels, user)
        life.on_cleanup(f"original selector of service {name}", _restore, kube, ns, name, shadow)
        guard = asyncio.create_task(guard_selector(kube, ns, name, labels, original, user))
        life.on_cleanup("selector guard", reverse.cancel_task, guard)
    await shadow.wait_serving(name)


async def _restore(kube: Any, ns: str, name: str, shadow: reverse.ReverseShadow) -> None:
    from ktproxy.exchange.takeover import restore_selector

    await asyncio.shield(restore_selector(kube, ns, name))
    # The shadow goes only once the cluster IP leads to the original pods again: deleted at once, the
    # requests kube-proxy still sent its way were refused (make demo's first curl after Ctrl-C got a 502).
    await shadow.wait_released(name)


async def take_by_scale(life: lifecycle.Lifecycle, kube: Any, options: ReverseOptions, target: ExchangeTarget,
                        ports: list[ExposedPort], recover_wait: float) -> None:
    """Scale mode: a shadow wearing the Deployment's labels, the Deployment at 0, and back (waited for) at
    clean-up."""
    from ktproxy.cluster.client import Access
    from ktproxy.exchange import scale

    ns = kube.namespace
    deployment = target.deployment or await life.until_stopped(
        scale.deployment_for_service(kube, ns, target.service))
    name = deployment.metadata.name
    if scale.recorded_replicas(deployment) is not None and not deployment.spec.replicas:
        raise KtError(f"deployment '{name}' is already scaled to 0 by another exchange "
                      f"(`ktctl recover {target.service_name}` puts it back if that exchange is gone)")
    replicas = deployment.spec.replicas if deployment.spec.replicas is not None else 1
    spec = reverse.ReverseSpec(role=meta.ROLE_EXCHANGE_SHADOW, name_prefix=f"{name}-kt-exchange-", ports=ports,
                       labels=scale.shadow_labels(deployment),
                       annotations={meta.KT_CONFIG: scale.scale_config(name, replicas)})
    shadow = reverse.ReverseShadow(life, kube, options, spec)
    await shadow.preflight()
    await life.until_stopped(kube.require([Access("patch", "deployments.apps", ns),
                                           Access("get", "deployments.apps", ns)]))
    await shadow.start()
    original = await scale.scale_down(kube, ns, deployment)
    life.on_cleanup(f"replicas of deployment {name}", _scale_back, life, kube, ns, name, original,
                    recover_wait)
    await shadow.wait_serving(target.service_name)


async def _scale_back(life: lifecycle.Lifecycle, kube: Any, ns: str, name: str, replicas: int,
                      wait: float) -> None:
    """Back to the original replicas, then wait for them (so the shadow goes only when they serve)."""
    from ktproxy.exchange import scale

    await asyncio.shield(scale.scale_back(kube, ns, name, replicas))
    log.info("Waiting for deployment %s to be ready (interrupt again to stop waiting)", name)
    if not await life.interruptible(scale.wait_ready(kube, ns, name, replicas, wait)):
        log.warning("stopped waiting; the deployment comes back on its own")
