"""Where a proxied connection goes: through the shadow pod or straight from this machine."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import asyncssh

from ktproxy import aio
from ktproxy.routing import ClusterRules, parse_ip

log = logging.getLogger("ktproxy.proxy")


class StreamOpener(Protocol):
    async def open_connection(self, host: str, port: int) -> tuple[Any, Any]: ...


# Addresses for a name dialed directly; the default is the system resolver (inside open_connection).
Resolve = Callable[[str], Awaitable[list[str]]]


class DialError(Exception):
    """A destination could not be reached; `kind` picks the protocol's error reply."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # one of: refused, unreachable, dns, timeout, failure


CONNECT_TIMEOUT = 15.0


class Dialer:
    def __init__(self, rules: ClusterRules, tunnel: StreamOpener, *, resolve: Resolve | None = None) -> None:
        self.rules = rules
        self.tunnel = tunnel
        self.resolve = resolve

    def via_tunnel(self, host: str) -> bool:
        return self.rules.via_tunnel(host)

    async def dial(self, host: str, port: int) -> tuple[Any, Any]:
        ip = parse_ip(host)
        if ip is not None:
            host = str(ip)  # '10.96.0.1.' or '[::1]' as the resolver-free literal
        if not self.via_tunnel(host):
            return await self._dial_direct(host, port)
        target = self.rules.qualify(host) if self.rules.is_cluster_name(host) else host
        try:
            return await self._dial_tunnel(target, port)
        except DialError as exc:
            if exc.kind != "dns" or not self._may_exist_outside(host):
                raise
            # A name the cluster does not know (a corporate short name, a public domain under a
            # namespace-like suffix) may still exist outside: ask the system resolver (finding B1).
            log.debug("%s; dialing %s directly", exc, host)
        return await self._dial_direct(host, port)

    def _may_exist_outside(self, host: str) -> bool:
        """A name (never an IP literal) that is not the cluster's alone (not under its domain, svc, pod)."""
        if parse_ip(host) is not None:
            return False
        return not self.rules.is_cluster_name(host) or self.rules.may_be_public_name(host)

    async def _dial_tunnel(self, host: str, port: int) -> tuple[Any, Any]:
        try:
            # The tunnel's open waits for the session without ever cancelling its rebuild, and closes
            # a channel confirmed after this deadline (R2, R7).
            async with aio.Deadline(CONNECT_TIMEOUT):
                return await self.tunnel.open_connection(host, port)
        except asyncssh.ChannelOpenError as exc:
            # The shadow reports the pod-side failure text; map the common ones.
            reason = (exc.reason or "").lower()
            if "refused" in reason:
                raise DialError("refused", f"{host}:{port}: connection refused in the cluster") from exc
            if "name" in reason or "not known" in reason or "resolve" in reason:
                raise DialError("dns", f"{host}: no such name in the cluster") from exc
            if "unreachable" in reason or "no route" in reason:
                raise DialError("unreachable", f"{host}:{port}: unreachable from the cluster") from exc
            raise DialError("failure", f"{host}:{port}: {exc.reason}") from exc
        except TimeoutError as exc:
            raise DialError("timeout", f"{host}:{port}: timed out through the cluster") from exc
        except Exception as exc:  # TunnelDown, KubeError from a rebuild, ...: always a protocol reply
            raise DialError("failure", f"{host}:{port}: tunnel unavailable: {exc}") from exc

    async def _dial_direct(self, host: str, port: int) -> tuple[Any, Any]:
        target = host
        if self.resolve is not None and parse_ip(host) is None:
            target = await self._resolve(host)
        try:
            async with aio.Deadline(CONNECT_TIMEOUT):
                reader, writer = await asyncio.open_connection(target, port)
        except TimeoutError as exc:
            raise DialError("timeout", f"{host}:{port}: timed out") from exc
        except socket.gaierror as exc:
            raise DialError("dns", f"{host}: {exc.strerror}") from exc
        except ConnectionRefusedError as exc:
            raise DialError("refused", f"{host}:{port}: connection refused") from exc
        except OSError as exc:
            kind = "unreachable" if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH) else "failure"
            raise DialError(kind, f"{host}:{port}: {exc.strerror or exc}") from exc
        set_nodelay(writer)
        return reader, writer


    async def _resolve(self, host: str) -> str:
        assert self.resolve is not None
        try:
            async with aio.Deadline(CONNECT_TIMEOUT):
                addresses = await self.resolve(host)
        except TimeoutError as exc:
            raise DialError("timeout", f"{host}: no answer from the resolver") from exc
        except Exception as exc:
            raise DialError("dns", f"{host}: {exc}") from exc
        if not addresses:
            raise DialError("dns", f"{host}: no such name")
        return addresses[0]


def upstream_resolve(servers: Sequence[tuple[str, int]]) -> Resolve:
    """Resolve direct names with these DNS servers (the DNS stub's upstreams) instead of the system's."""
    from dnslib import QTYPE, DNSRecord

    from ktproxy.dns.upstream import UpstreamResolver

    resolver = UpstreamResolver(servers)

    async def resolve(name: str) -> list[str]:
        reply = await resolver.resolve(DNSRecord.question(name, "A"), time.monotonic() + CONNECT_TIMEOUT)
        return [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A]

    return resolve


def set_nodelay(writer: Any) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
