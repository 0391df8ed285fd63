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
import logging
from typing import Any

from ktproxy import lifecycle
from ktproxy.commands import add_reverse_flags, check_timeout, open_kube, print_banner
from ktproxy.commands.options import reverse_options
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
    from ktproxy.exchange.holder import refuse_if_taken
    from ktproxy.exchange.session import take_by_scale, take_selector
    from ktproxy.exchange.takeover import original_selector
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
    options = reverse_options(args, ns)
    if args.mode == "scale":
        await take_by_scale(life, kube, options, target, ports, args.recover_wait_time)
    else:
        await take_selector(life, kube, options, target, ports)
    print_banner(banner(target))
    await life.wait()
    return life.exit_code
