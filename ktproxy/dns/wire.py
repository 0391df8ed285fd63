"""DNS messages on the wire: parsing a client's query, shaping replies, fitting them to the transport."""

from __future__ import annotations

import logging
import secrets
import struct

from dnslib import EDNS0, OPCODE, QTYPE, RCODE, DNSHeader, DNSLabel, DNSQuestion, DNSRecord

from ktproxy.dns.names import rewrite_owner

log = logging.getLogger("ktproxy.dns")

_HEADER = struct.Struct("!HHHHHH")
_QR = 0x8000
_OPCODE_SHIFT = 11
_RD = 0x0100
_RA = 0x0080
OPT = QTYPE.OPT
# 512 is the classic limit; beyond 4096 fragmentation makes UDP answers unreliable anyway.
_MIN_UDP, _MAX_UDP = 512, 4096
OUR_UDP_SIZE = 1232  # the DNS-flag-day value: fits any sane path MTU
_DO = 0x8000  # in an OPT record's TTL field


def new_id() -> int:
    """A message id for a query this stub sends: unpredictable, since with the random source port it
    is all that stands between an upstream answer and a spoofed one."""
    return secrets.randbelow(65536)


def wants_dnssec(query: DNSRecord) -> bool:
    """The DO bit: the client wants DNSSEC records (RRSIGs) in the answer."""
    return any(rr.rtype == OPT and rr.ttl & _DO for rr in query.ar)


class Malformed(Exception):
    """The message cannot be answered; `reply` is the FORMERR/NOTIMP bytes, or None to drop it."""

    def __init__(self, reply: bytes | None) -> None:
        super().__init__()
        self.reply = reply


def error_from_header(data: bytes, rcode: int) -> bytes:
    # Built by hand because the message may not parse beyond its header; echoing no question is
    # what RFC 1035 servers do for a FORMERR.
    qid, flags = struct.unpack("!HH", data[:4])
    opcode_bits = flags & (0xF << _OPCODE_SHIFT)
    return _HEADER.pack(qid, _QR | opcode_bits | (flags & _RD) | _RA | rcode, 0, 0, 0, 0)


def parse_query(data: bytes) -> DNSRecord:
    """A client's query with exactly one question; raises Malformed otherwise."""
    if len(data) < 12:
        raise Malformed(None)
    flags = struct.unpack("!H", data[2:4])[0]
    if flags & _QR:
        raise Malformed(None)  # a response sent to us: answering could start a loop
    try:
        record = DNSRecord.parse(data)
    except Exception:  # dnslib raises DNSError, but deep pointer chains raise RecursionError
        raise Malformed(error_from_header(data, RCODE.FORMERR)) from None
    if record.header.opcode != OPCODE.QUERY:
        raise Malformed(error_from_header(data, RCODE.NOTIMP))
    if len(record.questions) != 1:
        raise Malformed(error_from_header(data, RCODE.FORMERR))
    return record


def reply_skeleton(query: DNSRecord, rcode: int) -> DNSRecord:
    """An empty reply to `query` with `rcode`: its id, opcode, RD and question."""
    header = DNSHeader(id=query.header.id, qr=1, aa=0, ra=1, rd=query.header.rd, rcode=rcode)
    header.opcode = query.header.opcode
    return DNSRecord(header, q=DNSQuestion(query.q.qname, query.q.qtype, query.q.qclass))


def reply_from(query: DNSRecord, response: DNSRecord, asked: DNSLabel) -> DNSRecord:
    """The reply to the client's `query` carrying `response`, the answer to the question this stub
    asked for the name `asked`: owners renamed back to the client's name, no OPT (added per client)."""
    reply = reply_skeleton(query, response.header.rcode)
    reply.rr = rewrite_owner(response.rr, asked, query.q.qname)
    reply.auth = [rr for rr in response.auth if rr.rtype != OPT]
    reply.ar = [rr for rr in response.ar if rr.rtype != OPT]
    return reply


def finish(query: DNSRecord, reply: DNSRecord, tcp: bool) -> bytes:
    """The client's id and question on a copy of `reply`, EDNS if asked, fitted to the transport."""
    # A copy, because `reply` may be the very object the cache holds.
    header = DNSHeader(id=query.header.id, bitmap=reply.header.bitmap)
    header.rd = query.header.rd
    out = DNSRecord(
        header,
        [DNSQuestion(query.q.qname, query.q.qtype, query.q.qclass)],
        list(reply.rr),
        auth=list(reply.auth),
        ar=[rr for rr in reply.ar if rr.rtype != OPT],
    )
    opt = next((rr for rr in query.ar if rr.rtype == OPT), None)
    if opt is not None:
        out.add_ar(EDNS0(udp_len=OUR_UDP_SIZE, flags="do" if opt.ttl & _DO else ""))
    if tcp:
        limit = 65535
    elif opt is not None:
        limit = max(_MIN_UDP, min(opt.rclass, _MAX_UDP))
    else:
        limit = _MIN_UDP
    try:
        packet = out.pack()
        if len(packet) > limit:
            # TC with the question only: the client retries over TCP, which the stub also serves.
            small = reply_skeleton(query, reply.header.rcode)
            small.header.tc = 1
            if opt is not None:
                small.add_ar(EDNS0(udp_len=OUR_UDP_SIZE))
            packet = small.pack()
    except Exception as exc:  # e.g. a name that grew past 255 bytes when rewritten
        log.debug("cannot encode reply for %s: %r", query.q.qname, exc)
        rd = _RD if query.header.rd else 0
        packet = _HEADER.pack(query.header.id, _QR | _RA | rd | RCODE.SERVFAIL, 0, 0, 0, 0)
    return packet
