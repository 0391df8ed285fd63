"""A blocking SOCKS5 CONNECT client for the benchmark harness (start-up probes, the pproxy check).

The load generator (benchmarks/load.py) has its own asyncio client; this one is for the orchestrating
process, where a plain socket is simplest.
"""

from __future__ import annotations

import ipaddress
import socket
import struct


class ProxyError(ConnectionError):
    """The proxy refused or broke the handshake."""


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ProxyError(f"proxy closed during handshake after {len(buf)}/{n} bytes")
        buf += chunk
    return buf


def socks5(proxy_port: int, host: str, port: int, timeout: float = 10.0, rcvbuf: int | None = None) -> socket.socket:
    """CONNECT to host:port through 127.0.0.1:proxy_port; returns the connected socket.

    IP literals go as addresses, anything else as a domain name resolved on the proxy's side."""
    s = socket.socket()
    try:
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(timeout)
        s.connect(("127.0.0.1", proxy_port))
        s.sendall(b"\x05\x01\x00")
        if recv_exact(s, 2) != b"\x05\x00":
            raise ProxyError("SOCKS5 greeting refused")
        try:
            ip = ipaddress.ip_address(host)
            addr = (b"\x01" if ip.version == 4 else b"\x04") + ip.packed
        except ValueError:
            addr = b"\x03" + bytes([len(host)]) + host.encode()
        s.sendall(b"\x05\x01\x00" + addr + struct.pack("!H", port))
        head = recv_exact(s, 4)
        if head[1] != 0:
            raise ProxyError(f"SOCKS5 CONNECT {host}:{port} refused (reply code {head[1]})")
        recv_exact(s, ({1: 4, 4: 16}.get(head[3]) or recv_exact(s, 1)[0]) + 2)
        return s
    except BaseException:
        s.close()
        raise
