"""Does pproxy 2.7.9 pass our own front-end correctness checks? The same checks run against ktproxy.

    .venv/bin/python -m benchmarks.pproxy_check [--out benchmarks/results/pproxy_check.md] [--quick]

DESIGN.md allows pproxy as the local proxy front end only if it passes our checks: half-close,
back-pressure, keep-alive HTTP proxying and SOCKS5 remote DNS. This script is the evidence. Subjects,
each its own process (so its RSS can be read from /proc/PID/status):

  pproxy lib, ssh://       pproxy.Server + pproxy.Connection("ssh://...") under uvloop, as ktproxy
                           would embed it; pproxy dials its own asyncssh connection to the shadow server.
  pproxy lib, injected     the same, but fed ONE asyncssh connection made beforehand the way ktproxy makes
                           it (pinned host key, our cipher/window): there is no API for that, so this
                           assigns pproxy's private `ProxySSH.sshconn` future.
  pproxy lib, direct       pproxy.Server with no remote (connects from the proxy process itself).
  pproxy CLI, ssh:// / direct
                           `pproxy -l ... -r ...`. The CLI does not start beside uvloop (recorded), so these
                           run its `main()` with `import uvloop` made to fail.
  ktproxy                  `python -m devtools.dataplane_main` through `benchmarks.launch dataplane`, which
                           forces loopback targets through the tunnel (ktproxy never tunnels loopback on
                           its own) and refuses direct dials, plus `--route all` so the name `localhost`
                           (check 4) is tunnelled too.

The ssh subjects talk to `python -m shadow_image -d` (our shadow server) on 127.0.0.1, started through
this module's `_shadow` wrapper, which adds one remote-only "hosts" entry: on the shadow side
`localhost` means 127.0.0.3. The client side resolves `localhost` from /etc/hosts (127.0.0.1, no DNS
query leaves the machine), so a reply from the 127.0.0.3 listener proves the name was resolved on the
remote side, and the shadow's debug log shows the exact dest_host of the direct-tcpip request.

Everything listens on and connects to 127.0.0.0/8 only; every process is ours and stopped by its pid.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import inspect
import json
import os
import platform
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.procs import PY, REPO, Procs, free_port, make_keys, port_open, rss_kb, wait_for
from benchmarks.socksclient import ProxyError, socks5

MB = 1024 * 1024
HALF_CLOSE_PAYLOAD = b"half-close payload: the target replies only after it has read EOF"
BP_BYTES = 300 * MB
BP_LIMIT_MB = 64
THROUGHPUT_BYTES = 256 * MB
REMOTE_NAME = "localhost"  # client side: 127.0.0.1 (/etc/hosts); shadow side: 127.0.0.3 (the _shadow wrapper)
REMOTE_ONLY_IP = "127.0.0.3"
OUT = REPO / "benchmarks" / "results" / "pproxy_check.md"


# =================================================================================================
# Internal subcommand: the target (one process, several tiny servers on 127.0.0.x)
# =================================================================================================

async def _target_main(port_file: str) -> None:
    pushed = {"last": 0}

    async def half_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Read to EOF first: only a proxy that forwards the client's FIN lets us get past this line.
        data = await reader.read()
        writer.write(b"target read %d bytes then EOF" % len(data))
        await writer.drain()
        writer.close()

    async def push(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
        block = b"\0" * MB
        pushed["last"] = 0
        try:
            while pushed["last"] < n:
                chunk = block[: n - pushed["last"]]
                writer.write(chunk)
                await writer.drain()  # "as fast as it can": as fast as the next hop accepts
                pushed["last"] += len(chunk)
            writer.write_eof()
            await reader.read()
        except (ConnectionError, OSError):
            pass
        writer.close()

    async def status(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(json.dumps({"pushed": pushed["last"]}).encode())
        await writer.drain()
        writer.close()

    def http(origin: str):
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            n = 0
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    line = head.split(b"\r\n", 1)[0].decode("latin-1")
                    n += 1
                    body = f"origin={origin} request#{n} on this connection: {line}\n".encode()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(body), body))
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            writer.close()
        return serve

    def fixed(text: bytes):
        # Client speaks first: the shadow server (asyncssh's direct-tcpip forwarding) can drop bytes a target
        # sends before the channel is linked up, which would make this check fail for the wrong reason.
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()
            writer.write(text)
            await writer.drain()
            writer.close()
        return serve

    servers: dict[str, int] = {}
    keep: list[asyncio.Server] = []  # hold the listeners for the life of the process
    for name, host, handler in (("half_close", "127.0.0.2", half_close), ("push", "127.0.0.2", push),
                                ("status", "127.0.0.2", status), ("http_a", "127.0.0.2", http("A")),
                                ("http_b", "127.0.0.4", http("B"))):
        srv = await asyncio.start_server(handler, host, 0)
        keep.append(srv)
        servers[name] = srv.sockets[0].getsockname()[1]
    # One port, two addresses: which one answers tells which side resolved REMOTE_NAME.
    for _ in range(50):
        remote = await asyncio.start_server(fixed(b"REMOTE (127.0.0.3: resolved on the shadow side)\n"),
                                            REMOTE_ONLY_IP, 0)
        port = remote.sockets[0].getsockname()[1]
        try:
            local = await asyncio.start_server(fixed(b"LOCAL (127.0.0.1: resolved on the client side)\n"),
                                               "127.0.0.1", port)
        except OSError:
            remote.close()
            continue
        keep += [remote, local]
        servers["name"] = port
        break
    else:
        raise SystemExit("no port free on both 127.0.0.3 and 127.0.0.1")
    tmp = port_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(servers, f)
    os.replace(tmp, port_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


# =================================================================================================
# Internal subcommand: the shadow server with a remote-only hosts entry
# =================================================================================================

def _shadow_main(argv: list[str]) -> int:
    """`python -m shadow_image ARGV`, except that on this side REMOTE_NAME resolves to REMOTE_ONLY_IP.
    The mapping is applied after ShadowServer.connection_requested has logged the dest_host it got."""
    from asyncssh import connection

    from shadow_image import sshd

    orig = connection.SSHConnection.forward_connection

    async def forward_connection(self, dest_host, dest_port):  # type: ignore[no-untyped-def]
        if dest_host == REMOTE_NAME:
            dest_host = REMOTE_ONLY_IP
        return await orig(self, dest_host, dest_port)

    connection.SSHConnection.forward_connection = forward_connection
    return sshd.main(argv)


# =================================================================================================
# Internal subcommand: pproxy used as a library (pproxy.Server / pproxy.Connection), under uvloop
# =================================================================================================

async def _pproxy_lib_main(args: argparse.Namespace) -> None:
    import pproxy

    server = pproxy.Server("http+socks5://127.0.0.1:0")
    remote = pproxy.Connection(args.remote) if args.remote else pproxy.DIRECT
    if args.inject:
        # ktproxy's own pinned session (host key pinned, our cipher and window), handed to pproxy. pproxy has
        # no parameter for this; ProxySSH keeps its connection in a private future, which we pre-resolve.
        import asyncssh

        from ktproxy.tunnel.session import SSHOptions, connect_tcp
        host, _, port = args.inject.rpartition(":")
        opts = SSHOptions(asyncssh.read_private_key(args.identity), asyncssh.read_public_key(args.host_key_pub))
        conn = await connect_tcp(host, int(port), opts)
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(conn)
        remote.sshconn = fut
    handler = await server.start_server(dict(rserver=[remote], verbose=print))
    tmp = args.ready + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(handler.sockets[0].getsockname()[1]))
    os.replace(tmp, args.ready)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    handler.close()


# =================================================================================================
# Clients (blocking sockets, in the orchestrating process)
# =================================================================================================

def _read_head(s: socket.socket, buf: bytes, closed: str) -> tuple[bytes, bytes]:
    """Read up to the blank line ending an HTTP head: (head, what came after it)."""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise ProxyError(f"{closed} ({len(buf)} bytes: {buf[:80]!r})")
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    return head, rest


def http_connect(proxy_port: int, host: str, port: int, timeout: float = 10.0) -> tuple[socket.socket, bytes]:
    s = socket.create_connection(("127.0.0.1", proxy_port), timeout=timeout)
    s.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    head, rest = _read_head(s, b"", "proxy closed before answering CONNECT")
    if b" 200" not in head.split(b"\r\n", 1)[0]:
        raise ProxyError(f"CONNECT answered {head.splitlines()[0]!r}")
    return s, rest


def read_to_eof(s: socket.socket, already: bytes = b"", limit: int = 1 << 20) -> tuple[bytes, str]:
    buf = already
    try:
        while len(buf) < limit:
            chunk = s.recv(65536)
            if not chunk:
                return buf, "eof"
            buf += chunk
    except TimeoutError:
        return buf, "timeout"
    except OSError as exc:
        return buf, f"error: {exc}"
    return buf, "limit"


def read_http_response(s: socket.socket, buf: bytes) -> tuple[bytes, bytes, bytes]:
    """One response with Content-Length: (status line, body, leftover)."""
    head, rest = _read_head(s, buf, "connection closed before a response header")
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    if not m:
        raise ProxyError(f"response without Content-Length: {head[:80]!r}")
    n = int(m.group(1))
    while len(rest) < n:
        chunk = s.recv(65536)
        if not chunk:
            raise ProxyError("connection closed inside a response body")
        rest += chunk
    return head.split(b"\r\n", 1)[0], rest[:n], rest[n:]


# =================================================================================================
# Checks
# =================================================================================================

@dataclass
class Result:
    status: str  # PASS, FAIL, n/a, info
    reason: str


@dataclass
class Subject:
    key: str
    title: str
    how: str
    proxy_pid: int = 0
    proxy_port: int = 0
    shadow_name: str | None = None  # Procs log name of its shadow server, if any
    shadow_pid: int = 0
    results: dict[str, Result] = field(default_factory=dict)
    error: str | None = None


def check_half_close(port: int, ports: dict[str, int], via: str) -> Result:
    try:
        if via == "socks5":
            s, rest = socks5(port, "127.0.0.2", ports["half_close"], timeout=4), b""
        else:
            s, rest = http_connect(port, "127.0.0.2", ports["half_close"], timeout=4)
    except (OSError, ProxyError) as exc:
        return Result("FAIL", f"{via}: could not connect: {exc}")
    with s:
        s.sendall(HALF_CLOSE_PAYLOAD)
        s.shutdown(socket.SHUT_WR)
        data, how = read_to_eof(s, rest)
    want = b"target read %d bytes then EOF" % len(HALF_CLOSE_PAYLOAD)
    if data == want:
        return Result("PASS", f"{via}: reply after EOF received ({data.decode()!r})")
    if how == "timeout":
        return Result("FAIL", f"{via}: no reply within 4 s after SHUT_WR (got {data!r}); the FIN was not forwarded")
    return Result("FAIL", f"{via}: got {data!r} then {how}: the proxy closed instead of half-closing")


def check_keepalive_raw(port: int, ports: dict[str, int]) -> tuple[Result, Result]:
    """Two absolute-URI GETs to origin A on one connection; then a third to origin B (extra)."""
    a = f"127.0.0.2:{ports['http_a']}"
    b = f"127.0.0.4:{ports['http_b']}"
    bodies: list[bytes] = []
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=4)
    except OSError as exc:
        r = Result("FAIL", f"cannot connect to the proxy: {exc}")
        return r, r
    second = Result("n/a", "not reached")
    with s:
        buf = b""
        try:
            for path in ("/one", "/two"):
                s.sendall(f"GET http://{a}{path} HTTP/1.1\r\nHost: {a}\r\nProxy-Connection: keep-alive\r\n\r\n"
                          .encode())
                status, body, buf = read_http_response(s, buf)
                if b" 200" not in status:
                    raise ProxyError(f"{path}: {status!r}")
                bodies.append(body)
        except (OSError, ProxyError) as exc:
            return Result("FAIL", f"after {len(bodies)} answered GET(s): {exc}"), second
        if b"origin=A request#2" in bodies[1] and b"GET /two " in bodies[1]:
            first = Result("PASS", "both GETs answered on one client connection (one upstream connection, "
                                   "origin-form request lines)")
        else:
            first = Result("FAIL", f"second answer wrong: {bodies[1]!r}")
        try:
            s.sendall(f"GET http://{b}/three HTTP/1.1\r\nHost: {b}\r\n\r\n".encode())
            status, body, buf = read_http_response(s, buf)
        except TimeoutError:
            return first, Result("FAIL", "GET to a second origin on the same connection: no answer in 4 s")
        except (OSError, ProxyError) as exc:
            return first, Result("FAIL", f"GET to a second origin on the same connection: {exc}")
        if body.startswith(b"origin=B"):
            second = Result("PASS", "a GET to another origin on the same client connection reached that origin")
        else:
            second = Result("FAIL", "a GET for origin B on the same client connection was sent to origin A: "
                                    f"{body.decode(errors='replace').strip()!r}")
    return first, second


def _curl_two(port: int, first: str, second: str) -> subprocess.CompletedProcess[str] | Result:
    """curl fetching two URLs through the proxy in one run (so it may reuse the proxy connection);
    a Result when curl cannot give an answer."""
    curl = shutil.which("curl")
    if not curl:
        return Result("n/a", "curl not installed")
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    try:
        return subprocess.run([curl, "-sv", "--max-time", "5", "-x", f"http://127.0.0.1:{port}", first, second],
                              capture_output=True, text=True, timeout=15, env=env)
    except subprocess.TimeoutExpired:
        return Result("FAIL", "curl hung")


def check_keepalive_curl(port: int, ports: dict[str, int]) -> Result:
    a = f"http://127.0.0.2:{ports['http_a']}"
    p = _curl_two(port, f"{a}/c1", f"{a}/c2")
    if isinstance(p, Result):
        return p
    reused = re.search(r"(?i)re-?using existing connection[^\n]*", p.stderr)
    answered = p.stdout.count("origin=A")
    if p.returncode == 0 and answered == 2 and reused:
        return Result("PASS", f"curl: both answered, \"{reused.group(0).strip()}\"")
    return Result("FAIL", f"curl exit {p.returncode}, {answered}/2 answered, reuse line "
                          f"{'present' if reused else 'absent'}")


def check_cross_origin_curl(port: int, ports: dict[str, int]) -> Result:
    """curl reuses a plain-HTTP proxy connection for a different origin: the proxy must route per request."""
    a, b = f"http://127.0.0.2:{ports['http_a']}", f"http://127.0.0.4:{ports['http_b']}"
    p = _curl_two(port, f"{a}/c1", f"{b}/c2")
    if isinstance(p, Result):
        return p
    reused = "reused the proxy connection" if re.search(r"(?i)re-?using existing", p.stderr) else "new connection"
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("origin=")]
    if len(lines) == 2 and lines[1].startswith("origin=B"):
        return Result("PASS", f"curl ({reused}): 2nd URL (origin B) answered by origin B")
    return Result("FAIL", f"curl ({reused}): 2nd URL for origin B answered by {lines[1][:8] if len(lines) > 1 else '-'}"
                          f" ({lines[1][lines[1].find('GET'):] if len(lines) > 1 else p.stderr[-80:]!r})")


def check_remote_dns(subject: Subject, procs: Procs, ports: dict[str, int]) -> Result:
    port = ports["name"]
    try:
        s = socks5(subject.proxy_port, REMOTE_NAME, port, timeout=4)
    except (OSError, ProxyError) as exc:
        return Result("FAIL", f"SOCKS5 ATYP 3 {REMOTE_NAME!r}: {exc}")
    with s:
        s.sendall(b"who answers?\n")
        data, _ = read_to_eof(s)
    if subject.shadow_name is None:
        where = data.decode(errors="replace").strip()
        return Result("n/a", f"no remote side: the proxy resolved the ATYP 3 name itself ({where})")
    time.sleep(0.2)
    log = (procs.workdir / f"{subject.shadow_name}.log").read_text(errors="replace")
    got = re.findall(rf"direct-tcpip (\S+):{port}\b", log)
    if data.startswith(b"REMOTE") and got == [REMOTE_NAME]:
        return Result("PASS", f"shadow got direct-tcpip {REMOTE_NAME}:{port} (the name) and resolved it; "
                              "reply came from the remote-only address")
    return Result("FAIL", f"shadow got direct-tcpip {got or '(nothing)'}; reply {data[:40]!r}")


def target_pushed(ports: dict[str, int]) -> int:
    with socket.create_connection(("127.0.0.2", ports["status"]), timeout=3) as s:
        data, _ = read_to_eof(s)
    return int(json.loads(data)["pushed"])


def check_backpressure(subject: Subject, ports: dict[str, int], seconds: float) -> Result:
    base = rss_kb(subject.proxy_pid)
    shadow_base = rss_kb(subject.shadow_pid) if subject.shadow_pid else 0
    try:
        s = socks5(subject.proxy_port, "127.0.0.2", ports["push"], timeout=5, rcvbuf=64 * 1024)
    except (OSError, ProxyError) as exc:
        return Result("FAIL", f"could not connect: {exc}")
    peak = base
    shadow_peak = shadow_base
    read = 0
    with s:
        s.sendall(struct.pack("!Q", BP_BYTES))
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                read += len(s.recv(16 * 1024))  # ~0.8 MB/s: a very slow reader
            except TimeoutError:
                pass
            peak = max(peak, rss_kb(subject.proxy_pid))
            if subject.shadow_pid:
                shadow_peak = max(shadow_peak, rss_kb(subject.shadow_pid))
            time.sleep(0.02)
        pushed = target_pushed(ports)
    grew = (peak - base) / 1024
    extra = f"; shadow server +{(shadow_peak - shadow_base) / 1024:.0f} MB" if subject.shadow_pid else ""
    text = (f"proxy RSS {base / 1024:.0f} MB -> peak +{grew:.0f} MB; in {seconds:.0f} s the target pushed "
            f"{pushed / MB:.0f} MB, the client read {read / MB:.1f} MB{extra}")
    return Result("PASS" if grew < BP_LIMIT_MB else "FAIL", text)


def cpu_seconds(pids: list[int]) -> float:
    """user + system CPU of these processes so far (/proc/PID/stat fields 14 and 15)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def measure_throughput(subject: Subject, ports: dict[str, int]) -> Result:
    port = subject.proxy_port
    pids = [subject.proxy_pid] + ([subject.shadow_pid] if subject.shadow_pid else [])
    buf = bytearray(MB)
    view = memoryview(buf)
    try:
        s = socks5(port, "127.0.0.2", ports["push"], timeout=30)
    except (OSError, ProxyError) as exc:
        return Result("info", f"could not connect: {exc}")
    with s:
        s.sendall(struct.pack("!Q", THROUGHPUT_BYTES))
        got = 0
        cpu0 = cpu_seconds(pids)
        t0 = time.perf_counter()
        try:
            while got < THROUGHPUT_BYTES:
                n = s.recv_into(view)
                if not n:
                    break
                got += n
        except OSError as exc:
            return Result("info", f"failed after {got / MB:.0f} MB: {exc}")
        dt = time.perf_counter() - t0
        cpu = cpu_seconds(pids) - cpu0
    if got < THROUGHPUT_BYTES:
        return Result("info", f"stream ended after {got / MB:.0f} MB")
    who = "proxy + shadow server" if subject.shadow_pid else "proxy"
    return Result("info", f"{got / MB / dt:.0f} MB/s ({got // MB} MB SOCKS5 download in {dt:.2f} s); "
                          f"{cpu / (got / 1e9):.1f} CPU-s/GB ({who})")


