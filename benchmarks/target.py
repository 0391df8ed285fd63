"""The benchmark target: one port, four tiny protocols picked by the first byte of a connection.

`B` + 8-byte length: the server sends that many bytes (bulk download), then keeps the connection open
until the client closes it. `U` + 8-byte length: the server reads that many bytes and answers `k`
(bulk upload). `G` (an HTTP `GET`): a keep-alive HTTP/1.1 server with a fixed small response (`Connection:
close` in the request makes it close after the response). `E`: echo (memory case: held connections).

Protocol-level (no streams) and uvloop, so the target costs as little CPU as we can make it in Python.
Run as `python -m benchmarks.target --host 127.0.0.2 --port-file F`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import struct

BODY = b"x" * 128
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(BODY)) + BODY
RESPONSE_CLOSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(BODY)) + BODY
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
REQUEST_CLOSE = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
SEND_BLOCK = memoryview(b"\0" * (1024 * 1024))


class Target(asyncio.Protocol):
    def __init__(self) -> None:
        self.t: asyncio.Transport | None = None
        self.buf = b""
        self.mode = ""
        self.remaining = 0
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        assert self.t is not None
        if self.mode == "U":
            self.remaining -= len(data)
            if self.remaining <= 0:
                self.t.write(b"k")
                self.mode = "done"
            return
        if self.mode == "E":
            self.t.write(data)
            return
        if self.mode == "G":
            self._http(data)
            return
        if self.mode:
            return
        self.buf += data
        first = self.buf[:1]
        if first == b"G":
            self.mode = "G"
            data, self.buf = self.buf, b""
            self._http(data)
        elif first == b"E":
            self.mode = "E"
            if len(self.buf) > 1:
                self.t.write(self.buf[1:])
            self.buf = b""
        elif first in (b"B", b"U") and len(self.buf) >= 9:
            self.mode = first.decode()
            (n,) = struct.unpack("!Q", self.buf[1:9])
            rest, self.buf = self.buf[9:], b""
            self.remaining = n
            if self.mode == "B":
                self._send()
            elif rest:
                self.data_received(rest)

    def _http(self, data: bytes) -> None:
        assert self.t is not None
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buf = self.buf[:end], self.buf[end + 4:]
            if b"Connection: close" in head:
                self.t.write(RESPONSE_CLOSE)
                self.t.close()
                return
            self.t.write(RESPONSE)

    def _send(self) -> None:
        assert self.t is not None
        while self.remaining > 0 and not self.paused:
            n = min(self.remaining, len(SEND_BLOCK))
            self.t.write(SEND_BLOCK[:n])
            self.remaining -= n

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.mode == "B":
            self._send()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.t = None
        self.paused = True


async def serve(host: str, port: int, port_file: str | None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Target, host, port, backlog=4096)
    if port_file:
        tmp = port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(server.sockets[0].getsockname()[1]))
        os.replace(tmp, port_file)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.target")
    p.add_argument("--host", default="127.0.0.2")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file")
    args = p.parse_args()
    if not args.host.startswith("127."):
        raise SystemExit("benchmarks only ever listen on loopback")
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args.host, args.port, args.port_file))


if __name__ == "__main__":
    main()
