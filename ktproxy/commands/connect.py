"""`ktctl connect`: shadow pod + port-forward + one SSH session + local proxy, DNS stub and PAC.

Order matters for "bad input leaves nothing behind": local ports are bound and permissions checked
before anything is created in the cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from typing import Any

import asyncssh

from ktproxy.dataplane import DataPlane, DataPlaneSettings, install_uvloop
from ktproxy.errors import KtError, UsageError
from ktproxy.keys import generate_session_keys
from ktproxy.proxy.http import basic_credentials
from ktproxy.proxy_env import export_lines, run_with_env
from ktproxy.routing import ClusterRules
from ktproxy.tunnel.session import SSHOptions, SSHTunnel

log = logging.getLogger("ktproxy")

BANNER = "All looks good, now you can access to resources in the kubernetes cluster"
RULE = "-" * 63


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("connect", parents=[common], help="reach the cluster through a local proxy",
                       description="Shadow pod + local SOCKS5/HTTP proxy, DNS stub and PAC.")
    p.add_argument("--proxy-host", "--proxyHost", dest="proxy_host", default="127.0.0.1",
                   help="address of the proxy port (default 127.0.0.1; others need --proxy-auth)")
    p.add_argument("--proxy-port", "--proxyPort", dest="proxy_port", type=int, default=2223)
    p.add_argument("--dns-port", "--dnsPort", dest="dns_port", type=int, default=10053,
                   help="DNS stub port on 127.0.0.1, UDP and TCP (-1 disables it)")
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


def run(args: argparse.Namespace) -> int:
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    elif args.command:
        raise UsageError(f"unexpected argument {args.command[0]!r} (put a command after --)")
    try:
        credentials = basic_credentials(args.proxy_auth)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    install_uvloop()
    return asyncio.run(_main(args, credentials))


class _Stopper:
    """First Ctrl-C/SIGTERM: clean up and exit. Second Ctrl-C: exit at once."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # Windows
                loop.add_signal_handler(sig, self._fire, sig)

    def _fire(self, sig: int) -> None:
        if self.event.is_set():
            log.warning("interrupted again: exiting without clean-up (`ktctl clean` removes leftovers)")
            os._exit(130)
        log.info("shutting down; cleaning up what connect created (Ctrl-C again to exit at once)")
        self.event.set()


async def _main(args: argparse.Namespace, credentials: tuple[str, str] | None) -> int:
    from ktproxy.kube.client import KubeClient
    from ktproxy.kube.session import ShadowSession

    stopper = _Stopper()
    stopper.install()
    log.info("KtConnect start at %d", os.getpid())
    kube = KubeClient.from_args(args)
    namespace = kube.namespace
    rules = ClusterRules(namespace=namespace, route_all=args.route == "all")
    settings = DataPlaneSettings(proxy_host=args.proxy_host, proxy_port=args.proxy_port,
                                 dns_port=args.dns_port, credentials=credentials,
                                 direct_hosts=(kube.server_host,))
    keys = generate_session_keys()
    shadow = ShadowSession(kube, namespace, args, keys)
    tunnel = SSHTunnel(shadow.connect, SSHOptions.for_session(keys))
    plane = DataPlane(rules, tunnel, settings)
    try:
        # Read-only checks and discovery, then the local ports: a missing permission or a port in
        # use must fail before anything exists in the cluster.
        await _until_stopped(stopper, shadow.preflight())
        found = await _until_stopped(stopper, shadow.discover(args.cluster_domain))
        rules.domain = found.domain
        rules.cidrs = found.cidrs + _extra_cidrs(args.include_ips)
        rules.add_namespaces(found.namespaces)
        settings.cluster_dns = (found.dns, 53) if found.dns else None
        await plane.start()
        await _until_stopped(stopper, shadow.sweep())
        await _until_stopped(stopper, shadow.start(timeout=args.timeout))
        await _until_stopped(stopper, tunnel.start())
        for line in plane.describe():
            log.info("%s", line)
        log.info(RULE)
        log.info(BANNER)
        log.info(RULE)
        env = plane.env()
        if args.command:
            return await _until_stopped(stopper, run_with_env(args.command, env), default=130)
        for line in export_lines(env):
            print(line, flush=True)
        print(f"# PAC: {plane.pac_url}", flush=True)
        await stopper.event.wait()
        return 0
    except _Stopped:
        return 130
    except (asyncssh.Error, ConnectionError) as exc:
        raise KtError(f"cannot open the SSH session to the shadow pod: {exc}") from None
    finally:
        await plane.close()
        await tunnel.close()
        await shadow.close()
        kube.close()


class _Stopped(Exception):
    pass


async def _until_stopped(stopper: _Stopper, coro: Any, default: Any = None) -> Any:
    """Await `coro` unless the user interrupts first (then clean-up runs at once)."""
    task = asyncio.ensure_future(coro)
    stop = asyncio.ensure_future(stopper.event.wait())
    try:
        done, _ = await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    if default is not None:
        return default
    raise _Stopped()


def _extra_cidrs(value: str | None) -> list[Any]:
    import ipaddress

    out = []
    for item in (value or "").split(","):
        if item.strip():
            try:
                out.append(ipaddress.ip_network(item.strip(), strict=False))
            except ValueError:
                raise UsageError(f"--include-ips: {item.strip()!r} is not a CIDR") from None
    return out


