"""The stub's reply cache: LRU, per-record TTLs aged on the way out, negative answers per RFC 2308."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from dnslib import QTYPE, RCODE, RR, SOA, DNSHeader, DNSRecord

from ktproxy.dns.names import key_labels
from ktproxy.dns.wire import OPT, wants_dnssec

# (name, type, class, DO, CD): a DNSSEC-aware client (DO) must not get a cached answer stripped of
# RRSIGs, nor a checking-disabled (CD) answer reach a client that relies on validation, or back.
CacheKey = tuple[tuple[bytes, ...], int, int, bool, bool]


def cache_key(query: DNSRecord) -> CacheKey:
    q = query.q
    return key_labels(q.qname), q.qtype, q.qclass, wants_dnssec(query), bool(query.header.cd)


class ReplyCache:
    """LRU of replies; hits carry TTLs reduced by their age."""

    def __init__(self, maxsize: int, clock: Callable[[], float], negative_ttl: int, max_ttl: int) -> None:
        self._entries: OrderedDict[CacheKey, tuple[DNSRecord, float, float]] = OrderedDict()
        self._maxsize = maxsize
        self._clock = clock
        self._negative_ttl = negative_ttl
        self._max_ttl = max_ttl

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def lifetime(self, reply: DNSRecord) -> int:
        rcode = reply.header.rcode
        if reply.header.tc or rcode not in (RCODE.NOERROR, RCODE.NXDOMAIN):
            return 0  # failures are transient by nature; caching them would prolong an outage
        answers = [rr for rr in reply.rr if rr.rtype != OPT]
        if rcode == RCODE.NOERROR and answers:
            ttl = min(rr.ttl for rr in answers + [rr for rr in reply.auth if rr.rtype != OPT])
        else:
            # RFC 2308: a negative answer lives for min(SOA TTL, SOA MINIMUM).
            soas = [rr for rr in reply.auth if rr.rtype == QTYPE.SOA and isinstance(rr.rdata, SOA)]
            ttl = min(soas[0].ttl, soas[0].rdata.times[4]) if soas else self._negative_ttl
        return max(0, min(ttl, self._max_ttl))

    def put(self, key: CacheKey, reply: DNSRecord) -> None:
        ttl = self.lifetime(reply)
        if ttl <= 0 or self._maxsize <= 0:
            return
        self._entries[key] = (reply, self._clock(), ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self._maxsize:
            self._entries.popitem(last=False)

    def get(self, key: CacheKey) -> DNSRecord | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        reply, stored, ttl = entry
        age = self._clock() - stored
        if age >= ttl:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        aged = int(age)

        def dec(rrs: list[RR]) -> list[RR]:
            # An OPT record's "TTL" holds EDNS flags, not a lifetime.
            return [RR(rr.rname, rr.rtype, rr.rclass, rr.ttl if rr.rtype == OPT else max(0, rr.ttl - aged), rr.rdata)
                    for rr in rrs]

        header = DNSHeader(id=reply.header.id, bitmap=reply.header.bitmap)
        return DNSRecord(header, list(reply.questions), dec(reply.rr), auth=dec(reply.auth), ar=dec(reply.ar))
