"""The cluster side: pipelined DNS-over-TCP streams through the tunnel, and the search-list walk."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

from dnslib import RCODE, DNSHeader, DNSLabel, DNSQuestion, DNSRecord

from ktproxy import aio
from ktproxy.dns.names import candidate_names, label_text, reverse_name_to_ip, split_service_labels, text_to_label
from ktproxy.dns.wire import new_id, reply_from
from ktproxy.routing import ClusterRules

log = logging.getLogger("ktproxy.dns")

# The tunnel's open_connection (asyncssh's, or asyncio's in tests): one TCP stream to host:port.
OpenConnection = Callable[[str, int], Awaitable[tuple[Any, Any]]]
Address = tuple[str, int]

_WEDGED_AFTER = 0.5  # seconds without a byte from the cluster DNS while a query waits


class TunnelConn:
    """One TCP stream to the cluster DNS carrying many queries at once, matched by message id."""

    def __init__(self, reader: Any, writer: Any) -> None:
        self.reader = reader
        self.writer = writer
        self.pending: dict[int, asyncio.Future[bytes]] = {}
        self.closed = False
        self.last_rx = time.monotonic()
        self.used = False
        self.task = aio.create_task(self._read_loop())

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
        if self.task is not asyncio.current_task(aio.running_loop()):
            self.task.cancel()

    async def exchange(self, query: DNSRecord, deadline: float) -> bytes:
        if self.closed:
            raise ConnectionError("tunnel DNS stream closed")
        self.used = True
        qid = new_id()
        while qid in self.pending:
            qid = new_id()
        query.header.id = qid
        packet = query.pack()
        fut: asyncio.Future[bytes] = aio.running_loop().create_future()
        self.pending[qid] = fut
        sent = time.monotonic()
        try:
            async with aio.Deadline(deadline - sent):
                self.writer.write(struct.pack("!H", len(packet)) + packet)
                await self.writer.drain()
                return await fut
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


class TunnelPool:
    """A few lazily-opened pipelined streams; a stream that fails is replaced on next use."""

    def __init__(self, open_connection: OpenConnection, server: Address, size: int) -> None:
        self._open = open_connection
        self._server = server
        self._slots: list[TunnelConn | None] = [None] * max(1, size)
        self._lock = asyncio.Lock()
        self.opened = 0

    def _idle(self) -> TunnelConn | None:
        return next((c for c in self._slots if c is not None and not c.closed and not c.pending), None)

    async def _connect(self) -> TunnelConn:
        try:
            reader, writer = await self._open(*self._server)
        except Exception as exc:  # OSError, asyncssh.ChannelOpenError, ...: the tunnel is down
            raise ConnectionError(f"cannot open tunnel to cluster DNS: {exc!r}") from exc
        self.opened += 1
        return TunnelConn(reader, writer)

    async def _get(self) -> TunnelConn:
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
                    self._slots[i] = new = await self._connect()
                    return new
            # All streams busy and the pool is full: pipelining on the least busy one is still cheaper
            # than another SSH channel.
            return min((c for c in self._slots if c is not None), key=lambda c: len(c.pending))

    async def query(self, query: DNSRecord, deadline: float) -> DNSRecord:
        for attempt in (1, 2):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            async with aio.Deadline(remaining):
                conn = await self._get()
            reused = conn.used
            try:
                raw = await conn.exchange(query, deadline)
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
        raise AssertionError("unreachable: the second attempt returns or raises")

    def close(self) -> None:
        for conn in self._slots:
            if conn is not None:
                conn.close()
        self._slots = [None] * len(self._slots)


class ClusterResolver:
    """Cluster names and reverse names of cluster addresses, asked of the cluster DNS through the
    tunnel with the pod's search list: further down the list only while the name does not exist."""

    def __init__(self, rules: ClusterRules, pool: TunnelPool) -> None:
        self.rules = rules
        self.pool = pool

    def targets(self, qname: DNSLabel) -> list[DNSLabel]:
        if reverse_name_to_ip(qname) is not None:
            return [qname]
        text = label_text(qname)
        if text is None:
            return [qname]
        prefix, base = split_service_labels(text)
        return [text_to_label(prefix + c) for c in candidate_names(base, self.rules)]

    async def resolve(self, query: DNSRecord, deadline: float) -> DNSRecord:
        q = query.q
        targets = self.targets(q.qname)
        for asked in targets:
            sub = DNSRecord(DNSHeader(rd=1), q=DNSQuestion(asked, q.qtype, q.qclass))
            response = await self.pool.query(sub, deadline)
            if response.header.rcode != RCODE.NXDOMAIN or asked is targets[-1]:
                return reply_from(query, response, asked)
        raise AssertionError("unreachable: the last target returns")
