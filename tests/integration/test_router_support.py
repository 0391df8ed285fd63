"""Support for the router's integration tests (no tests here): recording upstreams and the router process.

Upstream: an HTTP/1.1 server built on h11 (a parser independent of the router's llhttp) that records every
complete request it gets and answers by path; it also echoes WebSocket frames and raw bytes, and greets a
client that stays silent (a server-speaks-first protocol). Two of them stand in for the original pods
(127.0.0.1:P) and a developer's route (127.0.0.2:P): the router dials both on the same Service port P.

The router runs as the real program, `python -m shadow_image.router`, with --default-host / --route-host
pointing at them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import h11

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
HTTP_METHODS = {b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE", b"CONNECT"}


@dataclass
class Recorded:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    conn_id: int

    def header(self, name: str) -> str | None:
        values = [v for n, v in self.headers if n == name.lower()]
        return ", ".join(values) if values else None


@dataclass
class Upstream:
    """One recording server; `requests` and `raw` are appended to from its own thread."""

    name: str
    host: str
    port: int = 0
    requests: list[Recorded] = field(default_factory=list)
    raw: dict[int, bytearray] = field(default_factory=dict)  # every byte each connection received
    connections: int = 0
    bad: list[str] = field(default_factory=list)  # what h11 refused (never expected from the router)
    drop_next: set[int] = field(default_factory=set)

    def reset(self) -> None:
        self.requests.clear()
        self.raw.clear()
        self.bad.clear()

    async def serve(self) -> asyncio.Server:
        server = await asyncio.start_server(self._conn, self.host, self.port)
        self.port = server.sockets[0].getsockname()[1]
        return server

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        cid = self.connections
        raw = _Tap(self.raw, cid)
        try:
            try:
                first = await asyncio.wait_for(reader.read(65536), 0.3)
            except TimeoutError:
                writer.write(f"{self.name} greeting\r\n".encode())
                first = await reader.read(65536)
            raw += first
            if first and first.split(b" ", 1)[0] not in HTTP_METHODS:
                await self._echo_raw(first, reader, writer, raw)
                return
            await self._http(cid, first, reader, writer, raw)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception as exc:  # a fault of this stand-in must fail the test, not pass as a closed connection
            self.bad.append(f"upstream stand-in crashed: {exc!r}")
        finally:
            writer.close()

    async def _echo_raw(self, first: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        raw: _Tap) -> None:
        data = first
        while data:
            writer.write(f"{self.name} raw:".encode() + data)
            await writer.drain()
            data = await reader.read(65536)
            raw += data
        writer.write_eof()  # half-close answered by half-close
        await writer.drain()

    async def _http(self, cid: int, first: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    raw: _Tap) -> None:
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(first)
        eof = stalled = False
        req: h11.Request | None = None
        body = bytearray()
        body_len = 0
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                if not eof:  # a request cut short by a closing peer is incomplete, not malformed
                    self.bad.append(str(exc))
                return
            if event is h11.NEED_DATA:
                if req is not None and req.target == b"/slow-reader" and not stalled:
                    stalled = True
                    await asyncio.sleep(1.5)  # lets the sender's buffers fill before reading the body
                data = await reader.read(65536)
                raw += data
                eof = not data
                conn.receive_data(data)
                if not data and conn.their_state is h11.IDLE:
                    return
                continue
            if event is h11.PAUSED:
                if conn.our_state is h11.SWITCHED_PROTOCOL:
                    await self._ws(conn.trailing_data[0], reader, writer)
                    return
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
                continue
            if isinstance(event, h11.ConnectionClosed):
                return
            if isinstance(event, h11.Request):
                req, body, body_len = event, bytearray(), 0
                hdrs = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers]
                path = event.target.decode("latin-1")
                if path.startswith("/expect") and conn.client_is_waiting_for_100_continue:
                    if path == "/expect-refuse":
                        writer.write(conn.send(h11.Response(status_code=417, headers=[
                            ("content-length", "0"), ("connection", "close")])))
                        writer.write(conn.send(h11.EndOfMessage()))
                        await writer.drain()
                        self.requests.append(Recorded(event.method.decode("latin-1"), path, hdrs, b"", cid))
                        return
                    await asyncio.sleep(0.2)  # the router must not have sent its own 100 meanwhile
                    writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
                if dict(hdrs).get("upgrade", "").lower() == "websocket":
                    key = dict(hdrs)["sec-websocket-key"].encode()
                    accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
                    self.requests.append(Recorded(event.method.decode("latin-1"), path, hdrs, b"", cid))
                    writer.write(conn.send(h11.InformationalResponse(status_code=101, headers=[
                        ("upgrade", "websocket"), ("connection", "Upgrade"), ("sec-websocket-accept", accept)])))
                    await writer.drain()
                continue
            if isinstance(event, h11.Data):
                if req is not None and req.target == b"/slow-reader":
                    body_len += len(event.data)  # counted, not kept: it is large
                else:
                    body += event.data
                continue
            if isinstance(event, h11.EndOfMessage):
                assert req is not None
                if conn.our_state is h11.SWITCHED_PROTOCOL:
                    continue  # recorded with its 101
                rec = Recorded(req.method.decode("latin-1"), req.target.decode("latin-1"),
                               [(n.decode("latin-1"), v.decode("latin-1")) for n, v in req.headers]
                               + [("trailer:" + n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers],
                               bytes(body) or b"%d bytes" % body_len if body_len else bytes(body), cid)
                self.requests.append(rec)
                if not await self._respond(conn, rec, writer):
                    return

    async def _respond(self, conn: h11.Connection, rec: Recorded, writer: asyncio.StreamWriter) -> bool:
        """Answer by path; False when the connection must end here."""
        path = rec.target.split("?", 1)[0]
        text = f"{self.name} {rec.method} {rec.target}\n".encode()
        if rec.conn_id in self.drop_next:  # the keep-alive race: the request after /then-drop is never answered
            self.drop_next.discard(rec.conn_id)
            writer.transport.abort()
            return False
        if path == "/then-drop":
            self.drop_next.add(rec.conn_id)
        if path == "/die":
            writer.transport.abort()
            return False
        if path == "/cut":  # a response that stops half-way
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + text)
            await writer.drain()
            writer.transport.abort()
            return False
        if path in ("/huge-head", "/huge-trailer"):  # a field that never ends (the router must cap it)
            start = (b"HTTP/1.1 200 OK\r\nX-Big: " if path == "/huge-head" else
                     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-Big: ")
            writer.write(start)
            for _ in range(64):  # 4 MiB, then silence: without a cap the router would wait on
                writer.write(b"b" * 65536)
                await writer.drain()
            await asyncio.sleep(30)
            return False
        if path == "/head-extra":  # a HEAD answer with stray bytes after its head, in the same segment
            writer.write(conn.send(h11.Response(status_code=200, headers=[("content-length", "5")])) + b"stray")
            conn.send(h11.EndOfMessage())
            await writer.drain()
            return True
        if path == "/close-delimited":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + text + b"more\n")
            await writer.drain()
            return False
        if path.startswith("/sleep"):
            await asyncio.sleep(float(rec.target.split("?", 1)[1]))
        if path == "/chunked":
            writer.write(conn.send(h11.Response(status_code=200, headers=[("trailer", "x-sum")])))
            for i in range(3):
                writer.write(conn.send(h11.Data(data=b"part%d " % i + text)))
                await writer.drain()
            writer.write(conn.send(h11.EndOfMessage(headers=[("x-sum", "3")])))
        elif path == "/big":
            size = int(rec.target.split("?", 1)[1])
            writer.write(conn.send(h11.Response(status_code=200, headers=[("content-length", str(size))])))
            block = b"x" * 65536
            left = size
            while left:
                n = min(left, len(block))
                writer.write(conn.send(h11.Data(data=block[:n])))
                left -= n
                await writer.drain()
            writer.write(conn.send(h11.EndOfMessage()))
        elif path in ("/204", "/304"):
            writer.write(conn.send(h11.Response(status_code=int(path[1:]), headers=[("x-upstream", self.name)])))
            writer.write(conn.send(h11.EndOfMessage()))
        else:
            payload = text
            if path == "/echo":
                payload = rec.body
            elif path == "/headers":
                payload = "".join(f"{n}: {v}\n" for n, v in rec.headers).encode()
            headers = [("content-type", "text/plain"), ("content-length", str(len(payload))),
                       ("x-upstream", self.name)]
            writer.write(conn.send(h11.Response(status_code=200, headers=headers)))
            if rec.method != "HEAD":
                writer.write(conn.send(h11.Data(data=payload)))
            writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()
        return True

    async def _ws(self, first: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A WebSocket echo (text and binary frames come back prefixed with the upstream's name)."""
        buf = bytearray(first)
        while True:
            while True:
                frame = _ws_parse(buf)
                if frame is not None:
                    break
                data = await reader.read(65536)
                if not data:
                    return
                buf += data
            opcode, payload, used = frame
            del buf[:used]
            if opcode == 8:
                writer.write(bytes([0x88, 2]) + (payload[:2] or b"\x03\xe8"))
                await writer.drain()
                return
            if opcode in (1, 2):
                out = (self.name + ": ").encode() + payload
                writer.write(bytes([0x80 | opcode]) + _ws_len(len(out)) + out)
                await writer.drain()


