"""Everything the integration tests' network namespace serves, in one process.

Run inside the namespace (`ip netns exec NS python ns_services.py CONFIG.json`). It stands in for a
cluster: HTTP "services" on addresses the host has no route to, a half-close echo service, a bulk
stream for back-pressure tests, and a "cluster DNS" for zone cluster.local (UDP and TCP).
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import StreamRequestHandler, ThreadingTCPServer
from urllib.parse import parse_qs, urlsplit

from dnslib import QTYPE, RCODE, RR, SOA, DNSLabel, DNSRecord
from dnslib.server import BaseResolver, DNSServer

BULK_SENT = {"bytes": 0, "active": 0}
_lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    marker = "?"

    def log_message(self, fmt: str, *args: object) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if url.path == "/":
            page = (f"<!doctype html><html><head><title>{self.marker}</title></head>"
                    f"<body><h1 id='marker'>{self.marker}</h1>"
                    f"<p>served only inside the test namespace</p></body></html>")
            self._send(200, page.encode(), "text/html; charset=utf-8")
        elif url.path == "/whoami":
            self._send(200, f"{self.marker} path={self.path} host={self.headers.get('Host')}\n".encode())
        elif url.path == "/bulk":
            self._bulk(int(query.get("mb", ["1"])[0]))
        elif url.path == "/until-close":
            # HTTP/1.1 without a length: the body ends when the connection does.
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"".join(b"line %d\n" % i for i in range(int(query.get("n", ["1000"])[0]))))
            self.wfile.write(f"{self.marker} end\n".encode())
            self.close_connection = True
        elif url.path == "/nocontent":
            self.send_response(204)
            self.end_headers()
        elif url.path == "/upgrade" and (self.headers.get("Upgrade") or "").lower() == "ktecho":
            self.send_response(101)
            self.send_header("Upgrade", "ktecho")
            self.send_header("Connection", "Upgrade")
            self.end_headers()
            self.wfile.flush()
            while data := self.connection.recv(65536):
                self.connection.sendall(data.upper())
            self.close_connection = True
        elif url.path == "/progress":
            with _lock:
                self._send(200, json.dumps(BULK_SENT).encode(), "application/json")
        else:
            self._send(404, b"no such page\n")

    do_HEAD = do_GET

    def _bulk(self, mb: int) -> None:
        total = mb * 1024 * 1024
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(total))
        self.end_headers()
        block = b"k" * 65536
        with _lock:
            BULK_SENT["bytes"] = 0
            BULK_SENT["active"] += 1
        try:
            sent = 0
            while sent < total:
                n = min(len(block), total - sent)
                self.wfile.write(block[:n])
                sent += n
                with _lock:
                    BULK_SENT["bytes"] = sent
        except OSError:
            pass
        finally:
            with _lock:
                BULK_SENT["active"] -= 1
            self.close_connection = True

    def do_POST(self) -> None:
        digest = hashlib.sha256()
        size = 0
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = 0
            while True:
                line = self.rfile.readline()
                n = int(line.split(b";")[0].strip(), 16)
                if n == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                data = self.rfile.read(n)
                self.rfile.read(2)
                digest.update(data)
                size += len(data)
                chunks += 1
            mode = f"chunked({chunks})"
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining:
                data = self.rfile.read(min(65536, remaining))
                if not data:
                    break
                digest.update(data)
                size += len(data)
                remaining -= len(data)
            mode = "length"
        self._send(200, f"{self.marker} got {size} bytes {mode} sha256={digest.hexdigest()}\n".encode())


def http_server(addr: str, port: int, marker: str) -> ThreadingHTTPServer:
    handler = type(f"Handler_{marker}", (Handler,), {"marker": marker})
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    server_class = type("Server", (ThreadingHTTPServer,), {"daemon_threads": True, "address_family": family})
    server = server_class((addr, port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class HalfCloseHandler(StreamRequestHandler):
    """Reads to EOF, then answers with what it got: only works if the client's FIN arrives."""

    def handle(self) -> None:
        data = b""
        while chunk := self.request.recv(65536):
            data += chunk
        reply = f"got {len(data)} bytes sha256={hashlib.sha256(data).hexdigest()}\n".encode()
        try:
            self.request.sendall(reply)
            self.request.shutdown(socket.SHUT_WR)
        except OSError:  # the client (or the shadow carrying it) went away first
            pass


class StallHandler(StreamRequestHandler):
    """Accepts and never reads: the sender must be held back by flow control, not buffered."""

    def handle(self) -> None:
        time.sleep(float(STALL_SECONDS))


STALL_SECONDS = 20


class Zone(BaseResolver):
    """A tiny cluster DNS: authoritative for cluster.local, REFUSED for everything else."""

    def __init__(self, records: list[list[str]], domain: str = "cluster.local") -> None:
        self.domain = DNSLabel(domain)
        self.records = [RR.fromZone(" ".join(r))[0] for r in records]

    def resolve(self, request: DNSRecord, handler: object) -> DNSRecord:
        reply = request.reply()
        q = request.q
        if not (q.qname.matchSuffix(self.domain) or q.qname.matchSuffix("in-addr.arpa")):
            reply.header.rcode = RCODE.REFUSED
            return reply
        found = [rr for rr in self.records if rr.rname == q.qname]
        reply.header.aa = 1
        for rr in found:
            if rr.rtype == q.qtype or q.qtype == QTYPE.ANY:
                reply.add_answer(rr)
        if not found:
            reply.header.rcode = RCODE.NXDOMAIN
        if not reply.rr:
            reply.add_auth(RR(self.domain, QTYPE.SOA, ttl=5,
                              rdata=SOA("ns.dns.cluster.local", "hostmaster.cluster.local",
                                        (1, 7200, 1800, 86400, 5))))
        return reply


def main() -> int:
    config = json.load(open(sys.argv[1]))
    for srv in config["http"]:
        http_server(srv["addr"], srv["port"], srv["marker"])
    ThreadingTCPServer.allow_reuse_address = True
    ThreadingTCPServer.daemon_threads = True
    for addr, port in config["halfclose"]:
        tcp = ThreadingTCPServer((addr, port), HalfCloseHandler)
        threading.Thread(target=tcp.serve_forever, daemon=True).start()
    for addr, port in config["stall"]:
        tcp = ThreadingTCPServer((addr, port), StallHandler)
        threading.Thread(target=tcp.serve_forever, daemon=True).start()
    dns_addr, dns_port = config["dns"]
    zone = Zone(config["records"])
    for tcp in (False, True):
        DNSServer(zone, address=dns_addr, port=dns_port, tcp=tcp).start_thread()
    with open(config["ready_file"], "w") as f:
        f.write("ready\n")
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
