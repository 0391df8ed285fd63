"""The load client, run in its own process (uvloop, Protocol-level, no per-byte Python work).

    python -m benchmarks.load --via socks5:127.0.0.1:2223 --target 127.0.0.2:PORT --mode down ...

`--via` is `direct`, `socks5:H:P` or `http:H:P` (HTTP CONNECT). Modes:
- down / up: bulk bytes per stream, `--streams` at once; prints aggregate MB/s (MB = 10^6 bytes).
- rr: `--streams` keep-alive connections each doing request/response in a closed loop for `--duration`;
  prints p50/p99 latency (microseconds) and requests/s.
- conn: like rr, but each request opens a new proxied connection (handshake included) and the target
  closes it after the response.
- hold: opens `--streams` echo connections, checks each with one round trip, prints `ready`, and holds
  them until stdin closes (the memory case reads RSS meanwhile).
The result is one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import struct
import sys
import time
from collections.abc import Callable

from benchmarks.target import REQUEST, REQUEST_CLOSE, RESPONSE, RESPONSE_CLOSE

BLOCK = memoryview(b"\0" * (1024 * 1024))


class Via:
    def __init__(self, spec: str) -> None:
        self.kind, _, rest = spec.partition(":")
        if self.kind not in ("direct", "socks5", "http"):
            raise SystemExit(f"unknown --via {spec}")
        if self.kind != "direct":
            host, _, port = rest.rpartition(":")
            self.addr = (host, int(port))


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, n - len(buf))
        if not chunk:
            raise ConnectionError("proxy closed during the handshake")
        buf += chunk
    return buf


async def open_socket(via: Via, target: tuple[str, int]) -> socket.socket:
    """A connected non-blocking socket to target, through the proxy; handshake done (not pipelined)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        if via.kind == "direct":
            await loop.sock_connect(sock, target)
            return sock
        await loop.sock_connect(sock, via.addr)
        host, port = target
        if via.kind == "socks5":
            await loop.sock_sendall(sock, b"\x05\x01\x00")
            if await _recv_exactly(loop, sock, 2) != b"\x05\x00":
                raise ConnectionError("SOCKS5 method refused")
            await loop.sock_sendall(sock, b"\x05\x01\x00\x01" + socket.inet_aton(host) + struct.pack("!H", port))
            head = await _recv_exactly(loop, sock, 4)
            if head[1] != 0:
                raise ConnectionError(f"SOCKS5 reply {head[1]}")
            rest = {1: 4, 4: 16}.get(head[3])
            if rest is None:
                rest = (await _recv_exactly(loop, sock, 1))[0]
            await _recv_exactly(loop, sock, rest + 2)
            return sock
        await loop.sock_sendall(sock, f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await loop.sock_recv(sock, 4096)
            if not chunk:
                raise ConnectionError("proxy closed during CONNECT")
            head += chunk
        if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
            raise ConnectionError(f"CONNECT refused: {head[:40]!r}")
        return sock
    except BaseException:
        sock.close()
        raise


# -- bulk ---------------------------------------------------------------------------------------

class Down(asyncio.Protocol):
    def __init__(self, n: int) -> None:
        self.remaining = n
        self.done = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.remaining -= len(data)
        if self.remaining <= 0 and not self.done.done():
            self.done.set_result(time.perf_counter())

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"closed with {self.remaining} bytes to go"))


class Up(asyncio.Protocol):
    def __init__(self, n: int) -> None:
        self.remaining = n
        self.paused = False
        self.t: asyncio.Transport | None = None
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]

    def start(self) -> None:
        self._send()

    def _send(self) -> None:
        assert self.t is not None
        while self.remaining > 0 and not self.paused:
            n = min(self.remaining, len(BLOCK))
            self.t.write(BLOCK[:n])
            self.remaining -= n

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._send()

    def data_received(self, data: bytes) -> None:
        if b"k" in data and not self.done.done():
            self.done.set_result(time.perf_counter())

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError("closed before the upload was acknowledged"))


async def bulk(via: Via, target: tuple[str, int], mode: str, streams: int, nbytes: int) -> dict:
    loop = asyncio.get_running_loop()
    socks = await asyncio.gather(*(open_socket(via, target) for _ in range(streams)))
    conns = []
    for sock in socks:
        proto_factory = (lambda: Down(nbytes)) if mode == "down" else (lambda: Up(nbytes))
        conns.append(await loop.create_connection(proto_factory, sock=sock))
    start = time.perf_counter()
    for t, p in conns:
        t.write((b"B" if mode == "down" else b"U") + struct.pack("!Q", nbytes))
        if mode == "up":
            p.start()
    ends = await asyncio.gather(*(p.done for _, p in conns))
    elapsed = max(ends) - start
    for t, _ in conns:
        t.close()
    total = nbytes * streams
    return {"mbps": total / elapsed / 1e6, "seconds": elapsed, "bytes": total}


# -- request/response ---------------------------------------------------------------------------

