"""The local DNS stub: listeners and limits, the cache, and the choice of resolver for each question.

Why a stub at all: tools that resolve names themselves (dig, browsers without a PAC, anything that
does not use socks5h) would otherwise never see cluster names. The stub listens on UDP and TCP (same
port), applies the pod's search list to short names, and caches answers for their TTL so that the
tunnel sees each name once per TTL rather than once per lookup.

A repeated question is answered from bytes (the fast path, `DNSStub._fast_answer`): the reply as
`finish` packed it for the first such query is kept with its cache entry, and a later query of the
same form (`wire.fast_key`: flags, the name in any case, type, class, EDNS size and DO, transport) gets
it with its own id and spelling spliced in and the TTLs aged, without dnslib or a Task. A query of any
other shape (several questions or records, compression in the question, trailing bytes) takes the
general path; EDNS options are fine (the reply never depends on them).

Which names and reverse addresses belong to the cluster is decided only by `ClusterRules`, so the
proxy, the PAC file and the stub never disagree.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import struct
import time
from collections.abc import Callable, Coroutine
from types import MappingProxyType
from typing import Any

from dnslib import QTYPE, RCODE, DNSRecord

from ktproxy import aio
from ktproxy.dns.cache import Entry, Packed, ReplyCache, cache_key
from ktproxy.dns.cluster import Address, ClusterResolver, OpenConnection, TunnelPool
from ktproxy.dns.names import label_text, reverse_name_to_ip, split_service_labels
from ktproxy.dns.resolver import NXDomainFallback, Resolver
from ktproxy.dns.upstream import UpstreamResolver, system_upstreams
from ktproxy.dns.wire import Malformed, fast_key, finish, parse_query, render, reply_skeleton, ttl_fields
from ktproxy.routing import ClusterRules

log = logging.getLogger("ktproxy.dns")

_debug_on = functools.partial(log.isEnabledFor, logging.DEBUG)
_WHERE = MappingProxyType({"cluster": "cluster DNS (through the tunnel)", "upstream": "upstream DNS"})


class _UDPServer(asyncio.DatagramProtocol):
    def __init__(self, stub: DNSStub) -> None:
        self.stub = stub
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # always a datagram transport here

    def datagram_received(self, data: bytes, addr: Any) -> None:
        # A repeated question is answered here and now: no Task, no dnslib (see DNSStub._fast_answer).
        out = self.stub._fast_answer(data, False)
        if out is None:
            self.stub._on_datagram(self, data, addr)
        elif self.transport is not None:
            self.transport.sendto(out, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors from clients that went away must not stop the server.
        log.debug("UDP error: %r", exc)


class DNSStub:
    """A caching DNS forwarder: cluster names via the tunnel to the cluster DNS, others upstream.

    A name that is a cluster name only by the short-name rules (`jira`, `web.dev`) and that the cluster
    does not know is asked upstream as well (B1), so corporate short names keep working."""

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
        fast_path: bool = True,
    ) -> None:
        self.rules = rules
        self.cluster_dns = cluster_dns
        self.timeout = timeout
        self._pool = TunnelPool(open_connection, cluster_dns, pool_size)
        self._upstream = UpstreamResolver(upstream if upstream is not None else system_upstreams())
        self._cluster = ClusterResolver(rules, self._pool)
        self._cluster_then_upstream = NXDomainFallback(self._cluster, self._upstream)
        self._cache = ReplyCache(cache_size, clock, negative_ttl, max_ttl)
        self._clock = clock
        self._fast_path = fast_path  # False: every query takes the general path (tests compare the two)
        self._fast = self._cache.fast  # the fast path's index: fast key -> Packed
        self._exact = self._cache.exact  # and UDP query bytes after the id -> Packed
        self._udp: _UDPServer | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._bound: Address | None = None
        self._down: set[str] = set()  # routes in an outage, so it is logged once, not per query
        self._max_inflight = 1024
        self._closing = False

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def upstream(self) -> list[Address]:
        return self._upstream.servers

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
        self._upstream.servers = [u for u in self.upstream if u != (host, self.bound_port)]
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

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = aio.create_task(coro)
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
        me = asyncio.current_task(aio.running_loop())
        if me is not None:
            self._tasks.add(me)
            me.add_done_callback(self._tasks.discard)
        # Bounding queries per connection makes a flooding client wait on its own socket buffers.
        slots = asyncio.Semaphore(32)
        inflight: set[asyncio.Task[None]] = set()

        async def answer(record: DNSRecord, data: bytes) -> None:
            try:
                reply = await self._resolve(record, tcp=True, data=data)
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
            except (OSError, RuntimeError):
                pass
            finally:
                slots.release()

        try:
            while True:
                try:
                    async with aio.Deadline(30):
                        (length,) = struct.unpack("!H", await reader.readexactly(2))
                    async with aio.Deadline(10):
                        data = await reader.readexactly(length)
                except (asyncio.IncompleteReadError, TimeoutError, OSError):
                    break
                out = self._fast_answer(data, True)
                if out is not None:
                    try:
                        writer.write(struct.pack("!H", len(out)) + out)
                        await writer.drain()  # a client that does not read waits on its own socket buffers
                    except (OSError, RuntimeError):
                        break
                    continue
                try:
                    record = parse_query(data)
                except Malformed as bad:
                    log.debug("malformed TCP query (%d bytes); closing", len(data))
                    if bad.reply is not None:
                        writer.write(struct.pack("!H", len(bad.reply)) + bad.reply)
                        with contextlib.suppress(OSError, RuntimeError):
                            await writer.drain()
                    break
                await slots.acquire()
                task = aio.create_task(answer(record, data))
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
        data = bytes(data)
        out = self._fast_answer(data, tcp)
        if out is not None:
            return out
        try:
            record = parse_query(data)
        except Malformed as bad:
            log.debug("malformed query (%d bytes)", len(data))
            return bad.reply
        return await self._resolve(record, tcp=tcp, data=data)

    def _fast_answer(self, data: bytes, tcp: bool) -> bytes | None:
        """The reply to a repeated question from its packed bytes, or None: ask the general path.

        Exactly what `_resolve` would answer: the packed reply is `finish`'s for a query of the same
        form (same `fast_key`), its TTLs aged by the same whole seconds, the entry's expiry and LRU
        place kept. No dnslib, a handful of calls; never raises, whatever the bytes (bytes, not bytearray)."""
        if not self._fast_path:
            return None
        packed = None if tcp else self._exact.get(data[2:])
        if packed is None:
            found = fast_key(data, tcp)
            if found is None:
                return None
            packed = self._fast.get(found[0])
            if packed is None:
                return None
            if not tcp:
                self._cache.add_exact(packed, data[2:])  # the same bytes next time skip fast_key
        entry = packed.entry
        age = self._clock() - entry.stored
        if age >= entry.ttl:
            return None  # expired: the general path drops the entry and asks again
        self._cache.touch(entry.key)
        aged = int(age) if age > 0 else 0
        if aged != packed.aged:
            packed.age(aged)
        qend = packed.qend
        if _debug_on():
            log.debug("cache (fast path) %r", data[12:qend])
        return b"".join((data[:2], packed.head, data[12:qend], packed.tail))

    def _route(self, query: DNSRecord) -> tuple[str, Resolver]:
        """Which resolver answers `query`, and the route name for the outage log."""
        qname = query.q.qname
        ip = reverse_name_to_ip(qname)
        if ip is not None:
            return ("cluster", self._cluster) if self.rules.is_cluster_ip(str(ip)) else ("upstream", self._upstream)
        text = label_text(qname)
        if text is None:
            return "upstream", self._upstream
        base = split_service_labels(text)[1]
        if not self.rules.is_cluster_name(base):
            return "upstream", self._upstream
        if self.rules.may_be_public_name(base):
            return "cluster", self._cluster_then_upstream
        return "cluster", self._cluster

    async def _resolve(self, query: DNSRecord, *, tcp: bool, data: bytes | None = None) -> bytes:
        q = query.q
        key = cache_key(query)
        started = time.monotonic()
        route = "cache"
        entry = self._cache.entry(key)
        reply = None if entry is None else self._cache.aged(entry)
        if reply is None:
            route, resolver = self._route(query)
            try:
                async with aio.Deadline(self.timeout):
                    reply = await resolver.resolve(query, started + self.timeout)
            except (TimeoutError, ConnectionError, OSError) as exc:
                self._note_failure(route, exc)
                reply = reply_skeleton(query, RCODE.SERVFAIL)
            except Exception as exc:  # a bug or odd answer must cost one SERVFAIL, not the server
                log.warning("%s query for %s failed: %r", route, q.qname, exc)
                reply = reply_skeleton(query, RCODE.SERVFAIL)
            else:
                self._note_success(route)
                entry = self._cache.put(key, reply)
        # The cache serves all spellings of a name; `finish` answers in the spelling asked (0x20).
        out = finish(query, reply, tcp)
        if entry is not None and data is not None and self._fast_path:
            self._keep_packed(entry, query, data, tcp, out)
        log.debug("%s %s %s -> %s (%d rr, %.1f ms)", route, q.qname, QTYPE.get(q.qtype),
                  RCODE.get(reply.header.rcode), len(reply.rr), (time.monotonic() - started) * 1000)
        return out

    def _keep_packed(self, entry: Entry, query: DNSRecord, data: bytes, tcp: bool, out: bytes) -> None:
        """Keep `entry`'s reply packed for queries of `data`'s form, for `_fast_answer`.

        Kept only when what the fast path would answer `data` right now is byte for byte `out`, what
        this path answered: a query form the fast path would get wrong is never served by it."""
        found = fast_key(data, tcp)
        if found is None or found[0] in self._fast:
            return
        template = render(query, entry.reply, tcp)
        ttls = ttl_fields(template)
        if ttls is None:
            return
        packed = Packed(entry, template, ttls, found[1])
        age = self._clock() - entry.stored
        packed.age(int(age) if age > 0 else 0)
        if b"".join((data[:2], packed.head, data[12:found[1]], packed.tail)) != out:
            log.debug("no fast path for %s %s: its bytes would differ", query.q.qname, QTYPE.get(query.q.qtype))
            return
        self._cache.add_packed(entry, found[0], packed)

    def _note_failure(self, route: str, exc: BaseException) -> None:
        what = type(exc).__name__ if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
        # One line per outage, not one per query: a dead tunnel would otherwise flood the log.
        if route not in self._down:
            log.warning("%s unreachable (%s); answering SERVFAIL", _WHERE[route], what)
        else:
            log.debug("%s still unreachable (%s)", _WHERE[route], what)
        self._down.add(route)

    def _note_success(self, route: str) -> None:
        if route in self._down:
            self._down.discard(route)
            log.info("%s reachable again", _WHERE[route])
