"""connect's local side: the proxy port (SOCKS5/HTTP/PAC) and the DNS stub, fed by one SSH tunnel.

`python -m ktproxy.dataplane` runs it against a shadow server reached over plain TCP: that is how the
integration tests and the loopback benchmarks drive the data plane without Kubernetes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import signal
import sys
from dataclasses import dataclass

import asyncssh

from ktproxy.dns_stub import DNSStub
from ktproxy.errors import KtError, UsageError
from ktproxy.pac import pac_script
from ktproxy.proxy.dialer import Dialer
from ktproxy.proxy.http import basic_credentials
from ktproxy.proxy.server import ProxyServer
from ktproxy.proxy_env import export_lines, proxy_env, reachable_host, run_with_env
from ktproxy.routing import ClusterRules
from ktproxy.tunnel.session import SSHOptions, SSHTunnel, connect_tcp
from ktwire import sshwire

log = logging.getLogger("ktproxy")


@dataclass
class DataPlaneSettings:
    proxy_host: str = "127.0.0.1"
    proxy_port: int = 2223
    dns_host: str = "127.0.0.1"
    dns_port: int = 10053  # negative: no DNS stub
    credentials: tuple[str, str] | None = None
    cluster_dns: tuple[str, int] | None = None
    dns_upstream: list[tuple[str, int]] | None = None  # None: the system's resolvers
    direct_hosts: tuple[str, ...] = ()  # added to the printed NO_PROXY (the API server)


def is_loopback_bind(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


class DataPlane:
    def __init__(self, rules: ClusterRules, tunnel: SSHTunnel, settings: DataPlaneSettings) -> None:
        if not is_loopback_bind(settings.proxy_host) and settings.credentials is None:
            raise UsageError(f"binding the proxy to {settings.proxy_host} needs --proxy-auth user:password")
        self.rules = rules
        self.tunnel = tunnel
        self.settings = settings
        self.proxy = ProxyServer(Dialer(rules, tunnel), pac=self._pac, credentials=settings.credentials)
        self.dns: DNSStub | None = None

    @property
    def reachable_host(self) -> str:
        """The address clients use: a wildcard bind is reached on loopback."""
        return reachable_host(self.settings.proxy_host)

    def _pac(self) -> str:
        return pac_script(self.rules, self.reachable_host, self.proxy.bound_port)

    @property
    def proxy_port(self) -> int:
        return self.proxy.bound_port

    @property
    def pac_url(self) -> str:
        host = self.reachable_host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.proxy_port}/proxy.pac"

    def env(self) -> dict[str, str]:
        s = self.settings
        return proxy_env(s.proxy_host, self.proxy_port, s.credentials, s.direct_hosts)

    async def start(self) -> None:
        s = self.settings
        try:
            await self.proxy.start(s.proxy_host, s.proxy_port)
        except OSError as exc:
            raise KtError(_bind_error("proxy", s.proxy_host, s.proxy_port, exc)) from None
        if s.dns_port >= 0 and s.cluster_dns is not None:
            self.dns = DNSStub(self.rules, self.tunnel.open_connection, s.cluster_dns, s.dns_upstream)
            try:
                await self.dns.start(s.dns_host, s.dns_port)
            except OSError as exc:
                await self.proxy.close()
                raise KtError(_bind_error("DNS stub", s.dns_host, s.dns_port, exc)) from None

    async def close(self) -> None:
        await self.proxy.close()
        if self.dns:
            await self.dns.close()

    def describe(self) -> list[str]:
        # The DNS stub logs its own line (with its cluster DNS and upstream) when it starts.
        return [f"proxy (SOCKS5/HTTP) on {self.settings.proxy_host}:{self.proxy_port}", f"PAC file at {self.pac_url}"]


def _bind_error(what: str, host: str, port: int, exc: OSError) -> str:
    # uvloop's create_datagram_endpoint raises a bare "could not bind" whose cause holds the errno.
    while exc.errno is None and isinstance(exc.__cause__, OSError):
        exc = exc.__cause__
    if exc.errno == errno.EADDRINUSE:
        return f"cannot start the {what}: {host}:{port} is already in use (choose another port)"
    if exc.errno == errno.EACCES:
        return f"cannot start the {what}: no permission to bind {host}:{port}"
    return f"cannot start the {what} on {host}:{port}: {exc.strerror or exc}"


def install_uvloop() -> None:
    """uvloop where it exists (not on Windows); plain asyncio otherwise."""
    try:
        import uvloop
    except ImportError:
        return
    uvloop.install()


def _host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


async def _run_local(args: argparse.Namespace) -> int:
    try:
        client_key = asyncssh.read_private_key(args.identity)
        host_key = asyncssh.read_public_key(args.host_key_pub)
    except (OSError, asyncssh.KeyImportError) as exc:
        raise KtError(f"cannot read the session keys: {exc}") from None
    try:
        credentials = basic_credentials(args.proxy_auth)
    except ValueError as exc:
        raise UsageError(f"--proxy-auth: {exc}") from None
    ssh_host, ssh_port = _host_port(args.ssh)
    options = SSHOptions(client_key, host_key)
    tunnel = SSHTunnel(lambda o: connect_tcp(ssh_host, ssh_port, o), options)
    rules = ClusterRules(namespace=args.namespace, domain=args.domain, cidrs=args.cidr or [],
                         namespaces=set(args.known_namespace or []), route_all=args.route == "all")
    settings = DataPlaneSettings(proxy_host=args.proxy_host, proxy_port=args.proxy_port,
                                 dns_port=args.dns_port, credentials=credentials,
                                 cluster_dns=_host_port(args.cluster_dns) if args.cluster_dns else None,
                                 dns_upstream=[_host_port(u) for u in args.dns_upstream]
                                 if args.dns_upstream else None)
    plane = DataPlane(rules, tunnel, settings)  # checks the settings before anything connects
    try:
        try:
            await tunnel.start()
        except ConnectionError as exc:
            raise KtError(str(exc)) from None
        await plane.start()
        for line in plane.describe():
            log.info("%s", line)
        if args.ready_file:
            with open(args.ready_file, "w") as f:
                f.write(f"{plane.proxy_port} {plane.dns.bound_port if plane.dns else -1}\n")
        if args.command:
            return await run_with_env(args.command, plane.env())
        for line in export_lines(plane.env()):
            print(line, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # Windows: Ctrl-C cancels instead
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        return 0
    finally:
        await plane.close()
        await tunnel.close()


def main(argv: list[str] | None = None) -> int:
    from ktproxy.log import setup_logging

    p = argparse.ArgumentParser(prog="python -m ktproxy.dataplane")
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
    install_uvloop()
    try:
        return asyncio.run(_run_local(args))
    except KtError as exc:
        log.error("%s", exc)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
