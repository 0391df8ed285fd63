"""Stream semantics end to end: half-close and back-pressure through the proxy and the SSH tunnel."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import struct
import time

import pytest
from itlib import HALFCLOSE_PORT, curl, recv_all, recv_exactly, socks5_connect


def connect_via_http(plane, host: str, port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", plane.proxy_port), timeout=20)
    s.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += recv_exactly(s, 1)
    assert head.startswith(b"HTTP/1.1 200"), head
    return s


def open_stream(plane, how: str, host: str, port: int) -> socket.socket:
    if how == "socks5":
        s, code = socks5_connect(("127.0.0.1", plane.proxy_port), host, port)
        assert code == 0
        return s
    return connect_via_http(plane, host, port)


@pytest.mark.parametrize("how", ["socks5", "connect"])
@pytest.mark.parametrize("size", [5, 3 * 1024 * 1024])
def test_half_close(dataplane, how, size):
    """The client sends, shuts down its write side, and still gets the answer sent after its EOF."""
    payload = os.urandom(size)
    s = open_stream(dataplane, how, "tomcat", HALFCLOSE_PORT)
    with s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        answer = recv_all(s)  # ends only if the server's FIN comes back through too
    assert answer == f"got {size} bytes sha256={hashlib.sha256(payload).hexdigest()}\n".encode()


def rss_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def server_progress(plane) -> dict[str, int]:
    r = curl("--socks5-hostname", plane.socks, "http://tomcat:8080/progress")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


MB = 1024 * 1024


@pytest.mark.parametrize("how", ["socks5", "http"])
def test_slow_reader_back_pressure(dataplane, how):
    """A 200 MB download read very slowly: the server blocks and the data plane's memory stays flat."""
    # Warm up (first-use allocations are not growth).
    curl("--socks5-hostname", dataplane.socks, "-o", "/dev/null", "http://tomcat:8080/bulk?mb=8")
    base = rss_kb(dataplane.pid)
    if how == "socks5":
        s = open_stream(dataplane, "socks5", "tomcat", 8080)
        s.sendall(b"GET /bulk?mb=200 HTTP/1.1\r\nHost: tomcat:8080\r\nConnection: close\r\n\r\n")
    else:
        s = socket.create_connection(("127.0.0.1", dataplane.proxy_port), timeout=20)
        s.sendall(b"GET http://tomcat:8080/bulk?mb=200 HTTP/1.1\r\nHost: tomcat:8080\r\n\r\n")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    received = 0
    peak = base
    samples = []
    with s:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            received += len(s.recv(32 * 1024))
            time.sleep(0.02)
            peak = max(peak, rss_kb(dataplane.pid))
            if len(samples) < int(5 - (deadline - time.monotonic())):
                samples.append(server_progress(dataplane)["bytes"])
        sent = server_progress(dataplane)["bytes"]
        samples.append(sent)
    in_flight = sent - received
    growth_mb = (peak - base) / 1024
    print(f'{how}: sent {sent/MB:.1f} received {received/MB:.1f} growth {growth_mb:.1f} samples {samples}')
    # Bounded by windows and socket buffers (SSH window 8 MB), never by the 200 MB body.
    assert in_flight < 48 * MB, f"{in_flight / MB:.1f} MB in flight (server sent {sent / MB:.1f} MB)"
    assert sent < 100 * MB, f"the server was never blocked: sent {sent / MB:.1f} MB"
    assert growth_mb < 60, f"data plane RSS grew by {growth_mb:.1f} MB"
    # The server is stalled on the slow reader: over the last seconds it sent about what was read.
    assert samples[-1] - samples[1] < received + 16 * MB, samples
    # ...and the proxy keeps serving others meanwhile (checked by server_progress above).


def test_many_parallel_streams(dataplane):
    """Concurrent streams share the one session without mixing bytes."""
    import concurrent.futures

    def one(i: int) -> bytes:
        payload = os.urandom(100_000 + i)
        s = open_stream(dataplane, "socks5" if i % 2 else "connect", "tomcat", HALFCLOSE_PORT)
        with s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            got = recv_all(s)
        assert got == f"got {len(payload)} bytes sha256={hashlib.sha256(payload).hexdigest()}\n".encode()
        return got

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(40)))
    assert len(results) == 40


