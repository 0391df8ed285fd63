"""`ktctl mesh SVC --expose LOCAL[:REMOTE][,...] [--mode auto|manual] [--version-mark [KEY:]VALUE]`: the
requests to a service that carry this developer's header reach the laptop, every other one the
service's pods; several developers share one service this way.

auto (default): each developer has a shadow and a Service `<svc>-kt-mesh-<value>`; all share a router
pod `<svc>-kt-router` (ktproxy's own, shadow_image/router) that takes the service's selector and a
stuntman Service `<svc>-kt-stuntman` selecting the original pods. Routes live in the router's
kt-mesh-routes annotation. The selector is switched only once the router is Ready and a request with
this developer's header, sent through the router from inside the cluster, reached the laptop.

manual: only a shadow wearing the service's selector labels plus KEY=VALUE; the service round-robins
until the user's own mesh (Istio) routes by that label.

Everything the user typed is checked before anything is created; a failure anywhere removes what was
made; leaving (Ctrl-C) drops no request of the developers who stay.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from ktproxy import lifecycle
from ktproxy.commands import add_reverse_flags, check_timeout, open_kube, print_banner
from ktproxy.commands.options import reverse_options
from ktproxy.errors import KtError
from ktproxy.shadow import reverse

log = logging.getLogger("ktproxy")

MODES = ("auto", "manual")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("mesh", parents=[common], help="send the requests that carry your header to the laptop",
                       description="Route the requests to a service that carry a version header to local ports; "
                                   "every other request still reaches the service's pods.")
    p.add_argument("service", metavar="SVC")
    add_reverse_flags(p, "for requests that carry the version header")
    p.add_argument("--mode", choices=MODES, default="auto",
                   help="auto: a router pod picks requests by header (default); manual: the shadow joins the "
                        "service with a version label, for your own service mesh to route by")
    p.add_argument("--version-mark", "--versionMark", dest="version_mark", metavar="[KEY:]VALUE", default="",
                   help="header (auto) or label (manual) KEY and VALUE; default key 'version', default value 5 "
                        "random letters")
    p.add_argument("--auto-header", dest="auto_header", action="store_true", help=_auto_header_help())
    p.set_defaults(func=run)


def _auto_header_help() -> str:
    try:
        from ktproxy.mesh.marks import AUTO_HEADER_HELP
    except ImportError:
        return "add the header to this laptop's requests through `ktctl connect`'s HTTP proxy"
    return str(AUTO_HEADER_HELP)


def auto_banner(mark: Any) -> str:
    return f"Now you can access your service by header '{mark.header}'"


def manual_banner(mark: Any) -> str:
    return f"Now you can update Istio rule by label '{mark.label}'"


def run(args: argparse.Namespace) -> int:
    from ktproxy.expose import parse_expose
    from ktproxy.mesh.spec import check_label_key, check_names, parse_version_mark

    pairs = parse_expose(args.expose)
    check_timeout(args)
    mark = parse_version_mark(args.version_mark)
    if args.mode == "manual":
        check_label_key(mark)
    check_names(args.service.split("/")[-1], mark.value)
    hint = f"`ktctl recover {args.service}` puts the service back now, `ktctl clean` later"
    return lifecycle.run(lambda life: _main(args, pairs, mark, life), leftovers_hint=hint)


async def _main(args: argparse.Namespace, pairs: list[Any], mark: Any, life: lifecycle.Lifecycle) -> int:
    from ktproxy.cluster.objects import split_target
    from ktproxy.exchange.takeover import original_selector
    from ktproxy.expose import resolve_expose
    from ktproxy.mesh.participant import AutoMesh, join_manual
    from ktproxy.mesh.shared import refuse_if_exchanged

    kind, name = split_target(args.service)
    if kind not in (None, "svc", "service", "services"):
        raise KtError(f"mesh takes a service (NAME or svc/NAME), not {args.service!r}")
    kube = open_kube(args, life)
    ns = kube.namespace
    service = await life.until_stopped(_read_service(kube, ns, name))
    await life.until_stopped(refuse_if_exchanged(kube, ns, service))
    ports = await life.until_stopped(resolve_expose(kube, service, pairs, selector=original_selector(service)))
    await life.until_stopped(reverse.check_local_ports(ports, args.skip_port_checking))
    if args.mode == "manual":
        await join_manual(life, kube, reverse_options(args, ns), service, ports, mark)
        print_banner(manual_banner(mark))
    else:
        auto = AutoMesh(life, kube, reverse_options(args, ns), service, ports, mark, auto_header=args.auto_header)
        await auto.start()
        print_banner(auto_banner(mark))
    await life.wait()
    return life.exit_code


async def _read_service(kube: Any, ns: str, name: str) -> Any:
    from ktproxy.cluster.objects import read_service

    await kube.check_namespace(ns)
    return await read_service(kube, ns, name)