# =================================================================================================
# Starting the subjects
# =================================================================================================

class Env:
    def __init__(self, procs: Procs) -> None:
        self.procs = procs
        self.keys = make_keys(procs.workdir)
        self._n = 0

    def tag(self, name: str) -> str:
        self._n += 1
        return f"{name}{self._n}"

    def start_shadow(self) -> tuple[str, int, int]:
        name = self.tag("shadow")
        pf = self.procs.workdir / f"{name}.port"
        proc = self.procs.spawn(name, [
            PY, "-m", "benchmarks.pproxy_check", "_shadow", "--", "--listen", "127.0.0.1:0", "-d",
            "--port-file", str(pf), "--authorized-keys", str(self.keys.client_pub), "--host-key", str(self.keys.host)])
        wait_for(lambda: pf.exists() and pf.read_text().strip() != "", 20, "shadow server", proc)
        return name, proc.pid, int(pf.read_text())

    def ssh_url(self, ssh_port: int) -> str:
        # pproxy's ssh:// syntax: user in the fragment, "::" + path = client key file instead of a password.
        return f"ssh://127.0.0.1:{ssh_port}#kt::{self.keys.client}"

    def pproxy_lib(self, remote: str | None, inject: int | None = None) -> subprocess.Popen:
        name = self.tag("pproxy_lib")
        ready = self.procs.workdir / f"{name}.ready"
        argv = [PY, "-m", "benchmarks.pproxy_check", "_pproxy_lib", "--ready", str(ready)]
        if remote:
            argv += ["--remote", remote]
        if inject:
            argv += ["--inject", f"127.0.0.1:{inject}", "--identity", str(self.keys.client),
                     "--host-key-pub", str(self.keys.host_pub)]
        proc = self.procs.spawn(name, argv, env=self._home_env())
        wait_for(ready.exists, 20, "pproxy (library)", proc)
        proc.port = int(ready.read_text())  # type: ignore[attr-defined]
        return proc

    def pproxy_cli(self, remote: str | None, hide_uvloop: bool) -> tuple[subprocess.Popen, str]:
        name = self.tag("pproxy_cli")
        port = free_port()
        cli = ["-l", f"http+socks5://127.0.0.1:{port}"] + (["-r", remote] if remote else [])
        if hide_uvloop:
            argv = [PY, "-c", "import sys; sys.modules['uvloop'] = None; from pproxy.server import main; main()", *cli]
        else:
            argv = [PY, "-m", "pproxy", *cli]
        proc = self.procs.spawn(name, argv, env=self._home_env())
        proc.port = port  # type: ignore[attr-defined]
        try:
            wait_for(lambda: port_open("127.0.0.1", port), 10, "pproxy CLI", proc)
        except RuntimeError as exc:
            last = self.procs.tail(name, 3).strip().splitlines()
            return proc, f"{last[-1] if last else exc}"
        return proc, ""

    def ktproxy(self, ssh_port: int) -> subprocess.Popen:
        name = self.tag("ktproxy")
        ready = self.procs.workdir / f"{name}.ready"
        proc = self.procs.spawn(name, [
            PY, "-m", "benchmarks.launch", "dataplane", "--",
            "--ssh", f"127.0.0.1:{ssh_port}", "--identity", str(self.keys.client),
            "--host-key-pub", str(self.keys.host_pub), "--cidr", "127.0.0.0/8", "--route", "all",
            "--proxy-port", "0", "--dns-port", "-1", "--ready-file", str(ready)])
        wait_for(lambda: ready.exists() and ready.read_text().strip() != "", 20, "ktproxy data plane", proc)
        proc.port = int(ready.read_text().split()[0])  # type: ignore[attr-defined]
        return proc

    def _home_env(self) -> dict[str, str]:
        """pproxy's asyncssh reads ~/.ssh (config, known_hosts) and the agent: give it an empty HOME so nothing
        of this machine's SSH setup is used, and no agent."""
        home = self.procs.workdir / "home"
        home.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
        env["HOME"] = str(home)
        return env