class _Tap:
    """Appends to raw[cid], found anew each time (a test may have reset the dict meanwhile)."""

    def __init__(self, raw: dict[int, bytearray], cid: int) -> None:
        self.raw = raw
        self.cid = cid
        self.first = True

    def __iadd__(self, data: bytes) -> _Tap:
        # The first read always counts (a connection was made, bytes or not); a later empty read (EOF) adds
        # nothing, so a previous test's connection closing late cannot leave an empty entry after a reset.
        if data or self.first:
            self.raw.setdefault(self.cid, bytearray()).extend(data)
        self.first = False
        return self


def _ws_len(n: int) -> bytes:
    if n < 126:
        return bytes([n])
    if n < 65536:
        return bytes([126]) + n.to_bytes(2, "big")
    return bytes([127]) + n.to_bytes(8, "big")


def _ws_parse(buf: bytearray) -> tuple[int, bytes, int] | None:
    if len(buf) < 2:
        return None
    opcode = buf[0] & 0x0F
    masked = buf[1] & 0x80
    n = buf[1] & 0x7F
    pos = 2
    if n == 126:
        if len(buf) < 4:
            return None
        n = int.from_bytes(buf[2:4], "big")
        pos = 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n = int.from_bytes(buf[2:10], "big")
        pos = 10
    mask = b""
    if masked:
        if len(buf) < pos + 4:
            return None
        mask = bytes(buf[pos:pos + 4])
        pos += 4
    if len(buf) < pos + n:
        return None
    payload = bytes(buf[pos:pos + n])
    if masked:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return opcode, payload, pos + n


