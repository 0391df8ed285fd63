"""Which destinations belong to the cluster.

One set of rules feeds the proxy (tunnel or direct), the PAC file (SOCKS5 or DIRECT) and the DNS stub
(cluster DNS or upstream), so the three can never disagree about a name.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from ktproxy.tlds import IANA_TLDS

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def normalise_name(host: str) -> str:
    """The one spelling every rule looks at: lower case, no [brackets] around an IPv6 literal, no
    trailing dots. The PAC file applies the same steps in the same order."""
    h = host.strip().lower()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    return h.rstrip(".")


def parse_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    return _ip(normalise_name(host))


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


@dataclass
class ClusterRules:
    """Names and address ranges that must be reached through the shadow pod."""

    namespace: str = "default"
    domain: str = "cluster.local"
    cidrs: list[IPNetwork] = field(default_factory=list)
    # Namespaces make `svc.ns` recognisable; without them a two-label name could be any public host.
    # Discovered ones named like a public TLD (dev, app, io) are left out, or `pkg.go.dev` would be
    # sent to the cluster; the connect namespace and `user_namespaces` (named by the user) are kept.
    namespaces: set[str] = field(default_factory=set)
    route_all: bool = False
    user_namespaces: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.domain = normalise_name(self.domain)
        self.namespace = normalise_name(self.namespace)
        self.user_namespaces = {normalise_name(n) for n in self.user_namespaces}
        given, self.namespaces = self.namespaces, set()
        self.add_namespaces([*given, self.namespace, *self.user_namespaces])
        self.cidrs = [ipaddress.ip_network(c, strict=False) for c in self.cidrs]

    # -- decisions -------------------------------------------------------------------------------
    def is_cluster_ip(self, host: str) -> bool:
        ip = parse_ip(host)
        return ip is not None and any(ip in net for net in self.cidrs if net.version == ip.version)

    def is_cluster_name(self, host: str) -> bool:
        name = normalise_name(host)
        if not name or _ip(name) is not None or name == "localhost":
            return False
        labels = name.split(".")
        if len(labels) == 1:
            return True
        if name.endswith("." + self.domain):
            return True
        if labels[-1] in ("svc", "pod"):
            return True
        # svc.ns and pod-hostname.svc.ns
        if len(labels) in (2, 3) and labels[-1] in self.namespaces:
            return True
        return False

    def is_cluster(self, host: str) -> bool:
        return self.is_cluster_ip(host) or self.is_cluster_name(host)

    def via_tunnel(self, host: str) -> bool:
        """True when a connection to `host` must be carried by the shadow pod (never loopback: the
        user's own machine, even if a CIDR given on the command line happens to cover it)."""
        if is_loopback_host(host):
            return False
        return self.route_all or self.is_cluster(host)

    # -- names -----------------------------------------------------------------------------------
    def qualify(self, host: str) -> str:
        """The fully-qualified cluster name for `host`, as the pod's search list would resolve it."""
        name = normalise_name(host)
        if _ip(name) is not None:
            return host
        labels = name.split(".")
        if name.endswith("." + self.domain):
            return name
        if len(labels) == 1:
            return f"{name}.{self.namespace}.svc.{self.domain}"
        if labels[-1] in ("svc", "pod"):
            return f"{name}.{self.domain}"
        if labels[-1] in self.namespaces:
            return f"{name}.svc.{self.domain}"
        return name

    def search_list(self) -> list[str]:
        return [f"{self.namespace}.svc.{self.domain}", f"svc.{self.domain}", self.domain]

    def may_be_public_name(self, host: str) -> bool:
        """True for a cluster name that is one only by the short-name rules (`jira`, `web.dev`): it
        may just as well be a LAN or public name, so when the cluster says there is no such name the
        DNS stub asks the system's resolver and the proxy dials it directly. Names under the cluster
        domain or ending in svc/pod are the cluster's alone."""
        if not self.is_cluster_name(host):
            return False
        name = normalise_name(host)
        return not (name.endswith("." + self.domain) or name.rsplit(".", 1)[-1] in ("svc", "pod"))

    def add_namespaces(self, names: Iterable[str]) -> None:
        """Namespaces for the `svc.ns` rule, without those named like a public TLD (unless they are
        the connect namespace or one the user named)."""
        keep = {self.namespace, *self.user_namespaces}
        for n in map(normalise_name, names):
            if n in keep or n not in IANA_TLDS:
                self.namespaces.add(n)


_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})


def is_loopback_host(host: str) -> bool:
    """True when `host` is this machine's loopback, decided by parsing it, never by a prefix: an IP
    literal (IPv6 in [brackets] too) in 127.0.0.0/8, ::1 or ::ffff:127.0.0.0/104, or the name localhost.
    A name that merely starts with "127." (127.lan.example.com) can resolve anywhere, so it is not.

    The v4-mapped case is spelled out because ipaddress changed its answer in Python 3.13 (True) from
    3.11/3.12 (False); this function answers the same on every version. The PAC's ktIsLoopback mirrors it.
    """
    name = normalise_name(host)
    ip = _ip(name)
    if ip is None:
        return name in _LOOPBACK_NAMES
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped
        if mapped is None:
            return int(ip) == 1  # ::1, also with a %zone
        ip = mapped
    return ip in _LOOPBACK_V4


_LOOPBACK_V4 = ipaddress.IPv4Network("127.0.0.0/8")