def ssh_connections(procs: Procs, shadow_name: str) -> int:
    log = (procs.workdir / f"{shadow_name}.log").read_text(errors="replace")
    return len(re.findall(r"shadow: connection from ", log))


def run_subject(subject: Subject, procs: Procs, ports: dict[str, int], bp_seconds: float) -> None:
    p = subject.proxy_port
    r = subject.results
    r["1a"] = check_half_close(p, ports, "socks5")
    r["1b"] = check_half_close(p, ports, "http-connect")
    r["3a"], r["3x"] = check_keepalive_raw(p, ports)
    r["3b"] = check_keepalive_curl(p, ports)
    r["3y"] = check_cross_origin_curl(p, ports)
    r["4"] = check_remote_dns(subject, procs, ports)
    r["2"] = check_backpressure(subject, ports, bp_seconds)
    r["tp"] = measure_throughput(subject, ports)
    if subject.shadow_name:
        n = ssh_connections(procs, subject.shadow_name)
        r["conns"] = Result("info", f"{n} SSH connection(s) reached the shadow server")


def static_findings() -> dict[str, Result]:
    """What pproxy's source says about reusing a connection and pinning the host key."""
    import pproxy
    from pproxy import server

    src = inspect.getsource(server.ProxySSH.wait_ssh_connection)
    dials = "asyncssh.connect(host=self.host_name" in src
    unpinned = "known_hosts=None" in src
    params = list(inspect.signature(pproxy.Connection).parameters)
    return {
        "api": Result("FAIL" if dials else "info",
                      f"pproxy.Connection({', '.join(params)}) takes only a URI string; ProxySSH.wait_ssh_connection "
                      f"{'always calls asyncssh.connect(host, port, ...) itself' if dials else 'changed'}"),
        "pin": Result("FAIL" if unpinned else "info",
                      "ssh:// connects with known_hosts=None: any host key is accepted, no way to pin one"
                      if unpinned else "known_hosts handling changed; re-check"),
    }