class RR(asyncio.Protocol):
    """Closed loop: a request, the whole fixed-size response, the next request."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.t: asyncio.Transport | None = None
        self.got = 0
        self.sent_at = 0.0
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]

    def fire(self) -> None:
        assert self.t is not None
        self.got = 0
        self.sent_at = time.perf_counter()
        self.t.write(REQUEST)

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self.got >= len(RESPONSE):
            now = time.perf_counter()
            self.stats.add(now - self.sent_at, now)
            if not self.stats.stopping:
                self.fire()
            elif self.t is not None:
                self.t.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class Stats:
    def __init__(self, warmup_until: float, stop_at: float) -> None:
        self.warmup_until = warmup_until
        self.stop_at = stop_at
        self.lat: list[float] = []
        self.count = 0
        self.stopping = False

    def add(self, latency: float, now: float) -> None:
        if now >= self.stop_at:
            self.stopping = True
            return
        if now >= self.warmup_until:
            self.lat.append(latency)
            self.count += 1

    def result(self, window: float) -> dict:
        lat = sorted(self.lat)
        if not lat:
            raise SystemExit("no requests completed")

        def pct(q: float) -> float:
            return lat[min(len(lat) - 1, int(q * len(lat)))] * 1e6

        return {"p50_us": pct(0.50), "p99_us": pct(0.99), "rps": self.count / window, "requests": self.count}


async def rr(via: Via, target: tuple[str, int], streams: int, duration: float, warmup: float,
             make: Callable[[Stats], RR] = RR) -> dict:
    """`streams` kept-alive connections in a closed loop; `make` builds each one's protocol (an RR that
    frames other requests and answers, e.g. httpload's)."""
    loop = asyncio.get_running_loop()
    socks = await asyncio.gather(*(open_socket(via, target) for _ in range(streams)))
    now = time.perf_counter()
    stats = Stats(now + warmup, now + warmup + duration)
    conns = [await loop.create_connection(lambda: make(stats), sock=s) for s in socks]
    for _, p in conns:
        p.fire()
    await asyncio.sleep(warmup + duration)
    stats.stopping = True
    await asyncio.wait([p.closed for _, p in conns], timeout=5)
    for t, _ in conns:
        t.close()
    return stats.result(duration)


class OneShot(asyncio.Protocol):
    def __init__(self) -> None:
        self.got = 0
        self.done = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self.got >= len(RESPONSE_CLOSE) and not self.done.done():
            self.done.set_result(time.perf_counter())

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError("closed before the response"))


async def conn(via: Via, target: tuple[str, int], streams: int, duration: float, warmup: float,
               make: Callable[[], OneShot] = OneShot, request: bytes = REQUEST_CLOSE) -> dict:
    """`streams` workers, each opening a connection per request; `make` builds the protocol that tells
    when the whole answer to `request` arrived."""
    loop = asyncio.get_running_loop()
    now = time.perf_counter()
    stats = Stats(now + warmup, now + warmup + duration)
    errors = 0

    async def worker() -> None:
        nonlocal errors
        while not stats.stopping:
            start = time.perf_counter()
            try:
                sock = await open_socket(via, target)
                t, p = await loop.create_connection(make, sock=sock)
                t.write(request)
                end = await p.done
                t.close()
            except (OSError, ConnectionError):
                errors += 1
                await asyncio.sleep(0.01)
                continue
            stats.add(end - start, end)

    await asyncio.gather(*(worker() for _ in range(streams)))
    result = stats.result(duration)
    result["errors"] = errors
    return result


# -- hold (memory) ------------------------------------------------------------------------------

class Echo(asyncio.Protocol):
    def __init__(self) -> None:
        self.done = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError("closed"))


async def hold(via: Via, target: tuple[str, int], streams: int) -> dict:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(64)  # the listen backlogs are finite: do not SYN-flood them
    transports = []

    async def one() -> None:
        async with gate:
            sock = await open_socket(via, target)
            t, p = await loop.create_connection(Echo, sock=sock)
            t.write(b"Eping")
            await p.done
            transports.append(t)

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(streams)))
    opened = time.perf_counter() - start
    print(json.dumps({"ready": True, "open": len(transports), "open_seconds": opened}), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)
    for t in transports:
        t.close()
    return {"open": len(transports), "open_seconds": opened}


def allowed_target(host: str) -> bool:
    """Loopback, or a pod of the local cluster (tests/cluster: 10.244.0.0/16, routed only to its bridge)."""
    import ipaddress
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip in ipaddress.ip_network("10.244.0.0/16")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.load")
    p.add_argument("--via", default="direct")
    p.add_argument("--target", required=True, help="host:port (loopback or the local cluster's pod range)")
    p.add_argument("--mode", choices=["down", "up", "rr", "conn", "hold"], required=True)
    p.add_argument("--streams", type=int, default=1)
    p.add_argument("--bytes", type=int, default=32 * 1024 * 1024)
    p.add_argument("--duration", type=float, default=2.0)
    p.add_argument("--warmup", type=float, default=0.3)
    p.add_argument("--no-uvloop", action="store_true")
    args = p.parse_args()
    host, _, port = args.target.rpartition(":")
    if not allowed_target(host):
        raise SystemExit(f"benchmarks only ever send traffic to loopback and the local cluster's pods, not {host}")
    target = (host, int(port))
    via = Via(args.via)
    if via.kind != "direct" and not via.addr[0].startswith("127."):
        raise SystemExit("benchmarks only ever send traffic to loopback")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * args.streams + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if not args.no_uvloop:
        try:
            import uvloop
            uvloop.install()
        except ImportError:
            pass
    if args.mode in ("down", "up"):
        coro = bulk(via, target, args.mode, args.streams, args.bytes)
    elif args.mode == "rr":
        coro = rr(via, target, args.streams, args.duration, args.warmup)
    elif args.mode == "conn":
        coro = conn(via, target, args.streams, args.duration, args.warmup)
    else:
        coro = hold(via, target, args.streams)
    print(json.dumps(asyncio.run(coro)), flush=True)


if __name__ == "__main__":
    main()
