"""DNS messages on the wire: parsing a client's query, shaping replies, fitting them to the transport."""

from __future__ import annotations

import logging
import secrets
import struct

from dnslib import EDNS0, OPCODE, QTYPE, RCODE, DNSHeader, DNSLabel, DNSQuestion, DNSRecord

from ktproxy.dns.names import key_labels, rewrite_owner

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


def question_wire(query: DNSRecord) -> bytes:
    """The query's question as it is on the wire, uncompressed: name, type, class."""
    q = query.q
    return b"".join(bytes((len(raw),)) + raw for raw in q.qname.label) + b"\0" + struct.pack("!HH", q.qtype, q.qclass)


def finish(query: DNSRecord, reply: DNSRecord, tcp: bool) -> bytes:
    """The client's id and question on a copy of `reply`, EDNS if asked, fitted to the transport.

    Packed with the question name in lower case (`render`), then the client's spelling of the question
    written over it: owner names that are the question name are packed as pointers to the question, so
    they read in the spelling asked too (0x20 clients), and one packed reply serves every spelling of
    a name (the stub's fast path, `DNSStub._fast_answer`, keeps it and patches only id, question, TTLs).
    """
    return splice_question(render(query, reply, tcp), question_wire(query))


def splice_question(packet: bytes, question: bytes) -> bytes:
    """`packet` (from `render`) with `question` (the same name in any case) over its question."""
    end = 12 + len(question)
    if packet[4:6] != b"\0\1" or packet[12:end].lower() != question.lower():
        return packet  # no question in it (the SERVFAIL of a reply that cannot be encoded)
    return packet[:12] + question + packet[end:]


def render(query: DNSRecord, reply: DNSRecord, tcp: bool) -> bytes:
    """`finish` before the client's spelling goes in: the question name in lower case, and the answers
    owned by the question name owned by that lower-case name."""
    q = query.q
    lowered = DNSLabel(key_labels(q.qname))
    # A copy, because `reply` may be the very object the cache holds.
    header = DNSHeader(id=query.header.id, bitmap=reply.header.bitmap)
    header.rd = query.header.rd
    out = DNSRecord(
        header,
        [DNSQuestion(lowered, q.qtype, q.qclass)],
        rewrite_owner(reply.rr, reply.q.qname, lowered),
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
            small = DNSRecord(DNSHeader(id=query.header.id, qr=1, aa=0, ra=1, rd=query.header.rd,
                                        rcode=reply.header.rcode, tc=1),
                              q=DNSQuestion(lowered, q.qtype, q.qclass))
            small.header.opcode = query.header.opcode
            if opt is not None:
                small.add_ar(EDNS0(udp_len=OUR_UDP_SIZE))
            packet = small.pack()
    except Exception as exc:  # e.g. a name that grew past 255 bytes when rewritten
        log.debug("cannot encode reply for %s: %r", q.qname, exc)
        rd = _RD if query.header.rd else 0
        packet = _HEADER.pack(query.header.id, _QR | _RA | rd | RCODE.SERVFAIL, 0, 0, 0, 0)
    return packet


# -- the fast path's wire work: no dnslib, few Python calls --------------------------------------------
_U16 = struct.Struct("!H")
_TTL = struct.Struct("!I")


def fast_key(data: bytes, tcp: bool) -> tuple[bytes, int] | None:
    """(key, end of the question) for a plain query, None for anything else (the slow path decides).

    Plain: QR 0, opcode QUERY, one question with an uncompressed name and nothing else, or one OPT
    record (root owner; its options are skipped, but must be well-formed as dnslib reads them), and no
    trailing bytes. The key holds everything of the query that `finish` depends on besides the id and
    the case of the name: flags and counts, the name in lower case, type and class, the OPT's fixed
    fields (payload size, DO), and the transport. Equal keys, equal replies (up to id and name case).
    """
    n = len(data)
    if n < 17 or data[2] & 0xF8 or data[4:10] != b"\0\1\0\0\0\0" or data[10]:
        return None
    i = 12
    length = data[12]
    while length:
        if length > 63:
            return None  # a compression pointer or a reserved label type
        i += length + 1
        if i >= n:
            return None
        length = data[i]
    end = i + 5
    name = data[12:i].lower()
    if not name.isascii():
        try:
            name.decode()  # dnslib refuses labels that are not UTF-8 (length bytes are ASCII: same thing)
        except UnicodeDecodeError:
            return None
    ar = data[11]
    if ar == 0:
        if end != n:
            return None
        opt = b""
    elif ar == 1:
        if end + 11 > n or data[end] or data[end + 1:end + 3] != b"\0\x29":
            return None
        j = end + 11
        if j + _U16.unpack_from(data, end + 9)[0] != n:
            return None
        while n - j > 4:  # as dnslib parses options: a length past the end is a parse error
            j += 4 + _U16.unpack_from(data, j + 2)[0]
            if j > n:
                return None
        opt = data[end + 3:end + 9]
    else:
        return None
    return bytes(data[2:12]) + name + data[i:end] + opt + (b"T" if tcp else b"U"), end


def ttl_fields(packet: bytes) -> list[tuple[int, int]] | None:
    """(offset, TTL) of every record's TTL in `packet` except OPT's (which holds EDNS flags); None if
    the packet does not walk cleanly."""
    try:
        qd, an, ns, ar = struct.unpack_from("!HHHH", packet, 4)
        i = 12
        out = []
        for index in range(qd + an + ns + ar):
            while True:  # the owner name: labels, then a root byte or a pointer
                length = packet[i]
                if length >= 0xC0:
                    i += 2
                    break
                if length > 63:
                    return None
                i += length + 1
                if not length:
                    break
            if index < qd:
                i += 4
                continue
            rtype = _U16.unpack_from(packet, i)[0]
            if rtype != OPT:
                out.append((i + 4, _TTL.unpack_from(packet, i + 4)[0]))
            i += 10 + _U16.unpack_from(packet, i + 8)[0]
        return out if i == len(packet) else None
    except (IndexError, struct.error):
        return None


def aged_packet(template: bytes, ttls: list[tuple[int, int]], aged: int) -> bytes:
    """`template` with every TTL in `ttls` reduced by `aged` seconds, never below 0."""
    if not aged or not ttls:
        return template
    buf = bytearray(template)
    for offset, ttl in ttls:
        _TTL.pack_into(buf, offset, ttl - aged if ttl > aged else 0)
    return bytes(buf)
