"""Which HTTP/1 parser the mesh router uses, decided by measurement: httptools (llhttp, C) vs h11 (pure
Python), parsing the requests a router sees, collecting what the router needs (method, target, headers,
body), one request after another on a kept-alive connection.

    python -m benchmarks.router_parser [--seconds S] [--out benchmarks/results/router-parser.md]

Each parser is fed the same bytes; the work per request is what the router's callbacks do (append the
headers to a list, the body pieces to another). h11 runs as a server and must answer a request before it
parses the next on the same connection, so its loop sends a minimal response (as a router would) and
starts the next cycle; the "fresh connection" row instead builds a new h11.Connection per request (no
response), the least h11 can do per request. Prints a Markdown table and writes it to --out.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import h11
import httptools

BROWSER_GET = (
    b"GET /api/v1/orders?page=2&size=50 HTTP/1.1\r\n"
    b"Host: tomcat.default.svc.cluster.local:8080\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8\r\n"
    b"Accept-Language: en-US,en;q=0.9,de;q=0.8\r\n"
    b"Accept-Encoding: gzip, deflate\r\n"
    b"Cookie: JSESSIONID=5F2A9C1B7E3D4A6F8B0C2D4E6F8A0B1C; theme=dark; tracking=abc123def456\r\n"
    b"Referer: http://tomcat:8080/orders\r\n"
    b"VERSION: abcde\r\n"
    b"Connection: keep-alive\r\n"
    b"\r\n"
)
CURL_GET = b"GET / HTTP/1.1\r\nHost: tomcat:8080\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n"
JSON_POST = (b"POST /api/v1/orders HTTP/1.1\r\nHost: tomcat:8080\r\nContent-Type: application/json\r\n"
             b"Content-Length: 1024\r\nVERSION: abcde\r\n\r\n" + b"x" * 1024)
CHUNKED_POST = (b"POST /upload HTTP/1.1\r\nHost: tomcat:8080\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"400\r\n" + b"y" * 1024 + b"\r\n" + b"400\r\n" + b"z" * 1024 + b"\r\n0\r\n\r\n")

CASES = {
    "browser GET (10 headers)": BROWSER_GET,
    "curl GET (3 headers)": CURL_GET,
    "POST 1 KiB, Content-Length": JSON_POST,
    "POST 2 KiB, chunked": CHUNKED_POST,
}


class _Collect:
    """What the router's callbacks keep per request."""

    def __init__(self) -> None:
        self.done = 0
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, data: bytes) -> None:
        self.body.append(data)

    def on_message_complete(self) -> None:
        self.done += 1


def run_httptools(data: bytes, n: int) -> int:
    sink = _Collect()
    parser = httptools.HttpRequestParser(sink)
    for _ in range(n):
        parser.feed_data(data)
    return sink.done


_RESPONSE = h11.Response(status_code=200, headers=[("content-length", "0")])


def run_h11_keepalive(data: bytes, n: int) -> int:
    conn = h11.Connection(h11.SERVER)
    done = 0
    for _ in range(n):
        conn.receive_data(data)
        kept: list[object] = []  # what the router would keep: the headers and the body pieces
        body: list[bytes] = []
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Request):
                kept.append(list(event.headers))
            elif isinstance(event, h11.Data):
                body.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
        conn.send(_RESPONSE)
        conn.send(h11.EndOfMessage())
        conn.start_next_cycle()
        done += 1
    return done


def run_h11_fresh(data: bytes, n: int) -> int:
    done = 0
    for _ in range(n):
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(data)
        while True:
            event = conn.next_event()
            if isinstance(event, h11.EndOfMessage):
                break
        done += 1
    return done


PARSERS: dict[str, Callable[[bytes, int], int]] = {
    "httptools 0.9 (llhttp)": run_httptools,
    "h11 0.16, keep-alive (answers each)": run_h11_keepalive,
    "h11 0.16, fresh connection per request": run_h11_fresh,
}


def measure(fn: Callable[[bytes, int], int], data: bytes, seconds: float) -> float:
    """Requests per second, best of three runs of about `seconds` / 3 each."""
    n = 1000
    while True:  # size a batch to ~50 ms
        t = time.perf_counter()
        assert fn(data, n) == n
        if time.perf_counter() - t > 0.05:
            break
        n *= 2
    best = 0.0
    for _ in range(3):
        deadline = time.perf_counter() + seconds / 3
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() < deadline:
            count += fn(data, n)
        best = max(best, count / (time.perf_counter() - t0))
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.router_parser", description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=3.0, help="per parser and case")
    p.add_argument("--out", type=Path, help="also write the Markdown table here")
    args = p.parse_args(argv)
    rows = []
    for case, data in CASES.items():
        rates = {name: measure(fn, data, args.seconds) for name, fn in PARSERS.items()}
        rows.append((case, len(data), rates))
        print(f"{case}: " + ", ".join(f"{k} {v:,.0f}/s" for k, v in rates.items()), file=sys.stderr)
    names = list(PARSERS)
    lines = [
        "# Router HTTP/1 parser: httptools vs h11",
        "",
        f"- Command: `python -m benchmarks.router_parser --seconds {args.seconds:g}`; requests parsed per second "
        "on one core, best of three runs; higher is better.",
        f"- Machine: {platform.machine()}, Python {platform.python_version()}, {platform.platform()}; "
        "a shared machine, so compare within a row.",
        "",
        "| request | bytes | " + " | ".join(names) + " | httptools / best h11 |",
        "|---|---|" + "---|" * len(names) + "---|",
    ]
    for case, size, rates in rows:
        best_h11 = max(v for k, v in rates.items() if k.startswith("h11"))
        lines.append(f"| {case} | {size} | " + " | ".join(f"{rates[n]:,.0f}" for n in names)
                     + f" | {rates[names[0]] / best_h11:.1f}x |")
    ratios = [rates[names[0]] / max(v for k, v in rates.items() if k.startswith("h11")) for _, _, rates in rows]
    slowest_h11 = min(rates[names[1]] for _, _, rates in rows)
    lines += [
        "",
        f"Result: httptools parses {min(ratios):.0f}-{max(ratios):.0f}x as many requests per second as h11, so the "
        "router (shadow_image/router) parses HTTP/1 with httptools. h11 at its slowest here "
        f"({slowest_h11:,.0f} requests/s) would spend about {10_000 / slowest_h11:.0%} of a core on parsing alone "
        "at 10,000 requests/s, about what the whole router serves on one core.",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
