"""The router's command line (the mesh command writes it into the router pod's args)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

from shadow_image.options import port_number


@dataclass(frozen=True)
class Options:
    service: str
    ports: dict[int, int]  # target port the router listens on -> Service port of the upstreams
    health_port: int
    annotations: str
    default_host: str | None
    route_host: str | None
    client_idle: float
    upstream_idle: float
    debug: bool


def seconds(value: str) -> float:
    try:
        out = float(value)
    except ValueError:
        out = -1.0
    if not 0 < out < 1e6:
        raise argparse.ArgumentTypeError(f"bad duration {value!r} (seconds, more than 0)")
    return out


def port_map(value: str) -> dict[int, int]:
    """'8080:80' or '8080:80,9090:90' (TP:SP; a bare TP means SP = TP)."""
    out: dict[int, int] = {}
    for part in value.split(","):
        tp, _, sp = part.strip().partition(":")
        target = port_number(tp)
        out[target] = port_number(sp) if sp else target
    return out


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m shadow_image.router",
        description="ktproxy mesh router: sends each HTTP request (HTTP/1 or HTTP/2) whose route header matches "
                    "one of the pod's kt-mesh-routes to that developer's Service, everything else to the "
                    "original pods")
    parser.add_argument("--service", required=True, help="the meshed Service's name")
    parser.add_argument("--port", type=port_map, action="append", required=True, dest="ports",
                        metavar="TP:SP[,TP:SP...]",
                        help="listen on target port TP; upstreams are dialled on Service port SP")
    parser.add_argument("--health-port", type=port_number, required=True, metavar="H",
                        help="serve GET /ready and /routes here")
    parser.add_argument("--annotations", required=True, metavar="FILE",
                        help="the pod's annotations as a downward API file (watched for route changes)")
    parser.add_argument("--client-idle", type=seconds, default=75.0, metavar="S",
                        help="close a client connection idle this long between or inside requests (default 75)")
    parser.add_argument("--upstream-idle", type=seconds, default=300.0, metavar="S",
                        help="answer 504 (or cut a started answer) when an upstream is silent this long "
                             "(default 300)")
    parser.add_argument("--default-host", help=argparse.SUPPRESS)  # tests: the original pods' stand-in
    parser.add_argument("--route-host", help=argparse.SUPPRESS)  # tests: a format string with {value}
    parser.add_argument("-d", "--debug", action="store_true")
    args = parser.parse_args(argv)
    ports: dict[int, int] = {}
    for pairs in args.ports:
        ports.update(pairs)
    if not args.service.strip():
        parser.error("--service must not be empty")
    if args.health_port in ports:
        parser.error(f"--health-port {args.health_port} is also a listening port")
    if args.route_host is not None and "{value}" not in args.route_host and "{" in args.route_host:
        parser.error("--route-host may only use {value}")
    return Options(args.service, ports, args.health_port, args.annotations, args.default_host, args.route_host,
                   args.client_idle, args.upstream_idle, args.debug)
