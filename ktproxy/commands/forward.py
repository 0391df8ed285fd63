"""`ktctl forward TARGET [LOCAL[:REMOTE]]`: a local port whose connections reach TARGET in the cluster.

TARGET is a service (NAME or svc/NAME), pod/NAME, an IP address or a cluster DNS name. Every accepted
connection asks the dial plan where to go *now* and opens its own stream through the shadow pod, so a
pod that was deleted and replaced is simply not picked again (kt-connect and `kubectl port-forward`
redial the dead pod forever). The local port is bound before anything is created in the cluster.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import asyncssh

from ktproxy import lifecycle
from ktproxy.commands import check_timeout, open_kube, print_banner
from ktproxy.errors import KtError, UsageError
from ktproxy.expose import Remote, parse_port_pair
from ktproxy.routing import is_loopback_host

log = logging.getLogger("ktproxy")

DIAL_TIMEOUT = 15.0


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("forward", parents=[common],
                       help="reach a service, pod or address of the cluster on a local port",
                       description="Listen on a local port and forward each connection to TARGET in the cluster: "
                                   "a service (NAME, svc/NAME), pod/NAME, an IP address or a cluster DNS name.")
    p.add_argument("target", help="NAME | svc/NAME | pod/NAME | IP | DNS name")
    p.add_argument("ports", nargs="?", metavar="LOCAL[:REMOTE]",
                   help="local port, and the service port / target port / port name to reach "
                        "(default: the service's only port, on the same local port)")
    p.add_argument("--address", default="127.0.0.1", help="local address to listen on (default 127.0.0.1); "
                   "anything but loopback needs --allow-remote-clients")
    p.add_argument("--allow-remote-clients", dest="allow_remote_clients", action="store_true",
                   help="let --address be reachable from other machines: the port has no authentication, so "
                        "whoever reaches it reaches TARGET in the cluster")
    p.add_argument("--timeout", type=float, default=120, help="seconds to wait for the shadow pod")
    p.set_defaults(func=run)


def parse_ports(text: str | None) -> tuple[int | None, Remote | None]:
    """'' -> (None, None); '6060' -> (6060, None); '6060:8080' -> (6060, 8080); '6060:http' -> (6060, 'http')."""
    if text is None:
        return None, None
    if ":" not in text:
        return parse_port_pair(text, flag="forward's port").local, None
    pair = parse_port_pair(text, flag="forward's port")
    return pair.local, pair.remote


def banner(plan: Any, address: str, port: int) -> str:
    where = "localhost" if address in ("127.0.0.1", "localhost") else address
    return f"Now you can access port {plan.remote_port} of {plan.description} via '{where}:{port}'"


def check_address(address: str, allow_remote_clients: bool) -> None:
    """A forward port has no authentication (unlike connect's proxy, which asks --proxy-auth): beyond
    loopback it opens TARGET to every machine that reaches this one, so the user must say so, and is
    reminded."""
    if is_loopback_host(address):
        return
    if not allow_remote_clients:
        raise UsageError(f"--address {address} lets other machines reach the cluster through this port, "
                         "without authentication; add --allow-remote-clients if that is what you want")
    log.warning("Listening on %s: anyone who reaches this machine reaches the forwarded target (no "
                "authentication)", address)


def run(args: argparse.Namespace) -> int:
    local, remote = parse_ports(args.ports)
    check_timeout(args)
    check_address(args.address, args.allow_remote_clients)
    return lifecycle.run(lambda life: _main(args, local, remote, life))


async def _main(args: argparse.Namespace, local: int | None, remote: Remote | None,
                life: lifecycle.Lifecycle) -> int:
    from ktproxy.commands.options import shadow_options
    from ktproxy.forward.forwarder import Forwarder, listen
    from ktproxy.forward.targets import resolve_forward
    from ktproxy.shadow.session import ShadowSession
    from ktproxy.tunnel.keys import generate_session_keys
    from ktproxy.tunnel.session import SSHOptions, SSHTunnel

    kube = open_kube(args, life)
    namespace = kube.namespace
    plan = await life.until_stopped(resolve_forward(kube, namespace, args.target, remote))
    port = local if local is not None else plan.default_local_port
    keys = generate_session_keys()
    shadow = ShadowSession(kube, namespace, shadow_options(args, namespace), keys)
    await life.until_stopped(shadow.preflight())
    tunnel = SSHTunnel(shadow.connect, SSHOptions.for_session(keys))
    forwarder = Forwarder(plan, tunnel)
    # Bound before the shadow exists: a port in use must leave nothing in the cluster.
    server = await listen(forwarder, args.address, port)
    life.on_cleanup("shadow pod and secret", shadow.close)
    life.on_cleanup("SSH session", tunnel.close)
    life.on_cleanup("open connections", forwarder.close)
    life.on_cleanup("local listener", server.close)
    await life.until_stopped(shadow.start(timeout=args.timeout))
    try:
        await life.until_stopped(tunnel.start())
    except (asyncssh.Error, ConnectionError) as exc:
        raise KtError(f"cannot open the SSH session to the shadow pod: {exc}") from None
    await server.start_serving()
    print_banner(banner(plan, args.address, port))
    await life.wait()
    return life.exit_code
