"""The local DNS stub: cluster names go to the cluster DNS through the tunnel, everything else upstream.

Why a stub at all: tools that resolve names themselves (dig, browsers without a PAC, anything that
does not use socks5h) would otherwise never see cluster names. The stub listens on UDP and TCP (same
port), applies the pod's search list to short names, and caches answers for their TTL so that the
tunnel sees each name once per TTL rather than once per lookup.

Which names and reverse addresses belong to the cluster is decided only by `ClusterRules`, so the
proxy, the PAC file and the stub never disagree.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import struct
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from dnslib import EDNS0, OPCODE, QTYPE, RCODE, RR, SOA, DNSHeader, DNSLabel, DNSQuestion, DNSRecord

from ktproxy.routing import ClusterRules

log = logging.getLogger("ktproxy.dns")

__all__ = [
    "DNSStub",
    "OpenConnection",
    "candidate_names",
    "parse_resolv_conf",
    "reverse_name_to_ip",
    "rewrite_owner",
    "system_upstreams",
]


# The tunnel's open_connection (asyncssh's, or asyncio's in tests): one TCP stream to host:port.
OpenConnection = Callable[[str, int], Awaitable[tuple[Any, Any]]]

Address = tuple[str, int]
_CacheKey = tuple[tuple[bytes, ...], int, int]

_HEADER = struct.Struct("!HHHHHH")
_QR = 0x8000
_OPCODE_SHIFT = 11
_RD = 0x0100
_OPT = QTYPE.OPT
# 512 is the classic limit; beyond 4096 fragmentation makes UDP answers unreliable anyway.
_MIN_UDP, _MAX_UDP = 512, 4096
_OUR_UDP_SIZE = 1232  # the DNS-flag-day value: fits any sane path MTU
_WEDGED_AFTER = 0.5  # seconds without a byte from the cluster DNS while a query waits
_ARPA4 = (b"in-addr", b"arpa")
_ARPA6 = (b"ip6", b"arpa")


# --------------------------------------------------------------------------------------------------
# Pure helpers (property-tested)
# --------------------------------------------------------------------------------------------------
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


def _key_labels(name: DNSLabel) -> tuple[bytes, ...]:
    return tuple(raw.lower() for raw in name.label)


def _text_to_label(text: str) -> DNSLabel:
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
    labels = _key_labels(name)
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


# --------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------
class _Cache:
    """LRU of replies keyed on (qname, qtype, qclass); hits carry TTLs reduced by their age."""

    def __init__(self, maxsize: int, clock: Callable[[], float], negative_ttl: int, max_ttl: int) -> None:
        self._entries: OrderedDict[_CacheKey, tuple[DNSRecord, float, float]] = OrderedDict()
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
        answers = [rr for rr in reply.rr if rr.rtype != _OPT]
        if rcode == RCODE.NOERROR and answers:
            ttl = min(rr.ttl for rr in answers + [rr for rr in reply.auth if rr.rtype != _OPT])
        else:
            # RFC 2308: a negative answer lives for min(SOA TTL, SOA MINIMUM).
            soas = [rr for rr in reply.auth if rr.rtype == QTYPE.SOA and isinstance(rr.rdata, SOA)]
            ttl = min(soas[0].ttl, soas[0].rdata.times[4]) if soas else self._negative_ttl
        return max(0, min(ttl, self._max_ttl))

    def put(self, key: _CacheKey, reply: DNSRecord) -> None:
        ttl = self.lifetime(reply)
        if ttl <= 0 or self._maxsize <= 0:
            return
        self._entries[key] = (reply, self._clock(), ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self._maxsize:
            self._entries.popitem(last=False)

    def get(self, key: _CacheKey) -> DNSRecord | None:
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
            return [
                RR(
                    rr.rname,
                    rr.rtype,
                    rr.rclass,
                    rr.ttl if rr.rtype == _OPT else max(0, rr.ttl - aged),
                    rr.rdata,
                )
                for rr in rrs
            ]

        header = DNSHeader(id=reply.header.id, bitmap=reply.header.bitmap)
        return DNSRecord(header, list(reply.questions), dec(reply.rr), auth=dec(reply.auth), ar=dec(reply.ar))


# --------------------------------------------------------------------------------------------------
# Tunnel side: pipelined DNS-over-TCP connections to the cluster DNS
# --------------------------------------------------------------------------------------------------
class _TunnelConn:
    """One TCP stream to the cluster DNS carrying many queries at once, matched by message id."""

    def __init__(self, reader: Any, writer: Any) -> None:
        self.reader = reader
        self.writer = writer
        self.pending: dict[int, asyncio.Future[bytes]] = {}
        self.closed = False
        self.last_rx = time.monotonic()
        self.used = False
        self.task = asyncio.get_running_loop().create_task(self._read_loop())

    async def _read_loop(self) -> None:
        try:
            while True:
                (length,) = struct.unpack("!H", await self.reader.readexactly(2))
                msg = await self.reader.readexactly(length)
                self.last_rx = time.monotonic()
                if len(msg) < 2:
                    continue
                fut = self.pending.get(struct.unpack("!H", msg[:2])[0])
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # EOF, reset, channel closed: all mean "this stream is gone"
            log.debug("tunnel DNS stream ended: %r", exc)
        finally:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("tunnel DNS stream closed"))
        with contextlib.suppress(Exception):
            self.writer.close()
        if self.task is not asyncio.current_task():
            self.task.cancel()

    async def exchange(self, query: DNSRecord, timeout: float) -> bytes:
        if self.closed:
            raise ConnectionError("tunnel DNS stream closed")
        self.used = True
        qid = random.randrange(65536)
        while qid in self.pending:
            qid = random.randrange(65536)
        query.header.id = qid
        packet = query.pack()
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.pending[qid] = fut
        sent = time.monotonic()
        try:
            self.writer.write(struct.pack("!H", len(packet)) + packet)
            await asyncio.wait_for(self.writer.drain(), timeout)
            return await asyncio.wait_for(fut, timeout)
        except (TimeoutError, asyncio.CancelledError):
            # Our own deadline may arrive as a cancellation from the caller's timeout. Silence since
            # we sent (for longer than any healthy round trip) means the stream is wedged, e.g. the SSH
            # channel died without a close: drop it so the next query opens a fresh one.
            silent_for = time.monotonic() - sent
            if self.last_rx < sent and silent_for >= _WEDGED_AFTER:
                log.debug("tunnel DNS stream silent for %.1fs; dropping it", silent_for)
                self.close()
            raise
        except Exception as exc:  # asyncssh raises its own types besides OSError on a dead channel
            self.close()
            raise ConnectionError(repr(exc)) from exc
        finally:
            self.pending.pop(qid, None)


class _TunnelPool:
    """A few lazily-opened pipelined streams; a stream that fails is replaced on next use."""

    def __init__(self, open_connection: OpenConnection, server: Address, size: int) -> None:
        self._open = open_connection
        self._server = server
        self._slots: list[_TunnelConn | None] = [None] * max(1, size)
        self._lock = asyncio.Lock()
        self.opened = 0

    def _idle(self) -> _TunnelConn | None:
        return next((c for c in self._slots if c is not None and not c.closed and not c.pending), None)

    async def _get(self) -> _TunnelConn:
        conn = self._idle()
        if conn is not None:
            return conn
        async with self._lock:
            # Another query may have opened a stream while this one waited for the lock.
            conn = self._idle()
            if conn is not None:
                return conn
            for i, slot in enumerate(self._slots):
                if slot is None or slot.closed:
                    reader, writer = await self._open(*self._server)
                    self.opened += 1
                    self._slots[i] = new = _TunnelConn(reader, writer)
                    return new
            # All streams busy and the pool is full: pipelining on the least busy one is still cheaper
            # than another SSH channel.
            return min((c for c in self._slots if c is not None), key=lambda c: len(c.pending))

    async def query(self, query: DNSRecord, deadline: float) -> DNSRecord:
        for attempt in (1, 2):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            try:
                conn = await asyncio.wait_for(self._get(), remaining)
            except (TimeoutError, asyncio.CancelledError):
                raise
            except Exception as exc:  # OSError, asyncssh.ChannelOpenError, ...: the tunnel is down
                raise ConnectionError(f"cannot open tunnel to cluster DNS: {exc!r}") from exc
            reused = conn.used
            try:
                raw = await conn.exchange(query, deadline - time.monotonic())
            except ConnectionError:
                # The cluster DNS closes idle streams; a query racing that close deserves one retry
                # on a fresh stream. A fresh stream failing means the tunnel itself is broken.
                if attempt == 1 and reused:
                    continue
                raise
            reply = DNSRecord.parse(raw)
            if reply.questions[:1] != query.questions[:1]:
                raise ConnectionError("cluster DNS answered a different question")
            return reply
        raise ConnectionError("unreachable")

    def close(self) -> None:
        for conn in self._slots:
            if conn is not None:
                conn.close()
        self._slots = [None] * len(self._slots)


# --------------------------------------------------------------------------------------------------
# Upstream side: plain DNS to the system resolver
# --------------------------------------------------------------------------------------------------
class _UDPExchange(asyncio.DatagramProtocol):
    def __init__(self, qid: int) -> None:
        self.qid = qid
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

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


async def _upstream_udp(server: Address, packet: bytes, qid: int, timeout: float) -> bytes:
    loop = asyncio.get_running_loop()
    # A fresh socket per query gives a random source port: the cheap defence against spoofed answers.
    transport, proto = await loop.create_datagram_endpoint(lambda: _UDPExchange(qid), remote_addr=server)
    try:
        transport.sendto(packet)
        return await asyncio.wait_for(proto.answer, timeout)
    finally:
        transport.close()


async def _upstream_tcp(server: Address, packet: bytes, timeout: float) -> bytes:
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(*server)
        try:
            writer.write(struct.pack("!H", len(packet)) + packet)
            await writer.drain()
            (length,) = struct.unpack("!H", await reader.readexactly(2))
            return await reader.readexactly(length)
        finally:
            writer.close()


# --------------------------------------------------------------------------------------------------
# The stub
# --------------------------------------------------------------------------------------------------
class _Malformed(Exception):
    """The message cannot be answered; `reply` is the FORMERR/NOTIMP bytes, or None to drop it."""

    def __init__(self, reply: bytes | None) -> None:
        super().__init__()
        self.reply = reply


def _error_from_header(data: bytes, rcode: int) -> bytes:
    # Built by hand because the message may not parse beyond its header; echoing no question is
    # what RFC 1035 servers do for a FORMERR.
    qid, flags = struct.unpack("!HH", data[:4])
    opcode_bits = flags & (0xF << _OPCODE_SHIFT)
    return _HEADER.pack(qid, _QR | opcode_bits | (flags & _RD) | 0x0080 | rcode, 0, 0, 0, 0)


class _UDPServer(asyncio.DatagramProtocol):
    def __init__(self, stub: DNSStub) -> None:
        self.stub = stub
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # always a datagram transport here

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.stub._on_datagram(self, data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors from clients that went away must not stop the server.
        log.debug("UDP error: %r", exc)


class DNSStub:
    """A caching DNS forwarder: cluster names via the tunnel to the cluster DNS, others upstream."""

    def __init__(
        self,
        rules: ClusterRules,
        open_connection: OpenConnection,
        cluster_dns: tuple[str, int],
        upstream: list[tuple[str, int]] | None = None,
        *,
        timeout: float = 3.0,
        cache_size: int = 4096,
        negative_ttl: int = 5,
        max_ttl: int = 3600,
        pool_size: int = 2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rules = rules
        self.cluster_dns = cluster_dns
        self.upstream: list[Address] = list(upstream) if upstream is not None else system_upstreams()
        self.timeout = timeout
        self._pool = _TunnelPool(open_connection, cluster_dns, pool_size)
        self._cache = _Cache(cache_size, clock, negative_ttl, max_ttl)
        self._udp: _UDPServer | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._bound: Address | None = None
        self._down: set[str] = set()  # routes in an outage, so it is logged once, not per query
        self._max_inflight = 1024
        self._closing = False

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def bound_port(self) -> int:
        """The port UDP and TCP listen on (useful after start(port=0))."""
        if self._bound is None:
            raise RuntimeError("DNSStub is not started")
        return self._bound[1]

    @property
    def tunnel_streams_opened(self) -> int:
        """How many streams to the cluster DNS were opened so far (for diagnostics and tests)."""
        return self._pool.opened

    async def start(self, host: str = "127.0.0.1", port: int = 10053) -> None:
        """Listen on UDP and TCP host:port (port 0 picks one free port for both)."""
        loop = asyncio.get_running_loop()
        # With port 0 the UDP port may already be taken on TCP; a few tries find a port free on both.
        for attempt in range(10):
            transport, proto = await loop.create_datagram_endpoint(lambda: _UDPServer(self), local_addr=(host, port))
            bound = transport.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, host, bound)
            except OSError:
                transport.close()
                if port != 0 or attempt == 9:
                    raise
                continue
            self._udp = proto
            self._bound = (host, bound)
            break
        # Forwarding to ourselves would loop each query until it times out.
        self.upstream = [u for u in self.upstream if u != (host, self.bound_port)]
        if not self.upstream:
            log.warning("no upstream resolver found; non-cluster names will get SERVFAIL")
        log.info(
            "DNS stub on %s:%d (udp+tcp); cluster DNS %s:%d via tunnel; upstream %s",
            host,
            self.bound_port,
            *self.cluster_dns,
            ", ".join(f"{h}:{p}" for h, p in self.upstream) or "none",
        )

    async def close(self) -> None:
        """Stop listening, drop tunnel streams and cancel queries in flight."""
        self._closing = True
        if self._udp is not None and self._udp.transport is not None:
            self._udp.transport.close()
        self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            # close_clients (3.13+) is not available on 3.11; connection tasks are cancelled below.
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._tcp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._tcp.wait_closed(), 1.0)
            self._tcp = None
        self._pool.close()

    def clear_cache(self) -> None:
        self._cache.clear()

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- transports ------------------------------------------------------------------------------
    def _on_datagram(self, server: _UDPServer, data: bytes, addr: Any) -> None:
        if len(self._tasks) >= self._max_inflight:
            log.debug("dropping query from %s: %d in flight", addr, len(self._tasks))
            return

        async def answer() -> None:
            reply = await self.handle(data, tcp=False)
            if reply is not None and server.transport is not None and not server.transport.is_closing():
                server.transport.sendto(reply, addr)

        self._spawn(answer())

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        if me is not None:
            self._tasks.add(me)
            me.add_done_callback(self._tasks.discard)
        # Bounding queries per connection makes a flooding client wait on its own socket buffers.
        slots = asyncio.Semaphore(32)
        inflight: set[asyncio.Task[None]] = set()

        async def answer(record: DNSRecord) -> None:
            try:
                reply = await self._resolve(record, tcp=True)
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
            except (OSError, RuntimeError):
                pass
            finally:
                slots.release()

        try:
            while True:
                try:
                    (length,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 30))
                    data = await asyncio.wait_for(reader.readexactly(length), 10)
                except (asyncio.IncompleteReadError, TimeoutError, OSError):
                    break
                try:
                    record = self._parse(data)
                except _Malformed as bad:
                    log.debug("malformed TCP query (%d bytes); closing", len(data))
                    if bad.reply is not None:
                        writer.write(struct.pack("!H", len(bad.reply)) + bad.reply)
                        with contextlib.suppress(OSError, RuntimeError):
                            await writer.drain()
                    break
                await slots.acquire()
                task = asyncio.ensure_future(answer(record))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
            if inflight:
                await asyncio.gather(*inflight, return_exceptions=True)
        except asyncio.CancelledError:
            # Cancelled by close(): end normally. On Python 3.11 a cancelled client-connected task
            # makes asyncio's own done-callback log a spurious traceback.
            if not self._closing:
                raise
        finally:
            for task in inflight:
                task.cancel()
            writer.close()

    # -- query handling --------------------------------------------------------------------------
    async def handle(self, data: bytes, *, tcp: bool = False) -> bytes | None:
        """Answer one wire-format query; None means drop it (no parsable header, or not a query)."""
        try:
            record = self._parse(data)
        except _Malformed as bad:
            log.debug("malformed query (%d bytes)", len(data))
            return bad.reply
        return await self._resolve(record, tcp=tcp)

    def _parse(self, data: bytes) -> DNSRecord:
        if len(data) < 12:
            raise _Malformed(None)
        flags = struct.unpack("!H", data[2:4])[0]
        if flags & _QR:
            raise _Malformed(None)  # a response sent to us: answering could start a loop
        try:
            record = DNSRecord.parse(data)
        except Exception:  # dnslib raises DNSError, but deep pointer chains raise RecursionError
            raise _Malformed(_error_from_header(data, RCODE.FORMERR)) from None
        if record.header.opcode != OPCODE.QUERY:
            raise _Malformed(_error_from_header(data, RCODE.NOTIMP))
        if len(record.questions) != 1:
            raise _Malformed(_error_from_header(data, RCODE.FORMERR))
        return record

    async def _resolve(self, query: DNSRecord, *, tcp: bool) -> bytes:
        q = query.q
        key: _CacheKey = (_key_labels(q.qname), q.qtype, q.qclass)
        started = time.monotonic()
        route = "cache"
        reply = self._cache.get(key)
        if reply is None:
            deadline = started + self.timeout
            try:
                async with asyncio.timeout(self.timeout):
                    cluster = self._cluster_targets(q.qname, q.qtype)
                    if cluster is not None:
                        route = "cluster"
                        reply = await self._ask_cluster(query, cluster, deadline)
                    else:
                        route = "upstream"
                        reply = await self._ask_upstream(query, deadline)
            except (TimeoutError, ConnectionError, OSError) as exc:
                self._note_failure(route, exc)
                reply = self._reply_skeleton(query, RCODE.SERVFAIL)
            except Exception as exc:  # a bug or odd answer must cost one SERVFAIL, not the server
                log.warning("%s query for %s failed: %r", route, q.qname, exc)
                reply = self._reply_skeleton(query, RCODE.SERVFAIL)
            else:
                self._note_success(route)
                self._cache.put(key, reply)
        else:
            # The cache serves all spellings of a name; answer in the spelling asked (0x20 clients).
            cached_q = reply.q.qname
            reply.rr = rewrite_owner(reply.rr, cached_q, q.qname)
        out = self._finish(query, reply, tcp)
        log.debug(
            "%s %s %s -> %s (%d rr, %.1f ms)",
            route,
            q.qname,
            QTYPE.get(q.qtype),
            RCODE.get(reply.header.rcode),
            len(reply.rr),
            (time.monotonic() - started) * 1000,
        )
        return out

    _WHERE = {"cluster": "cluster DNS (through the tunnel)", "upstream": "upstream DNS"}

    def _note_failure(self, route: str, exc: BaseException) -> None:
        what = type(exc).__name__ if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
        # One line per outage, not one per query: a dead tunnel would otherwise flood the log.
        if route not in self._down:
            log.warning("%s unreachable (%s); answering SERVFAIL", self._WHERE[route], what)
        else:
            log.debug("%s still unreachable (%s)", self._WHERE[route], what)
        self._down.add(route)

    def _note_success(self, route: str) -> None:
        if route in self._down:
            self._down.discard(route)
            log.info("%s reachable again", self._WHERE[route])

    def _cluster_targets(self, qname: DNSLabel, qtype: int) -> list[DNSLabel] | None:
        """Names to ask the cluster DNS for, or None when the question belongs upstream."""
        ip = reverse_name_to_ip(qname)
        if ip is not None:
            return [qname] if self.rules.is_cluster_ip(str(ip)) else None
        text = label_text(qname)
        if text is None:
            return None
        prefix, base = split_service_labels(text)
        if not self.rules.is_cluster_name(base):
            return None
        return [_text_to_label(prefix + c) for c in candidate_names(base, self.rules)]

    async def _ask_cluster(self, query: DNSRecord, targets: Sequence[DNSLabel], deadline: float) -> DNSRecord:
        q = query.q
        response: DNSRecord | None = None
        asked = targets[0]
        for asked in targets:
            sub = DNSRecord(DNSHeader(rd=1), q=DNSQuestion(asked, q.qtype, q.qclass))
            response = await self._pool.query(sub, deadline)
            # Like a pod's resolver, move down the search list only when the name does not exist.
            if response.header.rcode != RCODE.NXDOMAIN:
                break
        assert response is not None
        reply = self._reply_skeleton(query, response.header.rcode)
        reply.rr = rewrite_owner(response.rr, asked, q.qname)
        reply.auth = [rr for rr in response.auth if rr.rtype != _OPT]
        reply.ar = [rr for rr in response.ar if rr.rtype != _OPT]
        return reply

    async def _ask_upstream(self, query: DNSRecord, deadline: float) -> DNSRecord:
        if not self.upstream:
            raise ConnectionError("no upstream resolver")
        # Re-encode rather than relay the client's bytes: a fresh id per hop keeps answers matched to
        # this stub's own question, and our own EDNS size keeps upstream answers within what we relay.
        qid = random.randrange(65536)
        header = DNSHeader(id=qid, rd=query.header.rd, cd=query.header.cd)
        sub = DNSRecord(header, q=DNSQuestion(query.q.qname, query.q.qtype, query.q.qclass))
        do = any(rr.rtype == _OPT and rr.ttl & 0x8000 for rr in query.ar)
        sub.add_ar(EDNS0(udp_len=_OUR_UDP_SIZE, flags="do" if do else ""))
        packet = sub.pack()
        last: Exception = ConnectionError("no upstream answered")
        for i, server in enumerate(self.upstream):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # Share what is left among the servers not yet tried, so a dead first server still
            # leaves time for the next one.
            per_try = remaining / (len(self.upstream) - i)
            try:
                raw = await _upstream_udp(server, packet, qid, per_try)
                response = DNSRecord.parse(raw)
                if response.header.tc:
                    raw = await _upstream_tcp(server, packet, deadline - time.monotonic())
                    response = DNSRecord.parse(raw)
                if response.header.id != qid or response.questions[:1] != sub.questions:
                    raise ConnectionError("upstream answered a different question")
            except (TimeoutError, OSError, ConnectionError) as exc:
                last = exc
                continue
            if response.header.rcode in (RCODE.SERVFAIL, RCODE.REFUSED) and i + 1 < len(self.upstream):
                last = ConnectionError(f"upstream {server[0]} said {RCODE.get(response.header.rcode)}")
                continue
            reply = self._reply_skeleton(query, response.header.rcode)
            reply.header.aa = response.header.aa
            reply.header.ad = response.header.ad
            reply.rr = rewrite_owner(response.rr, sub.q.qname, query.q.qname)
            reply.auth = [rr for rr in response.auth if rr.rtype != _OPT]
            reply.ar = [rr for rr in response.ar if rr.rtype != _OPT]
            return reply
        raise last

    @staticmethod
    def _reply_skeleton(query: DNSRecord, rcode: int) -> DNSRecord:
        header = DNSHeader(id=query.header.id, qr=1, aa=0, ra=1, rd=query.header.rd, rcode=rcode)
        header.opcode = query.header.opcode
        return DNSRecord(header, q=DNSQuestion(query.q.qname, query.q.qtype, query.q.qclass))

    def _finish(self, query: DNSRecord, reply: DNSRecord, tcp: bool) -> bytes:
        """The client's id and question on a copy of `reply`, EDNS if asked, fitted to the transport."""
        # A copy, because `reply` may be the very object the cache holds.
        header = DNSHeader(id=query.header.id, bitmap=reply.header.bitmap)
        header.rd = query.header.rd
        out = DNSRecord(
            header,
            [DNSQuestion(query.q.qname, query.q.qtype, query.q.qclass)],
            list(reply.rr),
            auth=list(reply.auth),
            ar=[rr for rr in reply.ar if rr.rtype != _OPT],
        )
        opt = next((rr for rr in query.ar if rr.rtype == _OPT), None)
        if opt is not None:
            out.add_ar(EDNS0(udp_len=_OUR_UDP_SIZE, flags="do" if opt.ttl & 0x8000 else ""))
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
                small = self._reply_skeleton(query, reply.header.rcode)
                small.header.tc = 1
                if opt is not None:
                    small.add_ar(EDNS0(udp_len=_OUR_UDP_SIZE))
                packet = small.pack()
        except Exception as exc:  # e.g. a name that grew past 255 bytes when rewritten
            log.debug("cannot encode reply for %s: %r", query.q.qname, exc)
            packet = _HEADER.pack(query.header.id, _QR | 0x0080 | (_RD if query.header.rd else 0) | 2, 0, 0, 0, 0)
        return packet
