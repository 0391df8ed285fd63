"""The local DNS stub (`DNSStub`) and its parts: names, wire format, cache, and the resolvers behind it
(the cluster DNS through the tunnel, the system's upstream resolvers, and the NXDOMAIN fallback that
composes them)."""

from __future__ import annotations

from ktproxy.dns.cluster import ClusterResolver, OpenConnection, TunnelPool
from ktproxy.dns.names import candidate_names, label_text, reverse_name_to_ip, rewrite_owner, split_service_labels
from ktproxy.dns.resolver import NXDomainFallback, Resolver
from ktproxy.dns.server import DNSStub
from ktproxy.dns.upstream import UpstreamResolver, parse_resolv_conf, system_upstreams

__all__ = [
    "ClusterResolver",
    "DNSStub",
    "NXDomainFallback",
    "OpenConnection",
    "Resolver",
    "TunnelPool",
    "UpstreamResolver",
    "candidate_names",
    "label_text",
    "parse_resolv_conf",
    "reverse_name_to_ip",
    "rewrite_owner",
    "split_service_labels",
    "system_upstreams",
]
