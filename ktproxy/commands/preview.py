"""`ktctl preview NAME --expose LOCAL[:REMOTE][,...] [--external]`: the laptop's service as a new Service
NAME in the cluster (ClusterIP, or LoadBalancer with --external), backed by a shadow `<name>-kt-<rnd5>`.

A name already taken by a Service that is not ours is refused before anything is created; the Service
is created only once a connection made in the shadow pod has reached the laptop, and deleted first on
exit.

After a sleep or an outage that let `ktctl clean` sweep the Service, it is created again within one
heartbeat while the name is free; otherwise the preview ends with one line naming the new owner
(ktproxy/preview.py, reassert_service).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
from typing import Any

from ktproxy import lifecycle
from ktproxy.cluster import meta
from ktproxy.commands import add_reverse_flags, check_timeout, open_kube, print_banner
from ktproxy.commands.options import reverse_options
from ktproxy.errors import KtError, UsageError
from ktproxy.shadow import reverse

log = logging.getLogger("ktproxy")

# A Service name is a DNS-1035 label.
_SERVICE_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("preview", parents=[common], help="make a local service reachable in the cluster by name",
                       description="Create Service NAME in the cluster whose traffic reaches local ports.")
    p.add_argument("name", metavar="NAME", help="name of the new Service")
    add_reverse_flags(p, "as Service NAME")
    p.add_argument("--external", action="store_true", help="a LoadBalancer Service instead of ClusterIP")
    p.set_defaults(func=run)


def banner(name: str) -> str:
    return f"Now you can access your local service in cluster by name '{name}'"


def run(args: argparse.Namespace) -> int:
    from ktproxy.expose import parse_expose, standalone_ports

    if not _SERVICE_NAME.match(args.name):
        raise UsageError(f"{args.name!r} is not a valid service name (lower-case letters, digits and '-', "
                         "starting with a letter, at most 63)")
    ports = standalone_ports(parse_expose(args.expose, allow_names=False))
    check_timeout(args)
    return lifecycle.run(lambda life: _main(args, ports, life))


async def _main(args: argparse.Namespace, ports: list[Any], life: lifecycle.Lifecycle) -> int:
    from ktproxy import preview
    from ktproxy.cluster.client import Access
    from ktproxy.cluster.heartbeat import heartbeat_loop
    from ktproxy.exchange.takeover import target_labels

    kube = open_kube(args, life)
    ns = kube.namespace
    name = args.name
    labels = target_labels(meta.ROLE_PREVIEW_SHADOW)
    spec = reverse.ReverseSpec(role=meta.ROLE_PREVIEW_SHADOW, name_prefix=f"{name}-kt-", ports=ports, labels=labels,
                       annotations={meta.KT_CONFIG: f"service={name}"})
    shadow = reverse.ReverseShadow(life, kube, reverse_options(args, kube.namespace), spec)
    await shadow.preflight()
    await life.until_stopped(kube.require([Access("create", "services", ns), Access("delete", "services", ns)]))
    await life.until_stopped(_check_free(kube, ns, name))
    await life.until_stopped(reverse.check_local_ports(ports, args.skip_port_checking))
    await shadow.start()
    user = shadow.shadow.options.user
    # Not interruptible: a create cancelled in flight could leave a Service with no delete registered.
    created = await preview.create_service(kube, ns, name, ports, labels, user, external=args.external)
    # Only this very Service (its UID, which changes when it is created again after a sweep): after a
    # long sleep another developer may have replaced it.
    uid = {"now": created.metadata.uid}
    life.on_cleanup(f"service {name}", lambda: preview.delete_service(kube, ns, name, uid["now"]))
    await shadow.wait_serving(name)

    async def on_lost(_lost: Any) -> None:
        try:
            uid["now"] = await preview.reassert_service(kube, ns, name, ports, labels, user, uid["now"],
                                                        external=args.external)
        except KtError as exc:
            life.end(f"{exc}; the preview has ended")

    beat = asyncio.create_task(heartbeat_loop(kube, lambda: [("service", ns, name)], on_lost=on_lost))
    life.on_cleanup("service heartbeat", reverse.cancel_task, beat)
    print_banner(banner(name))
    await life.wait()
    return life.exit_code


async def _check_free(kube: Any, ns: str, name: str) -> None:
    """Refuse a name taken by something not ours before anything is created."""
    from ktproxy import preview
    from ktproxy.cluster.kt_objects import DEFAULT_THRESHOLD

    now = int((await kube.cluster_time()).timestamp())
    await preview.check_free(kube, ns, name, now, DEFAULT_THRESHOLD)
