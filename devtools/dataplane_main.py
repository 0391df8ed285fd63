"""The data plane against a shadow server reached over plain TCP, without Kubernetes.

    python -m devtools.dataplane_main --ssh HOST:PORT --identity KEY --host-key-pub PUB [...] [-- CMD]

The integration tests and the loopback benchmarks drive ktproxy's DataPlane this way. It reads private
keys from files and writes --ready-file ("PROXY_PORT DNS_PORT\\n"): a test harness, so it lives outside the
wheel (run it from the repository root).
"""

from __future__ import annotations

import argparse
import logging
import sys

import asyncssh

from ktproxy import lifecycle
from ktproxy.dataplane import DataPlane, DataPlaneSettings
from ktproxy.errors import KtError, UsageError
from ktproxy.proxy.http import basic_credentials
from ktproxy.proxy_env import export_lines, run_with_env
from ktproxy.routing import ClusterRules
from ktproxy.tunnel.session import SSHOptions, SSHTunnel, connect_tcp
from ktwire import sshwire
from ktwire.addr import split_host_port

log = logging.getLogger("ktproxy")


def _address(flag: str, value: str) -> tuple[str, int]:
    try:
        return split_host_port(value)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def _write_ready(path: str, proxy_port: int, dns_port: int) -> None:
    """One small local write once start-up is done: nothing else runs on the loop yet to be blocked."""
    with open(path, "w") as f:
        f.write(f"{proxy_port} {dns_port}\n")


async def _run_local(args: argparse.Namespace, life: lifecycle.Lifecycle) -> int:
    try:
        client_key = asyncssh.read_private_key(args.identity)
        host_key = asyncssh.read_public_key(args.host_key_pub)
    except (OSError, asyncssh.KeyImportError) as exc:
        raise KtError(f"cannot read the session keys: {exc}") from None
    try:
        credentials = basic_credentials(args.proxy_auth)
    except ValueError as exc:
        raise UsageError(f"--proxy-auth: {exc}") from None
    ssh_host, ssh_port = _address("--ssh", args.ssh)
    options = SSHOptions(client_key, host_key)
    tunnel = SSHTunnel(lambda o: connect_tcp(ssh_host, ssh_port, o), options)
    rules = ClusterRules(namespace=args.namespace, domain=args.domain, cidrs=args.cidr or [],
                         namespaces=set(args.known_namespace or []), route_all=args.route == "all")
    settings = DataPlaneSettings(
        proxy_host=args.proxy_host, proxy_port=args.proxy_port, dns_port=args.dns_port, credentials=credentials,
        cluster_dns=_address("--cluster-dns", args.cluster_dns) if args.cluster_dns else None,
        dns_upstream=[_address("--dns-upstream", u) for u in args.dns_upstream] if args.dns_upstream else None)
    plane = DataPlane(rules, tunnel, settings)  # checks the settings before anything connects
    life.on_cleanup("SSH session", tunnel.close)
    life.on_cleanup("local proxy and DNS stub", plane.close)
    try:
        await life.until_stopped(tunnel.start())
    except ConnectionError as exc:
        raise KtError(str(exc)) from None
    await plane.start()
    for line in plane.describe():
        log.info("%s", line)
    if args.ready_file:
        _write_ready(args.ready_file, plane.proxy_port, plane.dns.bound_port if plane.dns else -1)
    if args.command:
        return await life.until_stopped(run_with_env(args.command, plane.env()))
    for line in export_lines(plane.env()):
        print(line, flush=True)
    await life.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    from ktproxy.log import setup_logging

    p = argparse.ArgumentParser(prog="python -m devtools.dataplane_main")
    p.add_argument("--ssh", required=True, help="shadow server host:port")
    p.add_argument("--identity", required=True, help="client private key file")
    p.add_argument("--host-key-pub", required=True, help="the shadow's public host key file")
    p.add_argument("--namespace", default="default")
    p.add_argument("--domain", default="cluster.local")
    p.add_argument("--cidr", action="append")
    p.add_argument("--known-namespace", action="append")
    p.add_argument("--cluster-dns", help="ip:port of the cluster DNS, reached through the tunnel")
    p.add_argument("--dns-upstream", action="append",
                   help="ip:port of a resolver for non-cluster names (default: the system's)")
    p.add_argument("--proxy-host", default="127.0.0.1")
    p.add_argument("--proxy-port", type=int, default=2223)
    p.add_argument("--dns-port", type=int, default=10053)
    p.add_argument("--proxy-auth")
    p.add_argument("--route", choices=["cluster", "all"], default="cluster")
    p.add_argument("--ready-file")
    p.add_argument("-d", "--debug", action="store_true")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    setup_logging(args.debug)
    sshwire.install()
    try:
        return lifecycle.run(lambda life: _run_local(args, life))
    except KtError as exc:
        log.error("%s", exc)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