def source_causes() -> list[tuple[str, bool, str]]:
    """Why pproxy behaves as measured, each claim checked against the installed source (True = still so)."""
    import asyncio as aio

    import pproxy  # noqa: F401  (importing it is what patches asyncio, see the last row)
    from pproxy import proto, server

    def src(obj: object) -> str:
        return inspect.getsource(obj)  # type: ignore[arg-type]

    channel = src(proto.BaseProtocol.channel)
    patch = src(server.ProxySSH.patch_stream)
    httpch = src(proto.HTTP.http_channel)
    main_src = src(server.main)
    return [
        ("half-close", "writer.close()" in channel and "write_eof" not in channel,
         "`proto.BaseProtocol.channel()` (the relay loop for every protocol) calls `writer.close()` when its "
         "reader reaches EOF; there is no `write_eof()`, so a client FIN becomes a full close of both directions"),
        ("back-pressure (ssh://)", "feed_data" in patch and "asyncio.StreamReader()" in patch,
         "`ProxySSH.patch_stream()` copies the SSH channel into a new `asyncio.StreamReader()` with `feed_data()` "
         "in a loop; that reader has no transport to pause, so it buffers whatever the SSH side delivers, however "
         "slowly the client reads (direct remotes use plain streams + `drain()` and stay bounded)"),
        ("keep-alive, 2nd origin", "newpath" in httpch and "open_connection" not in httpch,
         "`HTTP.http_channel()` rewrites the request line of later requests on the connection but keeps writing "
         "them to the upstream chosen by the first request, whatever their Host"),
        ("CLI + uvloop", "__import__('uvloop').install()" in main_src and "asyncio.get_event_loop()" in main_src,
         "`server.main()` runs `uvloop.install()` and then `asyncio.get_event_loop()` with no running loop, "
         "which uvloop 0.23's policy refuses"),
        ("embedding side effect", hasattr(aio.StreamReader, "rollback") and hasattr(aio.StreamReader, "read_w"),
         "`import pproxy` monkey-patches asyncio process-wide (adds `StreamReader.read_w/read_n/read_until/"
         "rollback`, replaces `StreamWriter.is_closing`) — it would do that inside ktproxy too"),
    ]


