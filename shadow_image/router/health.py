"""The router's probe and introspection endpoint: GET /ready (200 once every listener is up and the
annotations file was read, else 503 with the reason), GET /live, GET /routes (JSON)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Callable

from shadow_image import listeners
from shadow_image.router.table import Route

_TIMEOUT = 5.0
_MAX_HEAD = 8192
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            503: "Service Unavailable"}


def answer(method: str, path: str, ready: Callable[[], tuple[bool, str]],
           routes: Callable[[], list[Route]]) -> tuple[int, str, str]:
    """(status, content type, body) for one request."""
    if method not in ("GET", "HEAD"):
        return 405, "text/plain", "method not allowed\n"
    path = path.split("?", 1)[0]
    if path == "/live":
        return 200, "text/plain", "live\n"
    if path == "/ready":
        ok, reason = ready()
        return (200 if ok else 503), "text/plain", reason + "\n"
    if path == "/routes":
        return 200, "application/json", json.dumps({"routes": [list(r) for r in routes()]}) + "\n"
    return 404, "text/plain", "not found (try /ready, /routes or /live)\n"


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  ready: Callable[[], tuple[bool, str]], routes: Callable[[], list[Route]]) -> None:
    try:
        async with asyncio.timeout(_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) == 3:
            status, ctype, body = answer(parts[0], parts[1], ready, routes)
        else:
            status, ctype, body = 400, "text/plain", "bad request\n"
        payload = body.encode()
        writer.write(f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {ctype}; charset=utf-8\r\n"
                     f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                     + (b"" if parts[:1] == ["HEAD"] else payload))
        await writer.drain()
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def serve(port: int, ready: Callable[[], tuple[bool, str]],
                routes: Callable[[], list[Route]]) -> listeners.Listening:
    async def start(sock: socket.socket) -> asyncio.Server:
        return await asyncio.start_server(lambda r, w: _handle(r, w, ready, routes), sock=sock, limit=_MAX_HEAD)

    return await listeners.listen("", port, start)
