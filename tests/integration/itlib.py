"""Integration set-up: a network namespace that plays the cluster, the shadow SSH server inside it, and
`python -m devtools.dataplane_main` on the host.

Layout (NS = ktp-it-<pid>, X = a per-run /24):
  host  veth 10.250.X.1/24  <---->  10.250.X.2/24 veth  NS   shadow sshd listens here (:2222, :2223)
  host  unreachable 10.250.0.0/15                            NS lo: 10.251.0.10 (tomcat, :8080, :7000)
                                                                    10.251.0.11 (demo service, :80)
                                                                    10.251.0.53 (cluster DNS, :53)
                                                                    10.250.200.10 (not a cluster CIDR)
The host reaches only the veth's /24; the addresses the HTTP servers use are behind an `unreachable`
route, so anything the host gets from them came through the tunnel. The namespace has no default
route: nothing in it can leave the machine. /etc/netns/NS/resolv.conf gives processes in NS a pod's
resolver configuration (search list + the namespace's DNS server).

Every process is started here and stopped by its PID; the namespace, veth, routes and /etc/netns/NS
are removed at the end of the session.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PY = sys.executable

TOMCAT_IP = "10.251.0.10"
DEMO_IP = "10.251.0.11"
CLUSTER_DNS_IP = "10.251.0.53"
OUTSIDE_IP = "10.250.200.10"  # only the namespace has it, but it is NOT in the cluster CIDRs
CLUSTER_CIDR = "10.251.0.0/16"
TOMCAT_IP6 = "fd7b:7072:6f78::10"  # a ULA prefix of our own, behind an unreachable route on the host
CLUSTER_CIDR6 = "fd7b:7072:6f78::/48"
GUARD_ROUTE = "10.250.0.0/15"
TOMCAT_MARKER = "ktproxy-it-tomcat-page"
DEMO_MARKER = "ktproxy-it-demo-page"
OUTSIDE_MARKER = "ktproxy-it-outside-page"
LOCAL_MARKER = "ktproxy-it-loopback-page"
SHADOW_PORT = 2222
HALFCLOSE_PORT = 7000
STALL_PORT = 7001

ZONE = [
    ["tomcat.default.svc.cluster.local.", "5", "IN", "A", TOMCAT_IP],
    ["demo.demo.svc.cluster.local.", "5", "IN", "A", DEMO_IP],
    ["_http._tcp.tomcat.default.svc.cluster.local.", "5", "IN", "SRV", "0", "100", "8080",
     "tomcat.default.svc.cluster.local."],
    ["tomcat.default.svc.cluster.local.", "5", "IN", "AAAA", TOMCAT_IP6],
    ["10.0.251.10.in-addr.arpa.", "5", "IN", "PTR", "tomcat.default.svc.cluster.local."],
]


def netns_unavailable() -> str | None:
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "integration tests need root to create network namespaces"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "`ip netns` is unavailable"
    return None


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(args), capture_output=True, text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {res.stderr.strip()}")
    return res


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any proxy settings a developer's shell may carry."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(extra)
    return env


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, by PID only."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)


def wait_for(pred: Callable[[], object], timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None,
             log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            text = log.read_text() if log and log.exists() else ""
            raise RuntimeError(f"{what}: process exited with {proc.returncode}\n{text}")
        time.sleep(0.05)
    text = log.read_text() if log and log.exists() else ""
    raise RuntimeError(f"timed out waiting for {what}\n{text}")


@dataclass
class NetNS:
    name: str
    host_ip: str
    ns_ip: str
    workdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def exec(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]


@dataclass
class Keys:
    identity: Path
    authorized_keys: Path
    host_key: Path
    host_key_pub: Path
    wrong_authorized_keys: Path





class Shadow:
    """The shadow SSH server, run inside the namespace on its veth address."""

    def __init__(self, ns: NetNS, keys: Keys, port: int, authorized_keys: Path | None = None) -> None:
        self.ns, self.keys, self.port = ns, keys, port
        self.authorized_keys = authorized_keys or keys.authorized_keys
        self.log = ns.workdir / f"shadow-{port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.ns.ns_ip}:{self.port}"

    def start(self) -> Shadow:
        port_file = self.ns.workdir / f"shadow-{self.port}.port"
        port_file.unlink(missing_ok=True)
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(
            self.ns.exec(PY, "-m", "shadow_image", "--listen", self.address,
                         "--authorized-keys", str(self.authorized_keys), "--host-key", str(self.keys.host_key),
                         "--port-file", str(port_file), "-d"),
            stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        out.close()
        self.ns.procs.append(self.proc)
        wait_for(port_file.exists, 15, "shadow sshd", self.proc, self.log)
        return self

    def stop(self) -> None:
        stop(self.proc)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")





class DataPlane:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path, proxy_port: int, dns_port: int,
                 proxy_host: str = "127.0.0.1") -> None:
        self.proc, self.log = proc, log
        self.proxy_port, self.dns_port, self.proxy_host = proxy_port, dns_port, proxy_host

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def http_proxy(self) -> str:
        return f"http://{self.proxy_host}:{self.proxy_port}"

    @property
    def socks(self) -> str:
        return f"{self.proxy_host}:{self.proxy_port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        stop(self.proc)


@dataclass
class Launcher:
    netns: NetNS
    keys: Keys
    upstream: tuple[str, int]
    workdir: Path
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)
    counter: int = 0
    known_tracebacks: set[str] = field(default_factory=set)  # logs of xfail tests for reported bugs

    def argv(self, shadow: Shadow, *extra: str, proxy_port: int = 0, dns_port: int = 0,
             identity: Path | None = None) -> tuple[list[str], Path, Path]:
        self.counter += 1
        ready = self.workdir / f"dataplane-{self.counter}.ready"
        log = self.workdir / f"dataplane-{self.counter}.log"
        argv = [PY, "-m", "devtools.dataplane_main", "--ssh", shadow.address,
                "--identity", str(identity or self.keys.identity), "--host-key-pub", str(self.keys.host_key_pub),
                "--namespace", "default", "--known-namespace", "demo", "--cidr", CLUSTER_CIDR,
                "--cidr", CLUSTER_CIDR6,
                "--cluster-dns", f"{CLUSTER_DNS_IP}:53", "--dns-upstream", f"{self.upstream[0]}:{self.upstream[1]}",
                "--proxy-port", str(proxy_port), "--dns-port", str(dns_port), "--ready-file", str(ready), *extra]
        return argv, ready, log

    def start(self, shadow: Shadow, *extra: str, proxy_host: str = "127.0.0.1") -> DataPlane:
        argv, ready, log = self.argv(shadow, *extra)
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=clean_env())
        self.started.append(proc)
        wait_for(lambda: ready.exists() and ready.read_text().endswith("\n"), 20, "the data plane", proc, log)
        proxy_port, dns_port = (int(v) for v in ready.read_text().split())
        return DataPlane(proc, log, proxy_port, dns_port, proxy_host)

    def run(self, shadow: Shadow, *extra: str, timeout: float = 60, **kw: object) -> subprocess.CompletedProcess[str]:
        """Run the data plane to completion (for `-- CMD` and the failure cases)."""
        argv, _ready, _log = self.argv(shadow, *extra, **kw)  # type: ignore[arg-type]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=clean_env())

    def stop_all(self) -> None:
        for proc in self.started:
            stop(proc)





def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def curl(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """curl as a user runs it (no proxy settings but those given)."""
    return subprocess.run(["curl", "-sS", "--max-time", "20", *args], capture_output=True, text=True,
                          env=clean_env(**(env or {})), timeout=timeout)


def socks5_connect(proxy: tuple[str, int], host: str, port: int, timeout: float = 20) -> tuple[socket.socket, int]:
    """A SOCKS5 CONNECT by domain name; returns the socket and the reply code."""
    s = socket.create_connection(proxy, timeout=timeout)
    s.sendall(b"\x05\x01\x00")
    assert recv_exactly(s, 2) == b"\x05\x00"
    name = host.encode()
    s.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + port.to_bytes(2, "big"))
    head = recv_exactly(s, 4)
    assert head[0] == 5, head
    alen = {1: 4, 4: 16}.get(head[3])
    if alen is None:
        alen = recv_exactly(s, 1)[0]
    recv_exactly(s, alen + 2)
    return s, head[1]


def recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return data


def recv_all(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data
