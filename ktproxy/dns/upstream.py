"""The upstream side: the system's resolvers, and plain DNS (UDP, TCP when truncated) to them."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any

from dnslib import EDNS0, RCODE, DNSHeader, DNSQuestion, DNSRecord

from ktproxy import aio
from ktproxy.dns.wire import OUR_UDP_SIZE, new_id, reply_from, wants_dnssec

Address = tuple[str, int]


def parse_resolv_conf(text: str) -> list[Address]:
    """Nameserver addresses from resolv.conf text, in file order, port 53. Never raises."""
    servers: list[Address] = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        host = fields[1]
        try:
            # Keep a zone id (fe80::1%eth0): the socket layer needs it for link-local servers.
            ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            continue
        if (host, 53) not in servers:
            servers.append((host, 53))
    return servers


def system_upstreams() -> list[Address]:
    """The resolvers the operating system uses, best effort, without Linux-only calls.

    POSIX (Linux, macOS, BSD) keeps them in /etc/resolv.conf (on macOS a generated copy that mirrors
    the primary resolver); Windows keeps them in the registry. When nothing is found the stub answers
    SERVFAIL for non-cluster names rather than silently picking a public resolver.
    """
    if sys.platform == "win32":
        return _windows_upstreams()
    try:
        with open("/etc/resolv.conf", encoding="utf-8", errors="replace") as fh:
            return parse_resolv_conf(fh.read())
    except OSError:
        return []


def _windows_upstreams() -> list[Address]:
    try:
        import winreg  # type: ignore[import-not-found]  # Windows-only stdlib module
    except ImportError:
        return []
    values: list[str] = []
    base = r"SYSTEM\CurrentControlSet\Services\Tcpip\Parameters"

    def read(path: str) -> None:
        try:
            with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, path) as key:
                for name in ("NameServer", "DhcpNameServer"):
                    with contextlib.suppress(OSError):
                        values.append(str(winreg.QueryValueEx(key, name)[0]))
        except OSError:
            pass

    read(base)
    try:
        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, base + r"\Interfaces") as ifaces:
            for i in range(winreg.QueryInfoKey(ifaces)[0]):
                read(base + r"\Interfaces\\" + winreg.EnumKey(ifaces, i))
    except OSError:
        pass
    text = "\n".join(f"nameserver {v}" for s in values for v in s.replace(",", " ").split())
    return parse_resolv_conf(text)


class _UDPExchange(asyncio.DatagramProtocol):
    def __init__(self, qid: int) -> None:
        self.qid = qid
        self.answer: asyncio.Future[bytes] = aio.running_loop().create_future()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        # A connected socket only hears from the upstream; the id check rejects stale answers.
        if len(data) >= 12 and struct.unpack("!H", data[:2])[0] == self.qid and not self.answer.done():
            self.answer.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc or ConnectionError("closed"))


async def _exchange_udp(server: Address, packet: bytes, qid: int, seconds: float) -> bytes:
    loop = aio.running_loop()
    # A fresh socket per query gives a random source port: the cheap defence against spoofed answers.
    transport, proto = await loop.create_datagram_endpoint(lambda: _UDPExchange(qid), remote_addr=server)
    try:
        transport.sendto(packet)
        async with aio.Deadline(seconds):
            return await proto.answer
    finally:
        transport.close()


async def _exchange_tcp(server: Address, packet: bytes, deadline: float) -> bytes:
    async with aio.Deadline(deadline - time.monotonic()):
        reader, writer = await asyncio.open_connection(*server)
        try:
            writer.write(struct.pack("!H", len(packet)) + packet)
            await writer.drain()
            (length,) = struct.unpack("!H", await reader.readexactly(2))
            return await reader.readexactly(length)
        finally:
            writer.close()


class UpstreamResolver:
    """Plain DNS to the given servers in order, sharing the time left among those not yet tried."""

    def __init__(self, servers: Sequence[Address]) -> None:
        self.servers = list(servers)

    async def resolve(self, query: DNSRecord, deadline: float) -> DNSRecord:
        if not self.servers:
            raise ConnectionError("no upstream resolver")
        # Re-encode rather than relay the client's bytes: a fresh id per hop keeps answers matched to
        # this stub's own question, and our own EDNS size keeps upstream answers within what we relay.
        qid = new_id()
        sub = DNSRecord(DNSHeader(id=qid, rd=query.header.rd, cd=query.header.cd),
                        q=DNSQuestion(query.q.qname, query.q.qtype, query.q.qclass))
        sub.add_ar(EDNS0(udp_len=OUR_UDP_SIZE, flags="do" if wants_dnssec(query) else ""))
        packet = sub.pack()
        last: Exception = ConnectionError("no upstream answered")
        for i, server in enumerate(self.servers):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # Share what is left among the servers not yet tried, so a dead first server still
            # leaves time for the next one.
            per_try = remaining / (len(self.servers) - i)
            try:
                response = DNSRecord.parse(await _exchange_udp(server, packet, qid, per_try))
                if response.header.tc:
                    response = DNSRecord.parse(await _exchange_tcp(server, packet, deadline))
                if response.header.id != qid or response.questions[:1] != sub.questions:
                    raise ConnectionError("upstream answered a different question")
            except (TimeoutError, OSError, ConnectionError) as exc:
                last = exc
                continue
            if response.header.rcode in (RCODE.SERVFAIL, RCODE.REFUSED) and i + 1 < len(self.servers):
                last = ConnectionError(f"upstream {server[0]} said {RCODE.get(response.header.rcode)}")
                continue
            reply = reply_from(query, response, sub.q.qname)
            reply.header.aa = response.header.aa
            reply.header.ad = response.header.ad
            return reply
        raise last
