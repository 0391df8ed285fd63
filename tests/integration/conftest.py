"""Integration fixtures: the namespace that plays the cluster, the shadow sshd in it, the data plane on
the host (see itlib.py for the layout and the helpers)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from itlib import (
    CLUSTER_CIDR6,
    CLUSTER_DNS_IP,
    DEMO_IP,
    DEMO_MARKER,
    GUARD_ROUTE,
    HALFCLOSE_PORT,
    HERE,
    LOCAL_MARKER,
    OUTSIDE_IP,
    OUTSIDE_MARKER,
    PY,
    SHADOW_PORT,
    STALL_PORT,
    TOMCAT_IP,
    TOMCAT_IP6,
    TOMCAT_MARKER,
    ZONE,
    DataPlane,
    Keys,
    Launcher,
    NetNS,
    Shadow,
    netns_unavailable,
    sh,
    stop,
    wait_for,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.netns)


@pytest.fixture(scope="session")
def netns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetNS]:
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    pid = os.getpid()
    name = f"ktp-it-{pid}"
    x = pid % 199 + 1
    ns = NetNS(name, f"10.250.{x}.1", f"10.250.{x}.2", tmp_path_factory.mktemp("netns"))
    veth_host, veth_ns = f"ktpit{pid}h"[:15], f"ktpit{pid}n"[:15]
    etc = Path("/etc/netns") / name
    services: subprocess.Popen[bytes] | None = None
    try:
        # The guard first: from here on nothing in 10.250.0.0/15 can leave through the default route.
        res = sh("ip", "route", "add", "unreachable", GUARD_ROUTE, check=False)
        if res.returncode != 0 and "File exists" not in res.stderr:
            raise RuntimeError(f"cannot add the guard route: {res.stderr.strip()}")
        res = sh("ip", "-6", "route", "add", "unreachable", CLUSTER_CIDR6, check=False)
        if res.returncode != 0 and "File exists" not in res.stderr:
            raise RuntimeError(f"cannot add the IPv6 guard route: {res.stderr.strip()}")
        sh("ip", "netns", "add", name)
        sh("ip", "link", "add", veth_host, "type", "veth", "peer", "name", veth_ns, "netns", name)
        sh("ip", "addr", "add", f"{ns.host_ip}/24", "dev", veth_host)
        sh("ip", "link", "set", veth_host, "up")
        sh(*ns.exec("ip", "link", "set", "lo", "up"))
        sh(*ns.exec("ip", "addr", "add", f"{ns.ns_ip}/24", "dev", veth_ns))
        sh(*ns.exec("ip", "link", "set", veth_ns, "up"))
        for ip in (TOMCAT_IP, DEMO_IP, CLUSTER_DNS_IP, OUTSIDE_IP):
            sh(*ns.exec("ip", "addr", "add", f"{ip}/32", "dev", "lo"))
        sh(*ns.exec("ip", "-6", "addr", "add", f"{TOMCAT_IP6}/128", "dev", "lo", "nodad"))
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(
            "search default.svc.cluster.local svc.cluster.local cluster.local\n"
            f"nameserver {CLUSTER_DNS_IP}\noptions ndots:5 timeout:1 attempts:1\n")
        # This machine's own name, so nothing in NS asks the namespace's DNS for it.
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {socket.gethostname()}\n")
        config = ns.workdir / "services.json"
        ready = ns.workdir / "services.ready"
        config.write_text(json.dumps({
            "http": [
                {"addr": TOMCAT_IP, "port": 8080, "marker": TOMCAT_MARKER},
                {"addr": DEMO_IP, "port": 80, "marker": DEMO_MARKER},
                {"addr": OUTSIDE_IP, "port": 8080, "marker": OUTSIDE_MARKER},
                {"addr": TOMCAT_IP6, "port": 8080, "marker": TOMCAT_MARKER},
            ],
            "stall": [[TOMCAT_IP, STALL_PORT]],
            "halfclose": [[TOMCAT_IP, HALFCLOSE_PORT]],
            "dns": [CLUSTER_DNS_IP, 53],
            "records": ZONE,
            "ready_file": str(ready),
        }))
        log = ns.workdir / "services.log"
        with open(log, "wb") as out:
            services = subprocess.Popen(ns.exec(PY, str(HERE / "ns_services.py"), str(config)),
                                        stdout=out, stderr=subprocess.STDOUT)
        ns.procs.append(services)
        wait_for(ready.exists, 15, "namespace services", services, log)
        yield ns
    finally:
        for proc in ns.procs:
            stop(proc)
        sh("ip", "netns", "del", name, check=False)  # takes the veth pair with it
        sh("ip", "link", "del", veth_host, check=False)
        shutil.rmtree(etc, ignore_errors=True)
        with contextlib.suppress(OSError):
            etc.parent.rmdir()  # only if empty
        # The guard routes stay: another run may have started meanwhile and relies on them (it saw "File
        # exists" and did not add its own), and an `unreachable` route for the tests' own ranges is
        # harmless to leave behind. Deleting them raced with those runs.


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    import asyncssh

    d = tmp_path_factory.mktemp("keys")
    client = asyncssh.generate_private_key("ssh-ed25519")
    host = asyncssh.generate_private_key("ssh-ed25519")
    other = asyncssh.generate_private_key("ssh-ed25519")
    k = Keys(d / "id", d / "authorized_keys", d / "host_key", d / "host_key.pub", d / "wrong_authorized_keys")
    client.write_private_key(str(k.identity))
    k.authorized_keys.write_bytes(client.export_public_key())
    host.write_private_key(str(k.host_key))
    k.host_key_pub.write_bytes(host.export_public_key())
    k.wrong_authorized_keys.write_bytes(other.export_public_key())
    for p in d.iterdir():
        p.chmod(0o600)
    return k


@pytest.fixture(scope="session")
def shadow(netns: NetNS, keys: Keys) -> Iterator[Shadow]:
    s = Shadow(netns, keys, SHADOW_PORT).start()
    yield s
    s.stop()




@pytest.fixture(scope="session")
def fake_upstream() -> Iterator[tuple[str, int]]:
    """A loopback resolver for non-cluster names: the stub must never ask the machine's real one."""
    from dnslib import RR, DNSRecord
    from dnslib.server import BaseResolver, DNSLogger, DNSServer

    class Resolver(BaseResolver):
        def resolve(self, request: DNSRecord, handler: object) -> DNSRecord:
            reply = request.reply()
            if str(request.q.qname).rstrip(".") == "outside.example.test" and request.q.qtype == 1:
                reply.add_answer(*RR.fromZone("outside.example.test. 60 IN A 127.0.0.9"))
            else:
                reply.header.rcode = 3
            return reply

    server = DNSServer(Resolver(), address="127.0.0.1", port=0,
                       logger=DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data"))
    server.start_thread()
    yield "127.0.0.1", server.server.server_address[1]
    server.stop()


@pytest.fixture(scope="session")
def launcher(netns: NetNS, keys: Keys, fake_upstream: tuple[str, int],
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    lau = Launcher(netns, keys, fake_upstream, tmp_path_factory.mktemp("dataplane"))
    yield lau
    lau.stop_all()
    # Whatever the tests did, the data plane must never have logged a traceback.
    broken = [p.name for p in lau.workdir.glob("dataplane-*.log")
              if p.name not in lau.known_tracebacks and "Traceback" in p.read_text(errors="replace")]
    assert not broken, f"tracebacks in {broken} (under {lau.workdir})"




@pytest.fixture(scope="session")
def dataplane(launcher: Launcher, shadow: Shadow) -> DataPlane:
    """The data plane most tests share (cluster routing, no auth, loopback)."""
    return launcher.start(shadow)




@pytest.fixture(scope="session")
def local_http() -> Iterator[tuple[str, int]]:
    """An HTTP server on the host's loopback: a non-cluster destination the proxy must reach DIRECT."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:
            body = f"{LOCAL_MARKER} peer={self.client_address[0]}\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield "127.0.0.1", server.server_address[1]
    server.shutdown()
    server.server_close()
