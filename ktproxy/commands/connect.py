"""`ktctl connect`: shadow pod + port-forward + one SSH session + local proxy, DNS stub and PAC.

Order matters for "bad input leaves nothing behind": the user's input is checked before any API call,
and local ports are bound and permissions checked before anything is created in the cluster.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
from dataclasses import dataclass
from typing import Any

import asyncssh

from ktproxy import lifecycle
from ktproxy.commands import check_timeout, open_kube, print_banner
from ktproxy.dataplane import DataPlane, DataPlaneSettings, check_bind
from ktproxy.errors import KtError, UsageError
from ktproxy.mesh.marks import MeshMarks
from ktproxy.proxy.http import basic_credentials
from ktproxy.proxy_env import export_lines, run_with_env
from ktproxy.routing import ClusterRules, IPNetwork
from ktproxy.tunnel.keys import generate_session_keys
from ktproxy.tunnel.session import SSHOptions, SSHTunnel

log = logging.getLogger("ktproxy")

BANNER = "All looks good, now you can access to resources in the kubernetes cluster"
DEFAULT_PROXY_PORT = 2223
DEFAULT_DNS_PORT = 10053


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("connect", parents=[common], help="reach the cluster through a local proxy",
                       description="Shadow pod + local SOCKS5/HTTP proxy, DNS stub and PAC.")
    p.add_argument("--proxy-host", "--proxyHost", dest="proxy_host", default="127.0.0.1",
                   help="address of the proxy port (default 127.0.0.1; others need --proxy-auth)")
    p.add_argument("--proxy-port", "--proxyPort", dest="proxy_port", type=int,
                   help=f"proxy port (default {DEFAULT_PROXY_PORT}; with -- CMD a free port, named in CMD's env)")
    p.add_argument("--dns-port", "--dnsPort", dest="dns_port", type=int,
                   help=f"DNS stub port on 127.0.0.1, UDP and TCP (default {DEFAULT_DNS_PORT}; with -- CMD a "
                        "free port; -1 disables it)")
    p.add_argument("--proxy-auth", dest="proxy_auth", help="user:password required from proxy clients")
    p.add_argument("--route", choices=["cluster", "all"], default="cluster",
                   help="cluster: only cluster destinations go through the pod (default); all: everything")
    p.add_argument("--include-ips", "--includeIps", dest="include_ips",
                   help="extra CIDRs to send through the cluster, comma separated")
    p.add_argument("--cluster-domain", "--clusterDomain", dest="cluster_domain",
                   help="cluster DNS domain (default: discovered, else cluster.local)")
    p.add_argument("--timeout", type=float, default=120, help="seconds to wait for the shadow pod")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="-- CMD ARGS: run one command with the proxy env set and exit with its status")
    p.set_defaults(func=run)


@dataclass(frozen=True)
class ConnectInput:
    """The user's connect flags, checked before anything talks to the cluster."""

    credentials: tuple[str, str] | None
    extra_cidrs: tuple[IPNetwork, ...]
    proxy_port: int
    dns_port: int


def check_input(args: argparse.Namespace) -> ConnectInput:
    """Every check of the user's own input; raises UsageError. Runs before any API call."""
    try:
        credentials = basic_credentials(args.proxy_auth)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    check_bind(args.proxy_host, credentials)
    # With a command, the defaults give way to free ports: another connect may hold 2223 and 10053,
    # and CMD learns the real ones from its env.
    proxy_port = _port("--proxy-port", args.proxy_port, 0 if args.command else DEFAULT_PROXY_PORT)
    dns_port = _port("--dns-port", args.dns_port, 0 if args.command else DEFAULT_DNS_PORT, allow_off=True)
    check_timeout(args)
    return ConnectInput(credentials, _extra_cidrs(args.include_ips), proxy_port, dns_port)


def _port(flag: str, value: int | None, default: int, allow_off: bool = False) -> int:
    if value is None:
        return default
    if not (0 <= value <= 65535 or (allow_off and value < 0)):
        raise UsageError(f"{flag}: {value} is not a port number")
    return value


def _extra_cidrs(value: str | None) -> tuple[IPNetwork, ...]:
    out = []
    for item in (value or "").split(","):
        if item.strip():
            try:
                out.append(ipaddress.ip_network(item.strip(), strict=False))
            except ValueError:
                raise UsageError(f"--include-ips: {item.strip()!r} is not a CIDR") from None
    return tuple(out)


def cluster_rules(namespace: str, route_all: bool, found: Any, extra_cidrs: tuple[IPNetwork, ...]) -> ClusterRules:
    """The routing rules, built once discovery is done (so ClusterRules normalises every input)."""
    return ClusterRules(namespace=namespace, domain=found.domain, cidrs=[*found.cidrs, *extra_cidrs],
                        namespaces=set(found.namespaces), route_all=route_all)


def run(args: argparse.Namespace) -> int:
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    elif args.command:
        raise UsageError(f"unexpected argument {args.command[0]!r} (put a command after --)")
    given = check_input(args)
    return lifecycle.run(lambda life: _main(args, given, life))


async def _main(args: argparse.Namespace, given: ConnectInput, life: lifecycle.Lifecycle) -> int:
    from ktproxy.cleanup.sweep import start_up_sweep
    from ktproxy.commands.options import shadow_options
    from ktproxy.shadow.session import ShadowSession

    kube = open_kube(args, life)
    namespace = kube.namespace
    keys = generate_session_keys()
    shadow = ShadowSession(kube, namespace, shadow_options(args, namespace), keys)
    life.on_cleanup("shadow pod and secret", shadow.close)
    tunnel = SSHTunnel(shadow.connect, SSHOptions.for_session(keys))
    life.on_cleanup("SSH session", tunnel.close)
    # Read-only checks and discovery, then the local ports: a missing permission or a port in
    # use must fail before anything exists in the cluster.
    await life.until_stopped(shadow.preflight())
    found = await life.until_stopped(shadow.discover(args.cluster_domain))
    rules = cluster_rules(namespace, args.route == "all", found, given.extra_cidrs)
    settings = DataPlaneSettings(proxy_host=args.proxy_host, proxy_port=given.proxy_port,
                                 dns_port=given.dns_port, credentials=given.credentials,
                                 cluster_dns=(found.dns, 53) if found.dns else None,
                                 direct_hosts=(kube.server_host,))
    plane = DataPlane(rules, tunnel, settings)
    # `ktctl mesh --auto-header` runs of this user name their services relative to these rules.
    plane.proxy.marks = MeshMarks(rules.namespace, rules.domain)
    life.on_cleanup("local proxy and DNS stub", plane.close)
    await plane.start()
    await life.until_stopped(start_up_sweep(kube, namespace))
    await life.until_stopped(shadow.start(timeout=args.timeout))
    try:
        await life.until_stopped(tunnel.start())
    except (asyncssh.Error, ConnectionError) as exc:
        raise KtError(f"cannot open the SSH session to the shadow pod: {exc}") from None
    for line in plane.describe():
        log.info("%s", line)
    print_banner(BANNER)
    env = plane.env()
    if args.command:
        return await life.until_stopped(run_with_env(args.command, env))
    for line in export_lines(env):
        print(line, flush=True)
    print(f"# PAC: {plane.pac_url}", flush=True)
    await life.wait()
    return life.exit_code