class Upstreams:
    """The stand-ins on one port P: `default` on 127.0.0.1:P, `route` on 127.0.0.2:P, served by one thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._servers: list[asyncio.Server] = []
        self.default = Upstream("default", "127.0.0.1")
        self.route = Upstream("route", "127.0.0.2")

    def start(self) -> Upstreams:
        self._thread.start()
        for _ in range(20):  # the same free port on both addresses
            self.default.port = 0
            try:
                self._run(self._start())
                return self
            except OSError:
                self._run(self._stop_servers())
        raise RuntimeError("no port free on both 127.0.0.1 and 127.0.0.2")

    async def _start(self) -> None:
        self._servers.append(await self.default.serve())
        self.route.port = self.default.port
        self._servers.append(await self.route.serve())

    async def _stop_servers(self) -> None:
        for srv in self._servers:
            srv.close()
        self._servers.clear()

    @property
    def port(self) -> int:
        return self.default.port

    def _run(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)  # type: ignore[arg-type]

    def reset(self) -> None:
        self.default.reset()
        self.route.reset()

    async def _shutdown(self) -> None:
        await self._stop_servers()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:  # connection handlers still waiting on their clients
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        self._run(self._shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


def free_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind(("::", 0))
        return s.getsockname()[1]


def annotations_text(routes: str) -> str:
    """The kubelet's rendering of the pod's annotations (Go-quoted values)."""
    return f'kt-config="service=tomcat"\nkt-mesh-routes="{routes}"\nkt-ref-count="1"\n'


def write_annotations(path: Path, routes: str) -> None:
    """Swap the file in atomically, as the kubelet's ..data symlink swap does."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(annotations_text(routes))
    os.replace(tmp, path)


