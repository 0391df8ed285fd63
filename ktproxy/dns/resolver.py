"""What answers a question: the `Resolver` interface, and the NXDOMAIN fallback as a composition."""

from __future__ import annotations

import logging
from typing import Protocol

from dnslib import RCODE, DNSRecord

log = logging.getLogger("ktproxy.dns")


class Resolver(Protocol):
    async def resolve(self, query: DNSRecord, deadline: float) -> DNSRecord:
        """The reply to the client's `query` (its id and question), by `deadline` (time.monotonic()).
        Raises TimeoutError, or ConnectionError/OSError when the servers behind it cannot be reached."""
        ...


class NXDomainFallback:
    """Ask `primary`; when it says the name does not exist, ask `fallback` and return its answer.

    For names that are cluster names only by the short-name rules (`jira`, `web.dev`): the cluster has
    the first say, and a name it does not know is the LAN's or the internet's. When the fallback fails
    or denies the name too, the primary's NXDOMAIN stands (its SOA sets the negative TTL).
    """

    def __init__(self, primary: Resolver, fallback: Resolver) -> None:
        self.primary = primary
        self.fallback = fallback

    async def resolve(self, query: DNSRecord, deadline: float) -> DNSRecord:
        reply = await self.primary.resolve(query, deadline)
        if reply.header.rcode != RCODE.NXDOMAIN:
            return reply
        try:
            other = await self.fallback.resolve(query, deadline)
        except (TimeoutError, ConnectionError, OSError) as exc:
            log.debug("%s: not in the cluster, and the fallback failed (%r)", query.q.qname, exc)
            return reply
        return reply if other.header.rcode == RCODE.NXDOMAIN else other
