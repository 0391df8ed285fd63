"""connect's local side: the proxy port (SOCKS5/HTTP/PAC) and the DNS stub, fed by one SSH tunnel.

The integration tests and the loopback benchmarks drive it without Kubernetes through
`python -m devtools.dataplane_main` (a harness kept out of the wheel).
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

from ktproxy.dns import DNSStub
from ktproxy.errors import KtError, UsageError
from ktproxy.pac import pac_script
from ktproxy.proxy.dialer import Dialer, upstream_resolve
from ktproxy.proxy.server import ProxyServer
from ktproxy.proxy_env import proxy_env, reachable_host
from ktproxy.routing import ClusterRules, is_loopback_host
from ktproxy.tunnel.session import SSHTunnel

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
    """A loopback address literal or `localhost`: a name like 127.lan.example.com may resolve anywhere."""
    return is_loopback_host(host)


def check_bind(proxy_host: str, credentials: tuple[str, str] | None) -> None:
    """Anything but a loopback bind is reachable by others: it must ask for credentials."""
    if not is_loopback_bind(proxy_host) and credentials is None:
        raise UsageError(f"binding the proxy to {proxy_host} needs --proxy-auth user:password")


class DataPlane:
    def __init__(self, rules: ClusterRules, tunnel: SSHTunnel, settings: DataPlaneSettings) -> None:
        check_bind(settings.proxy_host, settings.credentials)
        self.rules = rules
        self.tunnel = tunnel
        self.settings = settings
        # Direct names go to the DNS stub's upstreams when given (tests: never the machine's resolver).
        resolve = upstream_resolve(settings.dns_upstream) if settings.dns_upstream else None
        self.proxy = ProxyServer(Dialer(rules, tunnel, resolve=resolve), pac=self._pac,
                                 credentials=settings.credentials)
        self.dns: DNSStub | None = None

    @property
    def reachable_host(self) -> str:
        """The address clients use: a wildcard bind is reached on loopback."""
        return reachable_host(self.settings.proxy_host)

    def _pac(self) -> str:
        return pac_script(self.rules, self.reachable_host, self.proxy.bound_port,
                          auth=self.settings.credentials is not None)

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