class RouterProcess:
    """`python -m shadow_image.router` on loopback in front of Upstreams."""

    def __init__(self, ups: Upstreams, workdir: Path, routes: str = "version:abcde", *,
                 route_host: str = "127.0.0.2") -> None:
        self.ups = ups
        self.workdir = workdir
        self.annotations = workdir / "annotations"
        self.log = workdir / "router.log"
        self.port = free_port()
        self.health_port = free_port()
        write_annotations(self.annotations, routes)
        self.args = [PY, "-m", "shadow_image.router", "--service", "tomcat",
                     "--port", f"{self.port}:{ups.port}", "--health-port", str(self.health_port),
                     "--annotations", str(self.annotations), "--default-host", "127.0.0.1",
                     "--route-host", route_host]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RouterProcess:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"router exited: {self.log.read_text()}")
            with contextlib.suppress(OSError):
                status, _ = http_get("127.0.0.1", self.health_port, "/ready")
                if status == 200:
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"router not ready: {self.log.read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def set_routes(self, routes: str) -> None:
        write_annotations(self.annotations, routes)

    def routes(self) -> list[list[str]]:
        import json

        status, body = http_get("127.0.0.1", self.health_port, "/routes")
        assert status == 200
        return json.loads(body)["routes"]

    def wait_routes(self, expected: list[list[str]], timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while self.routes() != expected:
            if time.monotonic() > deadline:
                raise AssertionError(f"routes stayed {self.routes()}, expected {expected}")
            time.sleep(0.05)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)


def http_get(host: str, port: int, path: str) -> tuple[int, bytes]:
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = recv_all(s)
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def recv_all(s: socket.socket) -> bytes:
    out = bytearray()
    while True:
        data = s.recv(65536)
        if not data:
            return bytes(out)
        out += data


class Responses:
    """Reads HTTP/1.1 responses off a raw socket (h11 as the client's parser)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.conn = h11.Connection(h11.CLIENT)

    def send(self, data: bytes) -> None:
        """Raw bytes (the test controls framing); h11 is told the request separately via expect()."""
        self.sock.sendall(data)

    def read(self, method: str = "GET", *, expect_interim: bool = False) -> tuple[int, dict[str, str], bytes]:
        """The next final response (interim ones skipped unless expect_interim: then the first one)."""
        self.conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
        self.conn.send(h11.EndOfMessage())
        status, headers, body = 0, {}, bytearray()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(self.sock.recv(65536))
                continue
            if isinstance(event, h11.InformationalResponse):
                if expect_interim:
                    return event.status_code, {n.decode(): v.decode() for n, v in event.headers}, b""
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = {n.decode(): v.decode() for n, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                for n, v in event.headers:
                    headers["trailer:" + n.decode()] = v.decode()
                if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                    self.conn.start_next_cycle()
                return status, headers, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("closed before a response")
