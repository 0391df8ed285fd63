"""The stub's reply cache: LRU, per-record TTLs aged on the way out, negative answers per RFC 2308.

Each entry also keeps its replies as packed bytes (`Packed`), one per kind of query asking for it
(`wire.fast_key`), indexed in `ReplyCache.fast`: the stub's fast path answers a repeated question from
those bytes alone. A UDP query seen before byte for byte (but its id) finds them in `ReplyCache.exact`
without even `fast_key`. They live and die with their entry (expiry, eviction, replacement, clear).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from dnslib import QTYPE, RCODE, RR, SOA, DNSHeader, DNSRecord

from ktproxy.dns.names import key_labels
from ktproxy.dns.wire import OPT, aged_packet, wants_dnssec

# (name, type, class, DO, CD): a DNSSEC-aware client (DO) must not get a cached answer stripped of
# RRSIGs, nor a checking-disabled (CD) answer reach a client that relies on validation, or back.
CacheKey = tuple[tuple[bytes, ...], int, int, bool, bool]


def cache_key(query: DNSRecord) -> CacheKey:
    q = query.q
    return key_labels(q.qname), q.qtype, q.qclass, wants_dnssec(query), bool(query.header.cd)


# Packed replies kept per entry at most: each distinct query form (flags, EDNS size, transport) has
# its own, and a client varying them must not grow the memory without bound. Likewise the exact query
# bytes that lead to them (a 0x20 client spells each query anew: it stays with fast_key).
MAX_PACKED_PER_ENTRY = 8
MAX_EXACT_PER_ENTRY = 8


class Entry:
    """One cached reply, as stored (TTLs not aged), and its packed forms' keys in `ReplyCache.fast`."""

    __slots__ = ("exact", "key", "packed", "reply", "stored", "ttl")

    def __init__(self, key: CacheKey, reply: DNSRecord, stored: float, ttl: float) -> None:
        self.key = key
        self.reply = reply
        self.stored = stored
        self.ttl = ttl
        self.packed: list[bytes] = []
        self.exact: list[bytes] = []


class Packed:
    """An entry's reply packed for one kind of query (`finish` without id and spelling), TTLs as
    stored, and the copy aged for the whole second `aged` (re-made when the second changes)."""

    __slots__ = ("aged", "entry", "head", "qend", "tail", "template", "ttls")

    def __init__(self, entry: Entry, template: bytes, ttls: list[tuple[int, int]], qend: int) -> None:
        self.entry = entry
        self.template = template
        self.ttls = ttls
        self.qend = qend
        self.age(0)

    def age(self, aged: int) -> None:
        packet = aged_packet(self.template, self.ttls, aged)
        self.aged = aged
        self.head = packet[2:12]  # the id goes before, the client's question after
        self.tail = packet[self.qend:]


class ReplyCache:
    """LRU of replies; hits carry TTLs reduced by their age."""

    def __init__(self, maxsize: int, clock: Callable[[], float], negative_ttl: int, max_ttl: int) -> None:
        self._entries: OrderedDict[CacheKey, Entry] = OrderedDict()
        self.fast: dict[bytes, Packed] = {}
        self.exact: dict[bytes, Packed] = {}  # a UDP query after its id -> what fast_key found for it
        self._maxsize = maxsize
        self._clock = clock
        self._negative_ttl = negative_ttl
        self._max_ttl = max_ttl

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.fast.clear()
        self.exact.clear()

    def _drop(self, key: CacheKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            for fast_key in entry.packed:
                self.fast.pop(fast_key, None)
            for query in entry.exact:
                self.exact.pop(query, None)

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

    def put(self, key: CacheKey, reply: DNSRecord) -> Entry | None:
        ttl = self.lifetime(reply)
        if ttl <= 0 or self._maxsize <= 0:
            return None
        self._drop(key)
        entry = self._entries[key] = Entry(key, reply, self._clock(), ttl)
        while len(self._entries) > self._maxsize:
            self._drop(next(iter(self._entries)))
        return entry

    def entry(self, key: CacheKey) -> Entry | None:
        """The live entry for `key` (now the most recently used), or None (an expired one is dropped)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock() - entry.stored >= entry.ttl:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def touch(self, key: CacheKey) -> None:
        """Mark `key` the most recently used (a fast-path hit)."""
        self._entries.move_to_end(key)

    def add_packed(self, entry: Entry, fast_key: bytes, packed: Packed) -> bool:
        """Index `packed` under `fast_key` while `entry` lives; False when the entry has enough forms."""
        if self._entries.get(entry.key) is not entry or len(entry.packed) >= MAX_PACKED_PER_ENTRY:
            return False
        if fast_key not in self.fast:
            entry.packed.append(fast_key)
        self.fast[fast_key] = packed
        return True

    def add_exact(self, packed: Packed, query: bytes) -> None:
        """Remember that the UDP query `query` (after its id), which fast_key accepted, leads to `packed`."""
        entry = packed.entry
        if len(entry.exact) < MAX_EXACT_PER_ENTRY and self._entries.get(entry.key) is entry:
            entry.exact.append(query)
            self.exact[query] = packed

    def get(self, key: CacheKey) -> DNSRecord | None:
        entry = self.entry(key)
        if entry is None:
            return None
        return self.aged(entry)

    def aged(self, entry: Entry) -> DNSRecord:
        """A copy of the entry's reply with every TTL (but OPT's) reduced by its age in whole seconds."""
        reply = entry.reply
        aged = max(0, int(self._clock() - entry.stored))

        def dec(rrs: list[RR]) -> list[RR]:
            # An OPT record's "TTL" holds EDNS flags, not a lifetime.
            return [RR(rr.rname, rr.rtype, rr.rclass, rr.ttl if rr.rtype == OPT else max(0, rr.ttl - aged), rr.rdata)
                    for rr in rrs]

        header = DNSHeader(id=reply.header.id, bitmap=reply.header.bitmap)
        return DNSRecord(header, list(reply.questions), dec(reply.rr), auth=dec(reply.auth), ar=dec(reply.ar))
