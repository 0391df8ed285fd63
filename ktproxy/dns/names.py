"""Pure name helpers of the DNS stub: label text, search-list candidates, reverse names, owner rewrite."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from dnslib import RR, DNSLabel

from ktproxy.routing import ClusterRules

_ARPA4 = (b"in-addr", b"arpa")
_ARPA6 = (b"ip6", b"arpa")


def label_text(name: DNSLabel) -> str | None:
    """The name as dotted text, or None when a label could not round-trip through text.

    A label holding a dot or a non-printable byte would be split or mangled by any text-based rule,
    so such names are never treated as cluster names (they are forwarded upstream verbatim).
    """
    parts = []
    for raw in name.label:
        if not raw or b"." in raw or any(b <= 0x20 or b >= 0x7F or b == 0x5C for b in raw):
            return None
        parts.append(raw.decode("ascii"))
    return ".".join(parts)


def key_labels(name: DNSLabel) -> tuple[bytes, ...]:
    """The name's labels in the one case that DNS comparisons ignore."""
    return tuple(raw.lower() for raw in name.label)


def text_to_label(text: str) -> DNSLabel:
    # Built from bytes, not str: DNSLabel(str) goes through the idna codec, which rejects some
    # valid DNS labels (e.g. over-long ones) with UnicodeError.
    return DNSLabel(tuple(part.encode("ascii") for part in text.split(".") if part))


def candidate_names(name: str, rules: ClusterRules) -> list[str]:
    """The fully-qualified names to ask the cluster DNS, in order, for a cluster name.

    The first is `rules.qualify` (the single source of truth); then, as a pod's resolver would, the
    name with each search-list suffix appended, for names not already under the cluster domain.
    """
    qualified = rules.qualify(name)
    out = [qualified]
    bare = name.strip().rstrip(".").lower()
    if not (bare == rules.domain or bare.endswith("." + rules.domain)):
        for suffix in rules.search_list():
            cand = f"{bare}.{suffix}"
            if cand not in out:
                out.append(cand)
    return out


def split_service_labels(name: str) -> tuple[str, str]:
    """Split SRV-style leading labels (`_http._tcp.`) from the name they qualify.

    The routing rules are about service names; `_http._tcp.tomcat` is the SRV question for the cluster
    name `tomcat`, and a pod's resolver would expand it with the same search list. A name made only of
    such labels is left whole.
    """
    labels = name.split(".")
    i = 0
    while i < len(labels) - 1 and labels[i].startswith("_"):
        i += 1
    if i == 0:
        return "", name
    return ".".join(labels[:i]) + ".", ".".join(labels[i:])


def reverse_name_to_ip(name: DNSLabel) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a full in-addr.arpa / ip6.arpa name stands for; None for anything else."""
    labels = key_labels(name)
    if labels[-2:] == _ARPA4 and len(labels) == 6:
        octets = labels[:4]
        if not all(o.isdigit() and len(o) <= 3 and (o == b"0" or not o.startswith(b"0")) for o in octets):
            return None
        values = [int(o) for o in reversed(octets)]
        if any(v > 255 for v in values):
            return None
        return ipaddress.IPv4Address(bytes(values))
    if labels[-2:] == _ARPA6 and len(labels) == 34:
        nibbles = labels[:32]
        if not all(len(n) == 1 and n in b"0123456789abcdef" for n in nibbles):
            return None
        return ipaddress.IPv6Address(int(b"".join(reversed(nibbles)), 16))
    return None


def rewrite_owner(rrs: Iterable[RR], asked: DNSLabel, original: DNSLabel) -> list[RR]:
    """Copies of `rrs` with every owner name equal to `asked` renamed to `original`.

    The client asked for `original` (e.g. "tomcat."); the cluster DNS answered for `asked`
    ("tomcat.default.svc.cluster.local."). Resolvers drop answers whose owner is not the name they
    asked, so the owner is renamed; CNAME targets and other names keep their cluster FQDNs, which
    stay resolvable through this stub.
    """
    out = []
    for rr in rrs:
        owner = original if rr.rname == asked else rr.rname
        out.append(RR(owner, rr.rtype, rr.rclass, rr.ttl, rr.rdata))
    return out
