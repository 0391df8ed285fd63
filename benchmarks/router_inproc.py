"""The mesh router's own CPU per HTTP/1 request, without sockets: the Python side alone.

    python -m benchmarks.router_inproc [--requests 20000] [--runs 7]
    python -m benchmarks.router_inproc --instructions     # per-request instruction counts (valgrind)

A ClientConnection (shadow_image/router/downstream.py) and a pooled UpstreamConnection are wired to fake
transports that only keep what is written; each request is the mesh case's request fed to the client
side's data_received, and the mesh case's origin response (nginx's exact bytes) fed to the upstream side's
data_received, in the order a loop would deliver them. The figure is process CPU time per request, best of
--runs (the machine is shared: the best run is the one least disturbed). No syscall is made per request,
so this is what the router's Python code (our callbacks, httptools, head building, routing) costs; the
socket reads and writes a real request adds come on top (see benchmarks.profile_router).

--instructions runs this module under valgrind's callgrind twice per route (300 and 1,300 requests, one
run, PYTHONHASHSEED=0) and prints the difference in instructions executed divided by 1,000: instructions
per request, the same from run to run whatever else the machine does (the figure the router levers of
issue 15 were judged by, as the shared machine's CPU times swing by +-25%).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time

from shadow_image.router.downstream import ClientConnection, Context
from shadow_image.router.table import RouteTable
from shadow_image.router.upstream import Pool, UpstreamConnection

REQUESTS = {
    "default": b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n",
    "header": b"GET / HTTP/1.1\r\nHost: bench\r\nVersion: abcde\r\n\r\n",
}
BODY = b"S" * 128
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 30 Nov 2026 05:30:35 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 128\r\nConnection: keep-alive\r\n\r\n" + BODY)


class FakeTransport:
    def __init__(self) -> None:
        self.writes = 0
        self.last: bytes = b""

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.last = data

    def writelines(self, data) -> None:
        self.writes += 1
        self.last = b"".join(data)

    def get_extra_info(self, name: str, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def is_closing(self) -> bool:
        return False

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None: ...

    def abort(self) -> None: ...


def setup(loop: asyncio.AbstractEventLoop) -> tuple[ClientConnection, FakeTransport, dict[str, UpstreamConnection]]:
    table = RouteTable("bench", {8080: 80}, default_host="127.0.0.2", route_host="127.0.0.3")
    table.set_routes([("version", "abcde")])
    pool = Pool(loop)
    ctx = Context(table, pool, loop)
    ups = {}
    for route, host in (("default", "127.0.0.2"), ("header", "127.0.0.3")):
        up = UpstreamConnection(pool, (host, 80))
        up.connection_made(FakeTransport())
        pool.put(up)
        ups[route] = up
    client = ClientConnection(ctx, 8080)
    ct = FakeTransport()
    client.connection_made(ct)
    return client, ct, ups


def run(route: str, n: int) -> float:
    loop = asyncio.new_event_loop()
    try:
        client, ct, ups = setup(loop)
        up = ups[route]
        req = REQUESTS[route]
        client.data_received(req)
        up.data_received(RESPONSE)  # sniffed, parser made: the steady state from here on
        assert ct.last.endswith(BODY) and up.transport.last.startswith(b"GET / HTTP/1.1\r\n"), ct.last
        cdr, udr = client.data_received, up.data_received
        t0 = time.process_time()
        for _ in range(n):
            cdr(req)
            udr(RESPONSE)
        dt = time.process_time() - t0
        assert ct.writes == n + 1 and ct.last.endswith(BODY)
        if client._timer is not None:
            client._timer.cancel()
        return dt / n * 1e6
    finally:
        loop.close()


def instructions(route: str) -> int:
    def collected(n: int) -> int:
        r = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-m",
                            "benchmarks.router_inproc", "--requests", str(n), "--runs", "1", "--route", route],
                           capture_output=True, text=True, env=dict(os.environ, PYTHONHASHSEED="0"), check=True)
        return int(re.search(r"Collected : (\d+)", r.stderr).group(1))

    return (collected(1300) - collected(300)) // 1000


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.router_inproc")
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--route", choices=[*REQUESTS, "both"], default="both")
    p.add_argument("--instructions", action="store_true", help="instructions per request, under valgrind")
    args = p.parse_args()
    if args.instructions:
        print(json.dumps({f"{route}_instructions_per_request": instructions(route) for route in REQUESTS}))
        return
    try:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    out = {}
    for route in REQUESTS if args.route == "both" else [args.route]:
        out[f"{route}_us_per_request"] = round(min(run(route, args.requests) for _ in range(args.runs)), 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
