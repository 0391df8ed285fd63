"""The DNS load client (UDP, closed loop), run in its own process like benchmarks.load.

    python -m benchmarks.dnsload --server 127.0.0.1:10053 --names mix --hot A,B --clients 50 --duration 2

Each client has its own UDP socket and one query in flight; a query unanswered after --timeout counts as
an error and the client goes on. Names (A queries, fully qualified, always under the cluster domain):
- cached: round-robin over the --hot names (existing services: answered from a cache after the first);
- uncached: a fresh pod name `10-x-y-z.NS.pod.<domain>` per query (CoreDNS `pods insecure` answers any
  such name, so each is a positive answer that no cache has seen); the start is random per run;
- mix: the two alternated.
Prints one JSON line: qps, p50_us, p99_us, queries, errors (timeouts), bad (answers other than NOERROR
with at least one record).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import struct
import time

from benchmarks.load import Stats


def query(qid: int, name: str) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split("."))
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!HH", 1, 1)


class Names:
    def __init__(self, kind: str, hot: list[str], namespace: str, domain: str) -> None:
        self.kind, self.hot, self.namespace, self.domain = kind, hot, namespace, domain
        self.i = 0
        self.n = random.randrange(1 << 24)

    def next(self) -> str:
        self.i += 1
        if self.kind == "cached" or (self.kind == "mix" and self.i % 2):
            return self.hot[self.i % len(self.hot)]
        self.n = (self.n + 1) % (1 << 24)
        return f"10-{self.n >> 16}-{(self.n >> 8) & 255}-{self.n & 255}.{self.namespace}.pod.{self.domain}"


class Client(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.waiting: dict[int, asyncio.Future] = {}

    def datagram_received(self, data: bytes, addr: object) -> None:
        if len(data) < 12:
            return
        qid, flags, _qd, ancount = struct.unpack("!HHHH", data[:8])
        fut = self.waiting.pop(qid, None)
        if fut is not None and not fut.done():
            fut.set_result((flags & 0xF, ancount))


async def run(server: tuple[str, int], names: Names, clients: int, duration: float, warmup: float,
              query_timeout: float) -> dict:
    loop = asyncio.get_running_loop()
    now = time.perf_counter()
    stats = Stats(now + warmup, now + warmup + duration)
    errors = bad = 0

    async def worker() -> None:
        nonlocal errors, bad
        transport, proto = await loop.create_datagram_endpoint(Client, remote_addr=server)
        qid = random.randrange(65536)
        try:
            while not stats.stopping and time.perf_counter() < stats.stop_at:
                qid = (qid + 1) & 0xFFFF
                fut = loop.create_future()
                proto.waiting[qid] = fut
                start = time.perf_counter()
                transport.sendto(query(qid, names.next()))
                try:
                    rcode, ancount = await asyncio.wait_for(fut, query_timeout)
                except TimeoutError:
                    proto.waiting.pop(qid, None)
                    errors += 1
                    continue
                end = time.perf_counter()
                if rcode != 0 or ancount == 0:
                    bad += 1
                stats.add(end - start, end)
        finally:
            transport.close()

    await asyncio.gather(*(worker() for _ in range(clients)))
    result = stats.result(duration)
    result["qps"] = result.pop("rps")
    result.update(errors=errors, bad=bad)
    return result


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dnsload")
    p.add_argument("--server", required=True, help="HOST:PORT (UDP)")
    p.add_argument("--names", choices=["cached", "uncached", "mix"], required=True)
    p.add_argument("--hot", required=True, help="comma-separated existing cluster names (FQDN)")
    p.add_argument("--namespace", default="default", help="namespace of the uncached pod names")
    p.add_argument("--domain", default="cluster.local")
    p.add_argument("--clients", type=int, default=1)
    p.add_argument("--duration", type=float, default=2.0)
    p.add_argument("--warmup", type=float, default=0.3)
    p.add_argument("--timeout", type=float, default=1.0)
    args = p.parse_args()
    host, _, port = args.server.rpartition(":")
    hot = [h.strip() for h in args.hot.split(",") if h.strip()]
    for name in [*hot, f"x.{args.namespace}.pod.{args.domain}"]:
        if not name.rstrip(".").endswith("." + args.domain):
            raise SystemExit(f"benchmarks.dnsload asks only for cluster names (*.{args.domain}), not {name}")
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    names = Names(args.names, hot, args.namespace, args.domain)
    print(json.dumps(asyncio.run(run((host, int(port)), names, args.clients, args.duration, args.warmup,
                                     args.timeout))))


if __name__ == "__main__":
    main()
