"""HTTP/1.1 load for HTTP proxies (the mesh router, nginx): benchmarks.load's rr and conn modes with chosen
request headers and responses framed by their Content-Length.

benchmarks.load counts a fixed number of response bytes, which only works when the bytes are the origin's
own; a proxy rewrites the header block (nginx adds Server, Date, Connection), so here each response ends
where its header block and Content-Length say. Latency percentiles and the socket set-up are load.py's.

    python -m benchmarks.httpload --target 127.0.0.1:PORT --mode rr --streams 100 --header 'Version: abcde'

Prints one JSON line: p50_us, p99_us, rps (requests or connections per second), requests, and `bad` (responses
whose status was not 200: a proxy that answers 502 fast must not look fast).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import time

from benchmarks.load import RR, OneShot, Stats, Via, allowed_target, conn, rr


class ProtocolError(Exception):
    pass


class Framer:
    """Counts complete responses in a byte stream (Content-Length bodies: what both proxies send for the
    origin's fixed body) and how many of them were not 200."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.need = -1  # body bytes still to come; -1: inside a header block
        self.bad = 0

    def feed(self, data: bytes) -> int:
        self.buf += data
        done = 0
        while True:
            if self.need < 0:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return done
                head = bytes(self.buf[:end]).lower()
                if not head.startswith(b"http/1.1 200 ") and not head.startswith(b"http/1.0 200 "):
                    self.bad += 1
                at = head.find(b"\r\ncontent-length:")
                if at < 0:
                    raise ProtocolError(f"response without Content-Length: {head[:200]!r}")
                stop = head.find(b"\r\n", at + 2)
                self.need = int(head[at + 17:stop if stop >= 0 else end])
                del self.buf[:end + 4]
            if len(self.buf) < self.need:
                return done
            del self.buf[:self.need]
            self.need = -1
            done += 1


def request(headers: list[str], close: bool = False) -> bytes:
    lines = ["GET / HTTP/1.1", "Host: bench", *headers] + (["Connection: close"] if close else [])
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def fetch(addr: tuple[str, int], headers: list[str]) -> tuple[int, bytes]:
    """One request on its own blocking connection: the status and the body (which origin answered)."""
    with socket.create_connection(addr, timeout=5) as s:
        s.sendall(request(headers, close=True))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


class KeepAlive(RR):
    """load.RR's closed loop (a request, its whole response, the next request) with this request and framing."""

    def __init__(self, stats: Stats, req: bytes) -> None:
        super().__init__(stats)
        self.req = req
        self.framer = Framer()

    def fire(self) -> None:
        assert self.t is not None
        self.sent_at = time.perf_counter()
        self.t.write(self.req)

    def data_received(self, data: bytes) -> None:
        if self.framer.feed(data):
            now = time.perf_counter()
            self.stats.add(now - self.sent_at, now)
            if not self.stats.stopping:
                self.fire()
            elif self.t is not None:
                self.t.close()


class Once(OneShot):
    """load.OneShot (one request on a fresh connection, done at its whole response) with framing."""

    def __init__(self) -> None:
        super().__init__()
        self.framer = Framer()

    def data_received(self, data: bytes) -> None:
        if self.framer.feed(data) and not self.done.done():
            self.done.set_result(time.perf_counter())


async def keepalive(target: tuple[str, int], streams: int, duration: float, warmup: float,
                    headers: list[str]) -> dict:
    req = request(headers)
    made: list[KeepAlive] = []

    def make(stats: Stats) -> KeepAlive:
        made.append(KeepAlive(stats, req))
        return made[-1]

    result = await rr(Via("direct"), target, streams, duration, warmup, make)
    return dict(result, bad=sum(p.framer.bad for p in made))


async def connections(target: tuple[str, int], streams: int, duration: float, warmup: float,
                      headers: list[str]) -> dict:
    """`streams` workers, each opening a connection per request, in a closed loop; latency includes the
    TCP handshake."""
    made: list[Once] = []

    def make() -> Once:
        made.append(Once())
        return made[-1]

    result = await conn(Via("direct"), target, streams, duration, warmup, make, request(headers, close=True))
    return dict(result, bad=sum(p.framer.bad for p in made))


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.httpload")
    p.add_argument("--target", required=True, help="host:port (loopback or the local cluster's pod range)")
    p.add_argument("--mode", choices=["rr", "conn"], required=True)
    p.add_argument("--streams", type=int, default=1)
    p.add_argument("--duration", type=float, default=2.0)
    p.add_argument("--warmup", type=float, default=0.3)
    p.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'")
    p.add_argument("--no-uvloop", action="store_true")
    args = p.parse_args()
    host, _, port = args.target.rpartition(":")
    if not allowed_target(host):
        raise SystemExit(f"benchmarks only ever send traffic to loopback and the local cluster's pods, not {host}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.streams + 256)), hard))
    if not args.no_uvloop:
        try:
            import uvloop
            uvloop.install()
        except ImportError:
            pass
    run = keepalive if args.mode == "rr" else connections
    print(json.dumps(asyncio.run(run((host, int(port)), args.streams, args.duration, args.warmup, args.header))),
          flush=True)


if __name__ == "__main__":
    main()
