"""Test upstream for the mesh e2e tests: one port speaking HTTP/1.1 (keep-alive, chunked bodies),
WebSocket, HTTP/2 cleartext (prior knowledge) and a raw binary echo, each answer naming the server.

The same file runs in a pod of the cluster (the shadow image's /opt/ktproxy/bin/python, which has h2;
answering "cluster") and on the laptop in the test process (serve_in_thread; answering "laptop", "alice"
...), so both ends of every route speak exactly the same protocols and only the name differs.

  HTTP/1.1   body "<name> http/1.1"; headers x-upstream, x-seen-host, x-seen-xff
  WebSocket  every text/binary message echoed back as "<name>:" + message
  HTTP/2     body "<name> h2", the same headers (the request's :authority as x-seen-host)
  raw        a connection whose first byte is 0x00: messages b"\\0KTRAW" + len(4, big endian) + payload
             are answered with name + b"\\0" + len + the same payload, any number per connection

Standard library plus h2 (only for HTTP/2).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import struct
import sys
import threading
from collections.abc import Iterator

PREFACE_LINE = b"PRI * HTTP/2.0\r\n"
RAW_MAGIC = b"\x00KTRAW"
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B65"


class Upstream:
    def __init__(self, name: str) -> None:
        self.name = name

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            first = await reader.read(1)
            if not first:
                return
            if first == b"\x00":
                await self.raw(first, reader, writer)
                return
            line = first + await reader.readline()
            if line == PREFACE_LINE:
                await self.h2(line + await reader.readexactly(8), reader, writer)
            else:
                await self.http1(line, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    # ---------------------------------------------------------------------------------------- HTTP/1
    async def http1(self, line: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line:
            if line in (b"\r\n", b"\n"):  # tolerated between pipelined requests
                line = await reader.readline()
                continue
            method, _target, version = line.decode("latin-1").split()
            headers: dict[str, str] = {}
            while True:
                h = await reader.readline()
                if h in (b"\r\n", b"\n", b""):
                    break
                k, _, v = h.decode("latin-1").partition(":")
                headers[k.strip().lower()] = v.strip()
            await self._read_body(headers, reader)
            if headers.get("upgrade", "").lower() == "websocket":
                await self.websocket(headers, reader, writer)
                return
            body = f"{self.name} http/1.1".encode()
            close = headers.get("connection", "").lower() == "close" or version == "HTTP/1.0"
            head = [
                "HTTP/1.1 200 OK",
                "Content-Type: text/plain",
                f"Content-Length: {len(body)}",
                f"X-Upstream: {self.name}",
                f"X-Seen-Host: {headers.get('host', '')}",
                f"X-Seen-Xff: {headers.get('x-forwarded-for', '')}",
            ]
            if close:
                head.append("Connection: close")
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (b"" if method == "HEAD" else body))
            await writer.drain()
            if close:
                return
            line = await reader.readline()

    @staticmethod
    async def _read_body(headers: dict[str, str], reader: asyncio.StreamReader) -> None:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await reader.readline()).split(b";")[0], 16)
                await reader.readexactly(size + 2)
                if size == 0:
                    return
        n = int(headers.get("content-length", "0") or 0)
        if n:
            await reader.readexactly(n)

    # ------------------------------------------------------------------------------------- WebSocket
    async def websocket(self, headers: dict[str, str], reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        accept = base64.b64encode(hashlib.sha1(headers["sec-websocket-key"].encode() + WS_GUID).digest())
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept + b"\r\nX-Upstream: " + self.name.encode() + b"\r\n\r\n")
        await writer.drain()
        while True:
            opcode, payload = await read_frame(reader)
            if opcode == 8:
                writer.write(frame(8, payload[:2]))
                await writer.drain()
                return
            if opcode == 9:
                writer.write(frame(10, payload))
            elif opcode in (1, 2):
                writer.write(frame(opcode, self.name.encode() + b":" + payload))
            await writer.drain()

    # ---------------------------------------------------------------------------------------- HTTP/2
    async def h2(self, preface: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import h2.config
        import h2.connection
        import h2.events

        conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=False,
                                                                           header_encoding="utf-8"))
        conn.initiate_connection()
        data = preface
        requests: dict[int, dict[str, str]] = {}
        while data:
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    requests[event.stream_id] = dict(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    req = requests.pop(event.stream_id, {})
                    body = f"{self.name} h2".encode()
                    conn.send_headers(event.stream_id, [
                        (":status", "200"), ("content-type", "text/plain"), ("content-length", str(len(body))),
                        ("x-upstream", self.name), ("x-seen-host", req.get(":authority", "")),
                        ("x-seen-xff", req.get("x-forwarded-for", "")),
                    ])
                    conn.send_data(event.stream_id, body, end_stream=True)
                elif isinstance(event, h2.events.ConnectionTerminated):
                    writer.write(conn.data_to_send())
                    await writer.drain()
                    return
            writer.write(conn.data_to_send())
            await writer.drain()
            data = await reader.read(65536)

    # ------------------------------------------------------------------------------------------- raw
    async def raw(self, first: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            magic = first + await reader.readexactly(len(RAW_MAGIC) - len(first))
            if magic != RAW_MAGIC:
                return
            (n,) = struct.unpack(">I", await reader.readexactly(4))
            payload = await reader.readexactly(n)
            writer.write(self.name.encode() + b"\x00" + struct.pack(">I", n) + payload)
            await writer.drain()
            first = await reader.read(1)
            if not first:
                return


# ------------------------------------------------------------------------------ WebSocket framing
def frame(opcode: int, payload: bytes, mask: bytes | None = None) -> bytes:
    """One final frame; `mask` (4 bytes) for the client side, as RFC 6455 requires."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack(">H", n)
    else:
        head += bytes([bit | 127]) + struct.pack(">Q", n)
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        head += mask
    return head + payload


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack(">H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack(">Q", await reader.readexactly(8))
    mask = await reader.readexactly(4) if b1 & 0x80 else None
    payload = await reader.readexactly(n)
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return b0 & 0x0F, payload


# ------------------------------------------------------------------------------------------ running
async def serve(name: str, host: str, port: int, started: threading.Event | None = None,
                box: dict | None = None) -> None:
    server = await asyncio.start_server(Upstream(name).handle, host, port, reuse_address=True)
    if box is not None:
        box["port"] = server.sockets[0].getsockname()[1]
        box["loop"] = asyncio.get_running_loop()
        box["server"] = server
    if started is not None:
        started.set()
    async with server:
        await server.serve_forever()


@contextlib.contextmanager
def serve_in_thread(name: str, port: int = 0, host: str = "127.0.0.1") -> Iterator[int]:
    """The upstream on the laptop, in a thread of the test process; yields its port."""
    started = threading.Event()
    box: dict = {}

    def run() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            asyncio.run(serve(name, host, port, started, box))

    thread = threading.Thread(target=run, name=f"upstream-{name}", daemon=True)
    thread.start()
    if not started.wait(10):
        raise RuntimeError(f"upstream {name} did not start on {host}:{port}")
    try:
        yield box["port"]
    finally:
        # Server.close() also ends serve_forever(); asyncio.run then cancels the open connections.
        box["loop"].call_soon_threadsafe(box["server"].close)
        thread.join(10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name")
    p.add_argument("port", type=int)
    p.add_argument("--host", default="0.0.0.0")
    a = p.parse_args()
    sys.stderr.write(f"upstream {a.name} on {a.host}:{a.port}\n")
    import signal

    # As PID 1 python ignores SIGTERM by default: every pod delete would wait out its grace period.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    asyncio.run(serve(a.name, a.host, a.port))


if __name__ == "__main__":
    main()
