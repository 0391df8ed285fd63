"""`ktctl exchange SVC|svc/NAME|deployment/NAME --expose LOCAL[:REMOTE][,...] [--mode selector|scale]`:
every request to the service reaches the laptop.

selector mode (default): a shadow `<svc>-kt-exchange-<rnd5>` with the service's target ports (named as
the service names them), one session carrying every port, the path proven from inside the pod, and
only then the Service's selector switched (original kept in kt-selector), guarded against overwrites.
A stop signal cancels the guard, puts the selector back at once and deletes the shadow.

scale mode: the shadow wears the Deployment's labels, so the unchanged Service selects it; the
Deployment goes to 0, and on exit back to its replicas, waiting for its pods (a second stop signal
stops only that wait).

Everything the user typed (ports, service, local ports, permissions) is checked before anything is
created; the kt-lock serialises set-up with other exchanges and meshes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from ktproxy import lifecycle
from ktproxy.cluster import meta
from ktproxy.commands import add_reverse_flags, check_timeout, open_kube, print_banner
from ktproxy.commands.options import reverse_options
from ktproxy.errors import KtError
from ktproxy.shadow import reverse

log = logging.getLogger("ktproxy")

MODES = ("selector", "scale")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("exchange", parents=[common], help="redirect all traffic of a service to the laptop",
                       description="Send every request to a service (or the pods of a deployment) to local ports.")
    p.add_argument("target", metavar="SVC|svc/NAME|deployment/NAME")
    add_reverse_flags(p, "instead of the service's pods")
    p.add_argument("--mode", choices=MODES, default="selector",
                   help="selector: switch the service's selector to the shadow (default); "
                        "scale: the shadow takes the deployment's labels and the deployment goes to 0")
    p.add_argument("--recover-wait-time", "--recoverWaitTime", dest="recover_wait_time", type=float, default=120,
                   help="scale mode: seconds to wait on exit for the deployment's pods to be ready again")
    p.set_defaults(func=run)


def banner(target: Any) -> str:
    return f"Now all request to {target.kind} '{target.name}' will be redirected to local"


def run(args: argparse.Namespace) -> int:
    from ktproxy.expose import parse_expose

    pairs = parse_expose(args.expose)
    check_timeout(args)
    # A second Ctrl-C leaves the service switched while the shadow's heartbeat is fresh, which `clean`
    # respects for minutes: recover is the command that puts it back at once.
    hint = f"`ktctl recover {args.target.split('/')[-1]}` puts the service back now, `ktctl clean` later"
    return lifecycle.run(lambda life: _main(args, pairs, life), leftovers_hint=hint)


async def _main(args: argparse.Namespace, pairs: list[Any], life: lifecycle.Lifecycle) -> int:
    from ktproxy.exchange.takeover import original_selector, refuse_if_taken
    from ktproxy.exchange.target import resolve_exchange_target
    from ktproxy.expose import resolve_expose

    kube = open_kube(args, life)
    ns = kube.namespace
    target = await life.until_stopped(resolve_exchange_target(kube, ns, args.target))
    service = target.service
    # Both modes: a service another exchange or a mesh holds is refused (scale mode too would otherwise
    # print its banner while the switched selector keeps the traffic elsewhere).
    await life.until_stopped(refuse_if_taken(kube, ns, service))
    ports = await life.until_stopped(resolve_expose(kube, service, pairs, selector=original_selector(service)))
    await life.until_stopped(reverse.check_local_ports(ports, args.skip_port_checking))
    if args.mode == "scale":
        await _scale_mode(args, kube, target, ports, life)
    else:
        await _selector_mode(args, kube, target, ports, life)
    print_banner(banner(target))
    await life.wait()
    return 0


async def _selector_mode(args: argparse.Namespace, kube: Any, target: Any, ports: list[Any],
                         life: lifecycle.Lifecycle) -> None:
    from ktproxy.cluster.client import Access
    from ktproxy.exchange.lock import service_lock
    from ktproxy.exchange.takeover import guard_selector, read, refuse_if_taken, switch_selector, target_labels

    ns = kube.namespace
    name = target.service_name
    labels = target_labels(meta.ROLE_EXCHANGE_SHADOW)
    spec = reverse.ReverseSpec(role=meta.ROLE_EXCHANGE_SHADOW, name_prefix=f"{name}-kt-exchange-", ports=ports,
                       labels=labels, annotations={meta.KT_CONFIG: f"service={name}"})
    shadow = reverse.ReverseShadow(life, kube, reverse_options(args, kube.namespace), spec)
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


async def _scale_mode(args: argparse.Namespace, kube: Any, target: Any, ports: list[Any],
                      life: lifecycle.Lifecycle) -> None:
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
    shadow = reverse.ReverseShadow(life, kube, reverse_options(args, kube.namespace), spec)
    await shadow.preflight()
    await life.until_stopped(kube.require([Access("patch", "deployments.apps", ns),
                                           Access("get", "deployments.apps", ns)]))
    await shadow.start()
    original = await scale.scale_down(kube, ns, deployment)
    life.on_cleanup(f"replicas of deployment {name}", _scale_back, life, kube, ns, name, original,
                    args.recover_wait_time)
    await shadow.wait_serving(target.service_name)


async def _scale_back(life: lifecycle.Lifecycle, kube: Any, ns: str, name: str, replicas: int,
                      wait: float) -> None:
    """Back to the original replicas, then wait for them (so the shadow goes only when they serve)."""
    from ktproxy.exchange import scale

    await asyncio.shield(scale.scale_back(kube, ns, name, replicas))
    log.info("Waiting for deployment %s to be ready (interrupt again to stop waiting)", name)
    if not await life.interruptible(scale.wait_ready(kube, ns, name, replicas, wait)):
        log.warning("stopped waiting; the deployment comes back on its own")
