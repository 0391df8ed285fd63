"""Clients for the mesh e2e tests, run inside a client pod (the shadow image's python, which has h2).
Each command prints one JSON document (or one per request for `session`) on stdout.

  get URL [-H 'K: V']...     one request, a new connection: {"status", "body", "upstream"} (--repeat N:
                             N requests, N connections, a list)
  session HOST PORT          ONE TCP connection kept alive; each stdin line is a JSON list of [name, value]
                             headers for a GET /; answers one JSON line each, with the connection's local
                             port ("conn") so the caller sees it never changed; a closed connection ends it
  pipeline HOST PORT REQS    every request of REQS (JSON list of {"method", "headers", "body", "chunked"})
                             written at once on one connection, the answers read in order: a list
  ws HOST PORT [-H ..] MSG.. a WebSocket handshake, then each message echoed: {"status", "upstream", "echoes"}
  h2 HOST PORT STREAMS       HTTP/2 prior knowledge, one connection, all streams opened at once; STREAMS is a
                             JSON list of header lists: [{"status", "body", "upstream"}, ...] in that order
  raw HOST PORT N ROUNDS     binary messages of N random bytes (HTTP look-alikes inside) on one connection:
                             {"answers": [{"name", "ok"}, ...]}

Standard library plus h2 (only for `h2`).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import struct
import sys
import urllib.parse

RAW_MAGIC = b"\x00KTRAW"
TIMEOUT = 20.0


def _headers(pairs: list[str]) -> list[tuple[str, str]]:
    out = []
    for p in pairs:
        k, _, v = p.partition(":")
        out.append((k.strip(), v.strip()))
    return out


class Conn:
    """A plain socket with a read buffer: responses parsed by hand, so nothing reconnects behind our back."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=TIMEOUT)
        self.buf = b""

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed by the peer")
        self.buf += data

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def response(self, method: str = "GET") -> dict:
        status_line = self.line().decode("latin-1")
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while True:
            h = self.line()
            if not h:
                break
            k, _, v = h.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        body = b""
        if method != "HEAD" and status not in (101, 204, 304):
            if headers.get("transfer-encoding", "").lower() == "chunked":
                while True:
                    size = int(self.line().split(b";")[0], 16)
                    body += self.exactly(size)
                    self.exactly(2)
                    if size == 0:
                        break
            elif "content-length" in headers:
                body = self.exactly(int(headers["content-length"]))
            else:  # delimited by the close
                while True:
                    try:
                        self._fill()
                    except ConnectionError:
                        break
                body, self.buf = self.buf, b""
        return {"status": status, "body": body.decode("utf-8", "replace").strip(), "headers": headers,
                "upstream": headers.get("x-upstream", ""), "seen_host": headers.get("x-seen-host", ""),
                "seen_xff": headers.get("x-seen-xff", "")}


def request(host: str, port: int, headers: list[tuple[str, str]], method: str = "GET", close: bool = False) -> bytes:
    lines = [f"{method} / HTTP/1.1", f"Host: {host}:{port}", *(f"{k}: {v}" for k, v in headers)]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _get_once(url: str, headers: list[tuple[str, str]]) -> dict:
    u = urllib.parse.urlsplit(url)
    port = u.port or 80
    try:
        c = Conn(u.hostname, port)
        c.sock.sendall(request(u.hostname, port, headers, close=True))
        r = c.response()
        c.sock.close()
    except OSError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    r.pop("headers")
    return r


def cmd_get(a: argparse.Namespace) -> dict | list[dict]:
    if a.repeat:  # each on a new connection: what kube-proxy balances is connections
        return [_get_once(a.url, _headers(a.header)) for _ in range(a.repeat)]
    return _get_once(a.url, _headers(a.header))


def cmd_session(a: argparse.Namespace) -> None:
    c = Conn(a.host, a.port)
    conn = c.sock.getsockname()[1]
    for line in sys.stdin:
        if not line.strip():
            continue
        headers = [tuple(h) for h in json.loads(line)]
        try:
            c.sock.sendall(request(a.host, a.port, headers))
            r = c.response()
        except OSError as exc:
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}", "conn": conn}), flush=True)
            sys.exit(1)
        r.pop("headers")
        r["conn"] = conn
        print(json.dumps(r), flush=True)


def cmd_pipeline(a: argparse.Namespace) -> list[dict]:
    """All requests written at once on one connection, then the answers read in order."""
    c = Conn(a.host, a.port)
    reqs = json.loads(a.requests)
    out = b""
    for r in reqs:
        headers = [tuple(h) for h in r.get("headers", [])]
        body = r.get("body")
        if body is not None and r.get("chunked"):
            half = len(body) // 2
            chunks = [body[:half], body[half:]]
            payload = "".join(f"{len(x.encode()):x}\r\n{x}\r\n" for x in chunks if x) + "0\r\n\r\n"
            headers.append(("Transfer-Encoding", "chunked"))
        elif body is not None:
            payload = body
            headers.append(("Content-Length", str(len(body.encode()))))
        else:
            payload = ""
        out += request(a.host, a.port, headers, r.get("method", "GET")) + payload.encode()
    c.sock.sendall(out)
    answers = []
    for r in reqs:
        resp = c.response(r.get("method", "GET"))
        resp.pop("headers")
        answers.append(resp)
    return answers


