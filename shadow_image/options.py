"""The shadow's command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

from ktwire.addr import split_host_port


@dataclass(frozen=True)
class Options:
    listen_host: str  # "" = every address, dual stack
    listen_port: int
    authorized_keys: str
    host_key: str
    port_file: str | None
    expose: tuple[int, ...]
    health_port: int | None
    debug: bool


def port_number(value: str) -> int:
    if not value.strip().isdigit() or not 1 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"bad port {value!r} (1-65535)")
    return int(value)


def port_list(value: str) -> list[int]:
    """'8080' or '8080,9090' (argparse type of --expose)."""
    return [port_number(part) for part in value.split(",")]


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(prog="shadow_image", description="ktproxy shadow SSH server")
    parser.add_argument("--listen", default=":2222",
                        help="host:port of the SSH server; an empty host or [::] is every address, IPv4 and IPv6")
    parser.add_argument("--authorized-keys", default="/etc/ktproxy/authorized_keys")
    parser.add_argument("--host-key", default="/etc/ktproxy/ssh_host_key")
    parser.add_argument("--port-file", help="write the bound SSH port here (for --listen host:0)")
    parser.add_argument("--expose", type=port_list, action="extend", default=[], metavar="PORT[,PORT...]",
                        help="listen on these ports (all addresses) and hand their connections to the newest "
                             "laptop session that forwards them; without it tcpip-forward is refused")
    parser.add_argument("--health-port", type=port_number, metavar="N",
                        help="serve GET /ready and /live on this port for the pod's probes")
    parser.add_argument("-d", "--debug", action="store_true")
    args = parser.parse_args(argv)
    try:
        host, port = split_host_port(args.listen)
    except ValueError as exc:
        parser.error(f"--listen: {exc}")
    expose = tuple(dict.fromkeys(args.expose))
    taken = [p for p in (port, args.health_port) if p in expose]
    if taken:
        parser.error(f"--expose {taken[0]} is also the SSH or health port")
    if args.health_port is not None and args.health_port == port:
        parser.error(f"--health-port {port} is also the SSH port")
    return Options(host, port, args.authorized_keys, args.host_key, args.port_file, expose, args.health_port,
                   args.debug)