# =================================================================================================
# Report
# =================================================================================================

CHECKS = [
    ("1a", "1. half-close (SOCKS5)"),
    ("1b", "1. half-close (HTTP CONNECT)"),
    ("2", f"2. back-pressure (RSS < +{BP_LIMIT_MB} MB)"),
    ("3a", "3. keep-alive HTTP (raw socket, 2 GETs)"),
    ("3b", "3. keep-alive HTTP (curl -v, 2 URLs)"),
    ("4", "4. SOCKS5 remote DNS (ATYP 3)"),
]


def verdict(subject: Subject) -> str:
    if subject.error:
        return "did not run"
    states = [subject.results[k].status for k, _ in CHECKS if k in subject.results]
    return "FAIL" if "FAIL" in states else "PASS"


def render(subjects: list[Subject], extras: dict[str, Result], meta: dict[str, str],
           causes: list[tuple[str, bool, str]]) -> str:
    out: list[str] = []
    out.append("# pproxy 2.7.9 against ktproxy's front-end correctness checks\n")
    out.append(f"Date: {meta['date']}  \nCommand: `{meta['command']}` (from the repo root; took {meta['elapsed']})  \n"
               f"Versions: {meta['versions']}  \nMachine: {meta['machine']}\n")
    out.append("## Summary\n")
    short = subjects
    out.append("| check | " + " | ".join(s.title for s in short) + " |")
    out.append("|---|" + "---|" * len(short))
    for key, label in [*CHECKS, ("3x", "(extra) keep-alive, 2nd origin on same conn (raw)"),
                       ("3y", "(extra) keep-alive, 2nd origin on same conn (curl)"),
                       ("tp", "throughput, 1 stream 256 MB; CPU per GB (indicative)")]:
        cells = []
        for s in short:
            if s.error:
                cells.append("—")
                continue
            res = s.results.get(key)
            if res is None:
                cells.append("—")
            elif key == "tp":
                m = re.match(r"(\d+ MB/s).*?([\d.]+ CPU-s/GB)", res.reason)
                cells.append(f"{m.group(1)}, {m.group(2)}" if m else "failed")
            else:
                cells.append(f"**{res.status}**" if res.status == "FAIL" else res.status)
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out.append("| **verdict (checks 1-4)** | " + " | ".join(f"**{verdict(s)}**" for s in short) + " |")
    out.append("")
    out.append("## Other findings\n")
    out.append("| question | result | detail |")
    out.append("|---|---|---|")
    for label, res in extras.items():
        out.append(f"| {label} | {res.status} | {res.reason} |")
    out.append("")
    out.append("## Why (pproxy's own source, each claim re-checked by this script)\n")
    out.append("| finding | still true in the installed pproxy? | cause |")
    out.append("|---|---|---|")
    for what, ok, text in causes:
        out.append(f"| {what} | {'yes' if ok else 'NO — re-read the source'} | {text} |")
    out.append("")
    out.append("## Details (one line per check)\n")
    for s in subjects:
        out.append(f"### {s.title}\n")
        out.append(f"How: {s.how}\n")
        if s.error:
            out.append(f"- did not run: {s.error}\n")
            continue
        labels = dict([*CHECKS, ("3x", "extra: 2nd origin, same connection (raw)"),
                       ("3y", "extra: 2nd origin, same connection (curl)"), ("tp", "throughput"),
                       ("conns", "SSH connections")])
        for key, res in s.results.items():
            out.append(f"- {labels.get(key, key)}: **{res.status}** — {res.reason}")
        out.append("")
    out.append("## What each check does\n")
    out.append(
        "1. **half-close**: the client sends a payload and `shutdown(SHUT_WR)`; the target (127.0.0.2) reads to "
        "EOF, then replies and closes. PASS if the client receives the reply. Done via SOCKS5 and via HTTP "
        "CONNECT.\n"
        f"2. **back-pressure**: over SOCKS5 the target pushes {BP_BYTES // MB} MB as fast as the next hop "
        f"accepts; the client (64 KB receive buffer) reads 16 KB every 20 ms for {meta['bp_seconds']} s. PASS if "
        f"the proxy process's VmRSS (/proc/PID/status, sampled every read) never grows by {BP_LIMIT_MB} MB or "
        "more over its value just before the stream. The target's pushed count shows where the data went.\n"
        "3. **keep-alive HTTP proxying**: two absolute-URI `GET http://127.0.0.2:P/...` on one raw client "
        "connection must both be answered (the target numbers requests per upstream connection); and `curl -v "
        "-x` with two URLs must print \"Re-using existing connection\" and both bodies. The extra row sends a "
        "third GET on the same client connection to a different origin (127.0.0.4): it must reach that origin; "
        "the curl row does the same with two URLs on two origins in one curl invocation (curl reuses a "
        "plain-HTTP proxy connection across origins). The extra rows are reported, not part of the verdict.\n"
        f"4. **SOCKS5 remote DNS**: SOCKS5 CONNECT with ATYP 3 `{REMOTE_NAME}`. On the client machine that name "
        f"is 127.0.0.1 (/etc/hosts, so a wrong local lookup sends no DNS packet anywhere); the shadow server is "
        f"run with one remote-only hosts entry ({REMOTE_NAME} -> {REMOTE_ONLY_IP}) and `-d`, which logs "
        "`direct-tcpip HOST:PORT`. The target listens on the same port on both addresses and says which one "
        "answered. PASS if the shadow received the NAME and the reply came from the remote-only address; a proxy "
        "that resolved locally would send `127.0.0.1` and get the LOCAL reply. For a direct remote there is no "
        "remote side (n/a).\n"
        f"- **throughput**: one SOCKS5 stream, {THROUGHPUT_BYTES // MB} MB target->client, client reads with "
        "1 MB recv_into. Indicative only (2 cores shared by client, proxy, shadow and target; one run).\n")
    return "\n".join(out) + "\n"