def cmd_ws(a: argparse.Namespace) -> dict:
    from mesh_upstreams import frame  # the same framing the upstream uses

    c = Conn(a.host, a.port)
    key = base64.b64encode(os.urandom(16)).decode()
    hdrs = [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Key", key),
            ("Sec-WebSocket-Version", "13"), *_headers(a.header)]
    c.sock.sendall(request(a.host, a.port, hdrs))
    r = c.response()
    out = {"status": r["status"], "upstream": r["upstream"], "echoes": []}
    if r["status"] != 101:
        out["body"] = r["body"]
        return out
    for msg in a.messages:
        c.sock.sendall(frame(1, msg.encode(), mask=os.urandom(4)))
        opcode, payload = _read_frame(c)
        out["echoes"].append(payload.decode("utf-8", "replace"))
    c.sock.sendall(frame(8, struct.pack(">H", 1000), mask=os.urandom(4)))
    opcode, _ = _read_frame(c)
    out["closed"] = opcode == 8
    return out


def _read_frame(c: Conn) -> tuple[int, bytes]:
    b0, b1 = c.exactly(2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack(">H", c.exactly(2))
    elif n == 127:
        (n,) = struct.unpack(">Q", c.exactly(8))
    return b0 & 0x0F, c.exactly(n)


def cmd_h2(a: argparse.Namespace) -> list[dict]:
    import h2.config
    import h2.connection
    import h2.events

    streams = json.loads(a.streams)
    sock = socket.create_connection((a.host, a.port), timeout=TIMEOUT)
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    ids = []
    for extra in streams:
        sid = conn.get_next_available_stream_id()
        ids.append(sid)
        conn.send_headers(sid, [(":method", "GET"), (":path", "/"), (":scheme", "http"),
                                (":authority", f"{a.host}:{a.port}"), *[(k.lower(), v) for k, v in extra]],
                          end_stream=True)
    sock.sendall(conn.data_to_send())
    results: dict[int, dict] = {sid: {"status": None, "body": "", "upstream": ""} for sid in ids}
    pending = set(ids)
    while pending:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"connection closed with streams {sorted(pending)} unanswered")
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                h = dict(event.headers)
                results[event.stream_id].update(status=int(h[":status"]), upstream=h.get("x-upstream", ""),
                                                seen_host=h.get("x-seen-host", ""))
            elif isinstance(event, h2.events.DataReceived):
                results[event.stream_id]["body"] += event.data.decode("utf-8", "replace")
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                pending.discard(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                results[event.stream_id]["reset"] = int(event.error_code)
                pending.discard(event.stream_id)
            elif isinstance(event, h2.events.ConnectionTerminated):
                raise ConnectionError(f"GOAWAY {event.error_code!r} with streams {sorted(pending)} unanswered")
        sock.sendall(conn.data_to_send())
    conn.close_connection()
    sock.sendall(conn.data_to_send())
    sock.close()
    for r in results.values():
        r["body"] = r["body"].strip()
    return [results[sid] for sid in ids]


def cmd_raw(a: argparse.Namespace) -> dict:
    c = Conn(a.host, a.port)
    answers = []
    for i in range(a.rounds):
        # Random bytes with HTTP look-alikes inside: a router that parsed any of it would mangle it.
        payload = (os.urandom(a.size // 2) + b"GET / HTTP/1.1\r\nHost: x\r\nVERSION: x\r\n\r\n"
                   + b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(a.size // 2) + bytes([i % 256]))
        c.sock.sendall(RAW_MAGIC + struct.pack(">I", len(payload)) + payload)
        name = b""
        while True:
            ch = c.exactly(1)
            if ch == b"\x00":
                break
            name += ch
        (n,) = struct.unpack(">I", c.exactly(4))
        echoed = c.exactly(n)
        answers.append({"name": name.decode("utf-8", "replace"), "ok": echoed == payload, "bytes": len(payload)})
    return {"answers": answers}


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("get")
    g.add_argument("url")
    g.add_argument("-H", "--header", action="append", default=[])
    g.add_argument("--repeat", type=int, default=0)
    s = sub.add_parser("session")
    s.add_argument("host")
    s.add_argument("port", type=int)
    pl = sub.add_parser("pipeline")
    pl.add_argument("host")
    pl.add_argument("port", type=int)
    pl.add_argument("requests")
    w = sub.add_parser("ws")
    w.add_argument("host")
    w.add_argument("port", type=int)
    w.add_argument("-H", "--header", action="append", default=[])
    w.add_argument("messages", nargs="+")
    h = sub.add_parser("h2")
    h.add_argument("host")
    h.add_argument("port", type=int)
    h.add_argument("streams")
    r = sub.add_parser("raw")
    r.add_argument("host")
    r.add_argument("port", type=int)
    r.add_argument("size", type=int)
    r.add_argument("rounds", type=int)
    a = p.parse_args()
    if a.cmd == "session":
        cmd_session(a)
        return
    try:
        out = {"get": cmd_get, "pipeline": cmd_pipeline, "ws": cmd_ws, "h2": cmd_h2, "raw": cmd_raw}[a.cmd](a)
    except Exception as exc:  # one line the test can show, not a traceback
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        sys.exit(1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