@pytest.mark.parametrize("how", ["socks5", "connect"])
def test_stalled_upload_back_pressure(dataplane, how):
    """Uploading to a server that never reads: the sender is held back, the data plane stays flat."""
    from itlib import STALL_PORT

    base = rss_kb(dataplane.pid)
    s = open_stream(dataplane, how, "tomcat", STALL_PORT)
    block = b"u" * 65536
    pushed = 0
    peak = base
    with s:
        s.setblocking(False)
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            try:
                pushed += s.send(block)
            except BlockingIOError:
                time.sleep(0.01)
            peak = max(peak, rss_kb(dataplane.pid))
    growth_mb = (peak - base) / 1024
    assert pushed < 48 * MB, f"{pushed / MB:.1f} MB accepted by a server that reads nothing"
    assert growth_mb < 60, f"data plane RSS grew by {growth_mb:.1f} MB"
    # The proxy still serves others.
    assert server_progress(dataplane) is not None


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_nothing_leaks_after_aborted_streams(dataplane, shadow):
    """Clients that vanish mid-response, refused targets and finished streams release every socket
    and channel, on the data plane and on the shadow."""
    def settle() -> tuple[int, int]:
        time.sleep(0.3)
        return fd_count(dataplane.pid), fd_count(shadow.proc.pid)

    base = settle()
    for i in range(15):
        # a download abandoned after its first bytes
        s = open_stream(dataplane, "socks5" if i % 2 else "connect", "tomcat", 8080)
        s.sendall(b"GET /bulk?mb=50 HTTP/1.1\r\nHost: tomcat\r\n\r\n")
        s.recv(1000)
        s.close()
        # the same through the absolute-URI proxy
        p = socket.create_connection(("127.0.0.1", dataplane.proxy_port))
        p.sendall(b"GET http://tomcat:8080/bulk?mb=50 HTTP/1.1\r\nHost: tomcat:8080\r\n\r\n")
        p.recv(1000)
        p.close()
        # a refused target
        s, code = socks5_connect(("127.0.0.1", dataplane.proxy_port), "tomcat", 1)
        assert code == 5
        s.close()
        # an upload aborted (RST) while the server is not reading and the windows are full. (A
        # plain close() would be a half-close: the stream then rightly lives until the server ends.)
        s = open_stream(dataplane, "connect" if i % 2 else "socks5", "tomcat", 7001)
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            for _ in range(1000):
                s.send(b"x" * 65536)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    deadline = time.monotonic() + 10
    now = settle()
    while time.monotonic() < deadline and (now[0] > base[0] + 2 or now[1] > base[1] + 2):
        now = settle()
    assert now[0] <= base[0] + 2, f"data plane fds {base[0]} -> {now[0]}"
    assert now[1] <= base[1] + 2, f"shadow fds {base[1]} -> {now[1]}"


def test_optimistic_clients(dataplane):
    """Clients that send their data without waiting for the proxy's replies (one write)."""
    payload = b"early data"
    with socket.create_connection(("127.0.0.1", dataplane.proxy_port), timeout=15) as s:
        s.sendall(b"CONNECT tomcat:%d HTTP/1.1\r\nHost: tomcat\r\n\r\n" % HALFCLOSE_PORT + payload)
        s.shutdown(socket.SHUT_WR)
        answer = recv_all(s)
    assert answer.startswith(b"HTTP/1.1 200")
    assert answer.endswith(f"got {len(payload)} bytes sha256={hashlib.sha256(payload).hexdigest()}\n".encode())
    name = b"tomcat"
    with socket.create_connection(("127.0.0.1", dataplane.proxy_port), timeout=15) as s:
        s.sendall(b"\x05\x01\x00" + b"\x05\x01\x00\x03" + bytes([len(name)]) + name
                  + HALFCLOSE_PORT.to_bytes(2, "big") + payload)
        s.shutdown(socket.SHUT_WR)
        answer = recv_all(s)
    assert answer[:4] == b"\x05\x00\x05\x00"
    assert answer.endswith(f"got {len(payload)} bytes sha256={hashlib.sha256(payload).hexdigest()}\n".encode())