# =================================================================================================
# main
# =================================================================================================

def versions() -> str:
    from importlib.metadata import version
    parts = [f"Python {platform.python_version()}"]
    for pkg in ("pproxy", "asyncssh", "uvloop"):
        parts.append(f"{pkg} {version(pkg)}")
    curl = shutil.which("curl")
    if curl:
        parts.append(subprocess.run([curl, "--version"], capture_output=True, text=True).stdout.split()[1]
                     .join(["curl ", ""]))
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        parts.append(f"ktproxy @ {rev}")
    except OSError:
        pass
    return ", ".join(parts)


def run(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    bp_seconds = 2.0 if args.quick else 5.0
    workdir = Path(tempfile.mkdtemp(prefix="pproxy_check."))
    procs = Procs(workdir)
    subjects: list[Subject] = []
    extras: dict[str, Result] = {}
    try:
        env = Env(procs)
        pf = workdir / "target.json"
        tgt = procs.spawn("target", [PY, "-m", "benchmarks.pproxy_check", "_target", "--port-file", str(pf)])
        wait_for(pf.exists, 15, "target", tgt)
        ports = json.loads(pf.read_text())

        # The CLI as shipped, beside uvloop.
        proc, err = env.pproxy_cli(None, hide_uvloop=False)
        time.sleep(0.3)
        if err:
            extras["pproxy CLI starts with uvloop installed?"] = Result(
                "FAIL", f"`python -m pproxy -l http+socks5://127.0.0.1:PORT` exits {proc.poll()}: {err} "
                        "(it calls uvloop.install(), then asyncio.get_event_loop() outside a running loop)")
        else:
            extras["pproxy CLI starts with uvloop installed?"] = Result("PASS", "listening")
        procs.stop(proc)
        found = static_findings()
        extras["reuse ONE existing asyncssh connection? (public API)"] = found["api"]
        extras["pin the shadow's host key with ssh://?"] = found["pin"]

        plans = [
            ("pproxy_lib_ssh", "pproxy lib, ssh://",
             "pproxy.Server('http+socks5://127.0.0.1:0') + pproxy.Connection('ssh://127.0.0.1:P#kt::KEY'), uvloop"),
            ("pproxy_lib_inject", "pproxy lib, injected conn",
             "as above, but ProxySSH.sshconn pre-set to ONE asyncssh connection made by "
             "ktproxy.tunnel.session.connect_tcp (pinned host key, ktproxy cipher/window) — private attribute"),
            ("pproxy_lib_direct", "pproxy lib, direct",
             "pproxy.Server('http+socks5://127.0.0.1:0'), no remote, uvloop"),
            ("pproxy_cli_ssh", "pproxy CLI, ssh://",
             "pproxy CLI main() -l http+socks5://127.0.0.1:P -r ssh://127.0.0.1:P#kt::KEY, "
             "uvloop hidden (the CLI does not start beside it)"),
            ("pproxy_cli_direct", "pproxy CLI, direct",
             "pproxy CLI main() -l http+socks5://127.0.0.1:P, uvloop hidden"),
            ("ktproxy", "ktproxy",
             "python -m benchmarks.launch dataplane -- (= python -m devtools.dataplane_main with loopback forced "
             "through the tunnel) --ssh 127.0.0.1:P --cidr 127.0.0.0/8 --route all --dns-port -1, uvloop"),
        ]
        for key, title, how in plans:
            if args.only and key not in args.only:
                continue
            s = Subject(key, title, how)
            subjects.append(s)
            started: list[subprocess.Popen] = []
            try:
                if key in ("pproxy_lib_ssh", "pproxy_lib_inject", "pproxy_cli_ssh", "ktproxy"):
                    s.shadow_name, s.shadow_pid, ssh_port = env.start_shadow()
                    started.append(next(p for p in procs.started if p.pid == s.shadow_pid))
                if key == "pproxy_lib_ssh":
                    proc = env.pproxy_lib(env.ssh_url(ssh_port))
                elif key == "pproxy_lib_inject":
                    # The URL is still required (it names the protocol); pproxy would dial it itself only if the
                    # injected connection failed.
                    proc = env.pproxy_lib(env.ssh_url(ssh_port), inject=ssh_port)
                elif key == "pproxy_lib_direct":
                    proc = env.pproxy_lib(None)
                elif key in ("pproxy_cli_ssh", "pproxy_cli_direct"):
                    proc, err = env.pproxy_cli(env.ssh_url(ssh_port) if key == "pproxy_cli_ssh" else None,
                                               hide_uvloop=True)
                    if err:
                        raise RuntimeError(err)
                else:
                    proc = env.ktproxy(ssh_port)
                started.append(proc)
                s.proxy_pid, s.proxy_port = proc.pid, proc.port  # type: ignore[attr-defined]
                print(f"== {title} (pid {proc.pid}, port {s.proxy_port})", flush=True)
                run_subject(s, procs, ports, bp_seconds)
                for k, res in s.results.items():
                    print(f"   {k:5} {res.status:4} {res.reason}", flush=True)
            except Exception as exc:  # one subject failing to start must not hide the others
                s.error = f"{type(exc).__name__}: {exc}"
                print(f"== {title}: {s.error}", flush=True)
            finally:
                for p in reversed(started):
                    procs.stop(p)

        inj = next((s for s in subjects if s.key == "pproxy_lib_inject" and not s.error), None)
        if inj:
            conns = inj.results.get("conns")
            extras["reuse ONE existing asyncssh connection? (experiment)"] = Result(
                "info", "only by assigning the private ProxySSH.sshconn future; then "
                        f"{conns.reason if conns else '?'} and checks 1-4 behave as with pproxy's own "
                        "connection. If that connection drops, pproxy re-dials the URL itself with "
                        "known_hosts=None (no pinning, no port-forward)")
    finally:
        procs.stop_all()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    elapsed = time.monotonic() - t0
    meta = dict(date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                command=".venv/bin/python -m benchmarks.pproxy_check" + (" --quick" if args.quick else ""),
                elapsed=f"{elapsed:.0f} s", versions=versions(), bp_seconds=f"{bp_seconds:.0f}",
                machine=f"{os.cpu_count()} CPUs, {platform.system()} {platform.release()}; load average "
                        f"{load_before} before (shared machine: throughput varies run to run, CPU-s/GB less so)")
    text = render(subjects, extras, meta, source_causes())
    if not args.only:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["_target"]:
        p = argparse.ArgumentParser()
        p.add_argument("--port-file", required=True)
        a = p.parse_args(argv[1:])
        import uvloop
        uvloop.install()
        asyncio.run(_target_main(a.port_file))
        return 0
    if argv[:1] == ["_shadow"]:
        rest = argv[1:]
        return _shadow_main(rest[1:] if rest[:1] == ["--"] else rest)
    if argv[:1] == ["_pproxy_lib"]:
        p = argparse.ArgumentParser()
        p.add_argument("--ready", required=True)
        p.add_argument("--remote")
        p.add_argument("--inject")
        p.add_argument("--identity")
        p.add_argument("--host-key-pub")
        a = p.parse_args(argv[1:])
        for uri in (a.remote or "", a.inject or ""):
            if uri and not re.search(r"(^|//)127\.", uri):
                raise SystemExit("pproxy_check only ever connects to loopback")
        import uvloop
        uvloop.install()  # ktproxy runs on uvloop; pproxy embedded in it would too
        asyncio.run(_pproxy_lib_main(a))
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.pproxy_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--quick", action="store_true", help="shorter back-pressure window")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs) for debugging")
    p.add_argument("--only", action="append", help="run one subject (debugging; prints instead of writing)")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
