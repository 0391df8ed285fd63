"""dig against the DNS stub: cluster names answered by the namespace's DNS through the tunnel."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from itlib import DEMO_IP, TOMCAT_IP, clean_env

pytestmark = pytest.mark.skipif(shutil.which("dig") is None, reason="dig (dnsutils) is not installed")


def dig(plane, *args: str, tcp: bool = False) -> subprocess.CompletedProcess[str]:
    argv = ["dig", "@127.0.0.1", "-p", str(plane.dns_port), "+time=5", "+tries=1", *args]
    if tcp:
        argv.append("+tcp")
    return subprocess.run(argv, capture_output=True, text=True, env=clean_env(), timeout=30)


def short(plane, *args: str, tcp: bool = False) -> list[str]:
    r = dig(plane, "+short", *args, tcp=tcp)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.split("\n")[:-1]


def status(plane, *args: str, tcp: bool = False) -> str:
    r = dig(plane, *args, tcp=tcp)
    assert r.returncode == 0, r.stdout + r.stderr
    for line in r.stdout.splitlines():
        if "status:" in line:
            return line.split("status:")[1].split(",")[0].strip()
    raise AssertionError(r.stdout)


TRANSPORTS = pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])


@TRANSPORTS
@pytest.mark.parametrize("name", ["tomcat", "tomcat.default", "tomcat.default.svc.cluster.local"])
def test_a_record(dataplane, name, tcp):
    assert short(dataplane, name, "A", tcp=tcp) == [TOMCAT_IP]


@TRANSPORTS
def test_other_namespace(dataplane, tcp):
    assert short(dataplane, "demo.demo", "A", tcp=tcp) == [DEMO_IP]


@TRANSPORTS
def test_answer_owner_is_the_name_asked(dataplane, tcp):
    r = dig(dataplane, "+noall", "+answer", "tomcat", "A", tcp=tcp)
    fields = r.stdout.split()
    assert fields[0] == "tomcat." and fields[-1] == TOMCAT_IP, r.stdout


@TRANSPORTS
def test_srv(dataplane, tcp):
    assert short(dataplane, "_http._tcp.tomcat.default.svc.cluster.local", "SRV", tcp=tcp) == [
        "0 100 8080 tomcat.default.svc.cluster.local."]


@TRANSPORTS
def test_ptr(dataplane, tcp):
    assert short(dataplane, "-x", TOMCAT_IP, tcp=tcp) == ["tomcat.default.svc.cluster.local."]


@TRANSPORTS
@pytest.mark.parametrize("name", ["nosuchsvc", "nosuchsvc.default", "nosuchsvc.default.svc.cluster.local"])
def test_nxdomain(dataplane, name, tcp):
    assert status(dataplane, name, "A", tcp=tcp) == "NXDOMAIN"


@TRANSPORTS
def test_non_cluster_name_goes_to_the_upstream(dataplane, tcp):
    # The data plane was given a loopback fake upstream (--dns-upstream): never the machine's resolver.
    assert short(dataplane, "outside.example.test", "A", tcp=tcp) == ["127.0.0.9"]
    assert status(dataplane, "missing.example.test", "A", tcp=tcp) == "NXDOMAIN"


def test_malformed_query_then_still_serving(dataplane):
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff\xff", ("127.0.0.1", dataplane.dns_port))
        try:
            reply = s.recv(4096)
        except TimeoutError:
            reply = b""
        if reply:  # FORMERR, id kept
            assert reply[:2] == b"\x12\x34" and reply[3] & 0x0F == 1
    with socket.create_connection(("127.0.0.1", dataplane.dns_port), timeout=5) as s:
        s.sendall(b"\x00\x05hello")
        s.settimeout(5)
        data = s.recv(4096)
        while data and (more := s.recv(4096)):
            data += more
    assert short(dataplane, "tomcat", "A") == [TOMCAT_IP]


@TRANSPORTS
def test_aaaa(dataplane, tcp):
    from itlib import TOMCAT_IP6

    assert short(dataplane, "tomcat", "AAAA", tcp=tcp) == [TOMCAT_IP6]


def test_many_concurrent_queries(dataplane, tmp_path):
    batch = tmp_path / "batch"
    names = ["tomcat", "tomcat.default", "demo.demo", "nosuchsvc", "outside.example.test"] * 40
    batch.write_text("".join(f"{n} A\n" for n in names))
    r = dig(dataplane, "+short", "-f", str(batch))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split()
    assert lines.count(TOMCAT_IP) == 80 and lines.count(DEMO_IP) == 40 and lines.count("127.0.0.9") == 40


def _authority(plane, name: str) -> str:
    r = dig(plane, "+noall", "+authority", name, "A")
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_short_names_fall_back_and_tld_namespaces_do_not_capture(launcher, shadow):
    # B1, through the real data plane. Namespaces `test` and `dev` are "discovered" (--known-namespace):
    # - `test` is not an IANA TLD, so outside.example.test is a cluster name (x.y.<ns>); the cluster
    #   says NXDOMAIN and the stub asks the upstream, which knows it;
    # - `dev` is a TLD: web.dev never reaches the cluster (the upstream's NXDOMAIN has no cluster SOA).
    plane = launcher.start(shadow, "--known-namespace", "test", "--known-namespace", "dev")
    try:
        for tcp in (False, True):
            assert short(plane, "outside.example.test", "A", tcp=tcp) == ["127.0.0.9"]
        assert status(plane, "web.dev", "A") == "NXDOMAIN"
        assert "cluster.local" not in _authority(plane, "web.dev")
        # a name only the cluster could have keeps the cluster's NXDOMAIN
        assert "cluster.local" in _authority(plane, "nosuchsvc.test")
        assert short(plane, "tomcat", "A") == [TOMCAT_IP]
    finally:
        plane.stop()
