"""`ktctl recover SVC`: put a Service back whatever killed the exchange (or mesh) that changed it: the
original selector, no kt-lock, the exchange's shadows deleted, a scaled deployment back to its replicas; for a
mesh also its router, stuntman and every developer's `<svc>-kt-mesh-*` shadow and Service."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from ktproxy import lifecycle

log = logging.getLogger("ktproxy")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("recover", parents=[common], help="put a service back after a crashed exchange or mesh",
                       description="Undo what exchange (or mesh) changed on a service, e.g. after ktctl was killed.")
    p.add_argument("service", metavar="SVC", help="the service to put back")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return lifecycle.run(lambda life: _main(args, life))


async def _main(args: argparse.Namespace, life: lifecycle.Lifecycle) -> int:
    from ktproxy.cleanup.recover import recover
    from ktproxy.cluster.objects import split_target
    from ktproxy.commands import open_kube

    kind, name = split_target(args.service)
    if kind not in (None, "svc", "service", "services"):
        from ktproxy.errors import UsageError

        raise UsageError(f"recover takes a service (NAME or svc/NAME), not {args.service!r}")
    kube = open_kube(args, life)
    # Not interruptible half-way: each step is one API call and every step leaves a consistent state.
    lines = await recover(kube, kube.namespace, name)
    if lines and lines[-1].endswith("nothing would be done"):  # the actions were logged as they ran
        log.info("%s", lines[-1])
    return 0
