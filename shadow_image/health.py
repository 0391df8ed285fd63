"""The pod's probe endpoint: GET /live is 200 while the process serves; GET /ready is 200 only when the
shadow can do its job (for exposed ports: every listener up and a laptop attached to each), else 503
with a one-line reason. A Service then sends traffic to the shadow only while a laptop takes it.
The mesh router serves the same endpoint with a page of its own (/routes)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from shadow_image import listeners

if TYPE_CHECKING:  # at run time ports.py would pull asyncssh into the router, which serves this too
    from shadow_image.ports import PortState

# A probe that sends nothing, or a header flood, must not hold a connection.
_REQUEST_TIMEOUT = 5.0
_MAX_HEAD = 8192


def readiness(ssh_serving: bool, ports: Sequence[PortState]) -> tuple[bool, str]:
    """(ready, reason): the SSH port listens and, for every exposed port, its listener is up and at least
    one laptop session has asked for it (tcpip-forward)."""
    if not ssh_serving:
        return False, "the SSH server is not listening"
    down = [p.port for p in ports if not p.listening]
    if down:
        return False, f"not listening on port(s) {_join(down)}"
    unattached = [p.port for p in ports if not p.sessions]
    if unattached:
        return False, f"no laptop attached for port(s) {_join(unattached)}"
    if not ports:
        return True, "listening"
    return True, f"laptop attached for port(s) {_join(p.port for p in ports)}"


def _join(ports: Iterable[int]) -> str:
    return ",".join(str(p) for p in ports)


# path -> () -> (content type, body): further read-only pages beside /live and /ready
Pages = Mapping[str, Callable[[], tuple[str, str]]]
_TEXT = "text/plain"


def answer(method: str, path: str, check: Callable[[], tuple[bool, str]],
           pages: Pages | None = None) -> tuple[int, str, str]:
    """(status, content type, body) for one request."""
    if method not in ("GET", "HEAD"):
        return 405, _TEXT, "method not allowed\n"
    path = path.split("?", 1)[0]
    if path == "/live":
        return 200, _TEXT, "live\n"
    if path == "/ready":
        ok, reason = check()
        return (200 if ok else 503), _TEXT, reason + "\n"
    if pages and path in pages:
        ctype, body = pages[path]()
        return 200, ctype, body
    return 404, _TEXT, f"not found (try {', '.join(['/ready', '/live', *(pages or {})])})\n"


_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 400: "Bad Request", 503: "Service Unavailable"}


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  check: Callable[[], tuple[bool, str]], pages: Pages | None) -> None:
    try:
        async with asyncio.timeout(_REQUEST_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")  # all of it: closing on unread bytes would send RST
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        method, path = (parts[0], parts[1]) if len(parts) == 3 else ("", "")
        status, ctype, body = answer(method, path, check, pages) if method else (400, _TEXT, "bad request\n")
        payload = body.encode()
        writer.write(f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {ctype}; charset=utf-8\r\n"
                     f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                     + (b"" if method == "HEAD" else payload))
        await writer.drain()
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def serve_health(port: int, check: Callable[[], tuple[bool, str]],
                       pages: Pages | None = None) -> listeners.Listening:
    """The probe endpoint on all addresses (dual stack: the kubelet probes the pod's own IP)."""

    async def start(sock: socket.socket) -> asyncio.Server:
        return await asyncio.start_server(lambda r, w: _handle(r, w, check, pages), sock=sock, limit=_MAX_HEAD)

    return await listeners.listen("", port, start)
