"""SOCKS5 (RFC 1928, user/pass RFC 1929) and SOCKS4/4a: request parsing and replies.

Parsing reads exactly what the protocol says from an asyncio StreamReader, so the same code serves
the live proxy and the tests. Only CONNECT is offered: BIND and UDP ASSOCIATE get "command not
supported".
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from dataclasses import dataclass

SOCKS5 = 0x05
SOCKS4 = 0x04

# SOCKS5 reply codes
REP_OK = 0x00
REP_FAILURE = 0x01
REP_NOT_ALLOWED = 0x02
REP_NET_UNREACHABLE = 0x03
REP_HOST_UNREACHABLE = 0x04
REP_REFUSED = 0x05
REP_TTL_EXPIRED = 0x06
REP_CMD_UNSUPPORTED = 0x07
REP_ATYP_UNSUPPORTED = 0x08

DIAL_ERROR_REPLY = {
    "refused": REP_REFUSED,
    "unreachable": REP_HOST_UNREACHABLE,
    "dns": REP_HOST_UNREACHABLE,
    "timeout": REP_TTL_EXPIRED,
    "failure": REP_FAILURE,
}

METHOD_NONE = 0x00
METHOD_USERPASS = 0x02
METHOD_UNACCEPTABLE = 0xFF


class SocksError(Exception):
    """A malformed or unsupported request; `reply` is the code to send before closing (or None)."""

    def __init__(self, message: str, reply: int | None = REP_FAILURE) -> None:
        super().__init__(message)
        self.reply = reply


@dataclass(frozen=True)
class SocksRequest:
    version: int
    host: str
    port: int


async def read_socks5_greeting(reader: asyncio.StreamReader) -> set[int]:
    """After the version byte: the client's offered auth methods."""
    (n,) = await reader.readexactly(1)
    if n == 0:
        raise SocksError("SOCKS5 greeting offers no methods", reply=None)
    return set(await reader.readexactly(n))


async def read_userpass(reader: asyncio.StreamReader) -> tuple[str, str]:
    ver, ulen = await reader.readexactly(2)
    if ver != 0x01:
        raise SocksError(f"bad username/password sub-negotiation version {ver}", reply=None)
    user = await reader.readexactly(ulen)
    (plen,) = await reader.readexactly(1)
    password = await reader.readexactly(plen)
    return user.decode("utf-8", "replace"), password.decode("utf-8", "replace")


async def read_socks5_request(reader: asyncio.StreamReader) -> SocksRequest:
    ver, cmd, _rsv, atyp = await reader.readexactly(4)
    if ver != SOCKS5:
        raise SocksError(f"bad SOCKS5 request version {ver}")
    if atyp == 0x01:
        host = socket.inet_ntop(socket.AF_INET, await reader.readexactly(4))
    elif atyp == 0x04:
        host = socket.inet_ntop(socket.AF_INET6, await reader.readexactly(16))
    elif atyp == 0x03:
        (n,) = await reader.readexactly(1)
        raw = await reader.readexactly(n)
    else:
        raise SocksError(f"address type {atyp} not supported", REP_ATYP_UNSUPPORTED)
    (port,) = struct.unpack("!H", await reader.readexactly(2))
    if atyp == 0x03:
        host = _decode_name(raw, REP_HOST_UNREACHABLE)
    if cmd != 0x01:
        raise SocksError(f"SOCKS5 command {cmd} not supported (CONNECT only)", REP_CMD_UNSUPPORTED)
    if port == 0:
        raise SocksError("port 0", REP_HOST_UNREACHABLE)
    return SocksRequest(5, host, port)


def _decode_name(raw: bytes, reply: int) -> str:
    """A destination name as sent. ASCII (including IDNA A-labels, "xn--...") is kept verbatim: it is
    already the name DNS knows, and decoding it with Python's IDNA 2003 codec would refuse valid
    IDNA 2008 names or change them (straße -> strasse). Raw UTF-8 is accepted as a U-label name."""
    try:
        host = raw.decode("ascii") if raw.isascii() else raw.decode("utf-8")
    except UnicodeError as exc:
        raise SocksError("undecodable domain name", reply) from exc
    if not host or "\x00" in host:
        raise SocksError("empty domain name", reply)
    return host


def socks5_reply(code: int, bind_host: str = "0.0.0.0", bind_port: int = 0) -> bytes:
    ip = ipaddress.ip_address(bind_host)
    atyp = 0x01 if ip.version == 4 else 0x04
    return bytes([SOCKS5, code, 0x00, atyp]) + ip.packed + struct.pack("!H", bind_port)


async def _read_cstring(reader: asyncio.StreamReader, limit: int = 255) -> bytes:
    try:
        data = await reader.readuntil(b"\x00")
    except asyncio.LimitOverrunError as exc:
        raise SocksError("SOCKS4 field too long", reply=None) from exc
    if len(data) > limit + 1:
        raise SocksError("SOCKS4 field too long", reply=None)
    return data[:-1]


async def read_socks4_request(reader: asyncio.StreamReader) -> SocksRequest:
    """After the version byte: SOCKS4 CONNECT, or SOCKS4a when the address is 0.0.0.x."""
    cmd, = await reader.readexactly(1)
    port, raw_ip = struct.unpack("!H4s", await reader.readexactly(6))
    await _read_cstring(reader)  # user id, unused
    if raw_ip[:3] == b"\x00\x00\x00" and raw_ip[3] != 0:
        host = _decode_name(await _read_cstring(reader), REP_FAILURE)
    else:
        host = socket.inet_ntop(socket.AF_INET, raw_ip)
    if cmd != 0x01:
        raise SocksError(f"SOCKS4 command {cmd} not supported (CONNECT only)")
    if port == 0:
        raise SocksError("port 0")
    return SocksRequest(4, host, port)


def socks4_reply(ok: bool) -> bytes:
    return bytes([0x00, 0x5A if ok else 0x5B]) + b"\x00" * 6
