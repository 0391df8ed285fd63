"""The resolver interface: the NXDOMAIN fallback is a composition of two resolvers (no sockets here)."""

from __future__ import annotations

import time

import pytest
from dnslib import RCODE, DNSRecord

from ktproxy.dns import NXDomainFallback, Resolver
from ktproxy.dns.wire import reply_skeleton


class Fixed:
    """A resolver that answers every question with one rcode, or raises `error`."""

    def __init__(self, rcode: int = RCODE.NOERROR, error: Exception | None = None) -> None:
        self.rcode = rcode
        self.error = error
        self.asked: list[str] = []

    async def resolve(self, query: DNSRecord, deadline: float) -> DNSRecord:
        self.asked.append(str(query.q.qname))
        if self.error is not None:
            raise self.error
        return reply_skeleton(query, self.rcode)


def _deadline() -> float:
    return time.monotonic() + 1


@pytest.mark.parametrize(("primary", "fallback", "expected", "fallback_asked"), [
    (Fixed(RCODE.NOERROR), Fixed(RCODE.NOERROR), "primary", False),
    (Fixed(RCODE.SERVFAIL), Fixed(RCODE.NOERROR), "primary", False),
    (Fixed(RCODE.NXDOMAIN), Fixed(RCODE.NOERROR), "fallback", True),
    (Fixed(RCODE.NXDOMAIN), Fixed(RCODE.NXDOMAIN), "primary", True),
    (Fixed(RCODE.NXDOMAIN), Fixed(error=TimeoutError()), "primary", True),
    (Fixed(RCODE.NXDOMAIN), Fixed(error=ConnectionError("no upstream resolver")), "primary", True),
])
async def test_nxdomain_fallback(primary: Fixed, fallback: Fixed, expected: str, fallback_asked: bool) -> None:
    resolver: Resolver = NXDomainFallback(primary, fallback)
    query = DNSRecord.question("jira")
    reply = await resolver.resolve(query, _deadline())
    want = primary if expected == "primary" else fallback
    assert reply.header.rcode == want.rcode and reply.header.id == query.header.id
    assert bool(fallback.asked) == fallback_asked


async def test_primary_outage_is_not_hidden() -> None:
    fallback = Fixed(RCODE.NOERROR)
    with pytest.raises(ConnectionError):
        await NXDomainFallback(Fixed(error=ConnectionError("tunnel down")), fallback).resolve(
            DNSRecord.question("jira"), _deadline())
    assert fallback.asked == []
