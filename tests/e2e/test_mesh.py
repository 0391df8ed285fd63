"""`ktctl mesh` on the real local cluster, ktctl run as an unprivileged user (issue 10).

The seed's mesh part verbatim (tomcat v1 in the cluster, "kt-connect local v2" on the laptop, the
printed header choosing), then what a team sharing one environment needs and kt-connect gets wrong:
two developers at once on ONE kept-alive connection that alternates routes, one leaving while the
other stays, SIGKILL of the router's creator then `clean` removing only the dead one's share,
WebSocket, HTTP/2 prior knowledge (a client pod and the laptop's curl), a raw byte stream, manual mode's
round-robin, refusals between mesh and exchange, and bad input leaving nothing behind.

The cluster side of the protocol tests is tests/e2e/mesh_upstreams.py in a pod ("cluster"); the laptop
side is the same script in this process ("laptop", "alice", "bob"); requests come from a client pod
running tests/e2e/mesh_clients.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest

pytest.register_assert_rewrite("ktctl_runner", "mesh_fixtures")
from ktctl_runner import (  # noqa: E402
    DEMO,
    LOCAL,
    RULE,
    Ktctl,
    error_lines,
    free_port,
    kt_annotations,
    kt_objects,
    kubectl,
    service,
    wait_for,
)
from mesh_fixtures import (  # noqa: E402
    MANUAL_BANNER,
    MeshClient,
    assert_restored,
    expose,
    heartbeat,
    mesh_header,
    mesh_label,
    mesh_objects,
    owned_by,
    pod,
    ref_count,
    router,
    router_routes,
    service_state,
    set_heartbeat,
)
from mesh_upstreams import serve_in_thread  # noqa: E402

pytestmark = pytest.mark.cluster
pytest_plugins = ["ktctl_runner", "mesh_fixtures"]  # ktctl, demo, local_server, mesh_workloads, mesh_client

URL = "http://tomcat:8080"
ECHO = "http://echo:80"
VALUE = re.compile(r"^[a-z]{5}$")  # kt-connect's default version mark: 5 random lower-case letters


@pytest.fixture
def settled(mesh_workloads: str, mesh_client: MeshClient) -> str:
    """Each test starts from the seed's state: v1 answers, nothing of ours in the namespace."""
    ns = mesh_workloads
    wait_for("tomcat to answer v1", lambda: mesh_client.body(URL) == DEMO, timeout=60)
    wait_for("nothing of ktproxy's left by an earlier test", lambda: kt_objects(ns) == [], timeout=90)
    return ns


@pytest.fixture(autouse=True)
def _stop_leftover_runs(ktctl: Ktctl):
    """A failed test's meshes are stopped (Ctrl-C) at its end, not at the module's: the next test starts
    from a clean namespace and fails only for its own reasons."""
    yield
    for bg in ktctl.running:
        if bg.proc.poll() is None:
            bg.stop()


@pytest.fixture
def echo_svc(settled: str, mesh_client: MeshClient) -> str:
    """Service echo, port 80 -> target port 8080, selecting the "cluster" upstream."""
    expose(settled, "echo", {"app": "echo"}, 80, 8080)
    wait_for("echo to answer from the cluster",
             lambda: mesh_client.body(ECHO) == "cluster http/1.1", timeout=60)
    return settled


def _image() -> list[str]:
    """KTPROXY_E2E_MESH_IMAGE=IMG runs shadows and router from IMG (how a deliberately broken router was
    shown to turn these tests red without touching the shared image)."""
    image = os.environ.get("KTPROXY_E2E_MESH_IMAGE")
    return ["-i", image] if image else []


def _mesh(ktctl: Ktctl, svc: str, expose_arg: str, *extra: str, user: str | None = None):
    env = {"KTCTL_USER": user} if user else {}
    return ktctl.start("mesh", svc, "--expose", expose_arg, *extra, *_image(), **env)


# ------------------------------------------------------------------------------------------ the seed
def test_seed_mesh_and_ctrl_c(ktctl: Ktctl, settled: str, mesh_client: MeshClient, local_server: int) -> None:
    ns = settled
    before = service_state(ns, "tomcat")
    m = ktctl.start("mesh", "tomcat", "--expose", "8080", *_image())
    key, value = mesh_header(m)
    assert key == "VERSION" and VALUE.match(value), m.output()
    lines = m.output().splitlines()
    at = next(i for i, line in enumerate(lines) if "Now you can access your service by header" in line)
    assert lines[at - 1].rstrip().endswith(RULE) and lines[at + 1].rstrip().endswith(RULE), m.output()
    # The route is live before the banner: the very first requests are answered right, without retries.
    assert mesh_client.body(URL) == DEMO
    assert mesh_client.body(URL, f"VERSION: {value}") == LOCAL
    assert mesh_client.body(URL, f"version: {value}") == LOCAL  # the header name in any case
    assert mesh_client.body(URL, f"VERSION: {value.upper()}") == DEMO  # the value exactly
    # The design's objects: router (no API credentials), stuntman, this developer's service and shadow.
    r = router(ns, "tomcat")
    assert r is not None, kt_objects(ns)
    ann = r["metadata"]["annotations"]
    assert ann.get("kt-mesh-routes") == f"version:{value}" and ann.get("kt-ref-count") == "1", ann
    assert r["spec"].get("automountServiceAccountToken") is False
    objs = kt_objects(ns)
    for name in ("pod/tomcat-kt-router", "service/tomcat-kt-stuntman", f"service/tomcat-kt-mesh-{value}",
                 f"pod/tomcat-kt-mesh-{value}"):
        assert name in objs, objs
    svc = service(ns, "tomcat")
    assert svc["spec"]["selector"].get("kt-role") == "router", svc["spec"]["selector"]
    assert json.loads(kt_annotations(svc)["kt-selector"]) == {"app": "tomcat"}
    assert service(ns, "tomcat-kt-stuntman")["spec"]["selector"] == {"app": "tomcat"}
    assert m.stop(signal.SIGINT) in (0, 130), m.output()
    # Nothing sends the service's traffic into a void: the first request after Ctrl-C is the pods'.
    assert mesh_client.body(URL) == DEMO
    assert mesh_client.body(URL, f"VERSION: {value}") == DEMO
    assert_restored(ns, "tomcat", before)
    assert not error_lines(m.output()), m.output()


# ------------------------------------------------------------------------------------ two developers
def _expect(session, cases: list[tuple[list[tuple[str, str]], str]], conn: int | None = None,
            client_ip: str = "") -> int:
    """Ask each case on the kept-alive connection; every answer from the expected upstream, one connection."""
    for headers, upstream in cases:
        r = session.ask(headers)
        assert "error" not in r, (headers, r)
        assert (r["status"], r["upstream"]) == (200, upstream), (headers, r)
        assert r["seen_host"] == "echo:80", r  # the router keeps the Host header
        assert client_ip and client_ip in r["seen_xff"], r  # ... and says who asked
        if conn is None:
            conn = r["conn"]
        assert r["conn"] == conn, "the client's connection changed"
    assert conn is not None
    return conn


def test_two_developers_one_kept_alive_connection(ktctl: Ktctl, echo_svc: str, mesh_client: MeshClient) -> None:
    ns = echo_svc
    before = service_state(ns, "echo")
    with serve_in_thread("alice") as pa, serve_in_thread("bob") as pb:
        # Both at once: the shared router and its ref count are set up by two racing processes.
        alice = _mesh(ktctl, "echo", f"{pa}:8080", "--version-mark", "alice", user="alice")
        bob = _mesh(ktctl, "echo", f"{pb}:8080", "--version-mark", "version:bob", user="bob")
        assert mesh_header(alice) == ("VERSION", "alice")
        assert mesh_header(bob) == ("VERSION", "bob")
        assert router_routes(ns, "echo") == ["version:alice", "version:bob"]
        assert ref_count(ns, "echo") == "2"
        session = mesh_client.session("echo", 80)
        try:
            ip = mesh_client.ip
            conn = _expect(session, [
                ([], "cluster"), ([("VERSION", "alice")], "alice"), ([("VERSION", "bob")], "bob"),
                ([("VERSION", "zzzzz")], "cluster"), ([("VERSION", "alice")], "alice"), ([], "cluster"),
                ([("Version", "bob")], "bob"), ([("version", "alice")], "alice"), ([("VERSION", "Alice")], "cluster"),
                ([("X-Other", "alice")], "cluster"),
            ], client_ip=ip)
            # One leaves; the same connection keeps going, alice's value now reaches the cluster.
            assert alice.stop() in (0, 130), alice.output()
            assert router_routes(ns, "echo") == ["version:bob"] and ref_count(ns, "echo") == "1"
            assert mesh_objects(ns, "echo", "alice") == []
            _expect(session, [([("VERSION", "bob")], "bob"), ([("VERSION", "alice")], "cluster"), ([], "cluster"),
                              ([("VERSION", "bob")], "bob")], conn, ip)
            assert service(ns, "echo")["spec"]["selector"].get("kt-role") == "router"
        finally:
            session.close()
        # A new connection sees the same.
        assert mesh_client.get(ECHO, "VERSION: bob")["upstream"] == "bob"
        assert mesh_client.get(ECHO, "VERSION: alice")["upstream"] == "cluster"
        # The last one out restores everything.
        assert bob.stop() in (0, 130), bob.output()
        assert mesh_client.get(ECHO, "VERSION: bob")["upstream"] == "cluster"
    assert_restored(ns, "echo", before)
    for m in (alice, bob):
        assert not error_lines(m.output()), m.output()


def test_sigkill_of_the_creator_then_clean(ktctl: Ktctl, echo_svc: str, mesh_client: MeshClient) -> None:
    """kt-connect heart-beats router and stuntman only from their creator: once it died, `clean` broke every
    other mesh. Here the survivor keeps them alive, and clean removes only the dead one's share."""
    ns = echo_svc
    before = service_state(ns, "echo")
    with serve_in_thread("alice") as pa, serve_in_thread("bob") as pb:
        alice = _mesh(ktctl, "echo", f"{pa}:8080", "--version-mark", "alice", user="alice")
        mesh_header(alice)  # alice creates router and stuntman
        bob = _mesh(ktctl, "echo", f"{pb}:8080", "--version-mark", "bob", user="bob")
        mesh_header(bob)
        try:
            alice.kill()
            assert mesh_client.get(ECHO, "VERSION: bob")["upstream"] == "bob"
            assert mesh_client.get(ECHO)["upstream"] == "cluster"
            # The dead laptop's route: a 502 naming it, at once, not a hang.
            dead = mesh_client.get(ECHO, "VERSION: alice")
            assert dead.get("status") == 502 and "alice" in dead.get("body", ""), dead
            # Alice's heartbeats stop; the shared objects' must come back from bob's process.
            past = int(time.time()) - 3600
            shared = ["pod/echo-kt-router", "service/echo-kt-stuntman"]
            alices = sorted((set(mesh_objects(ns, "echo", "alice")) | set(owned_by(ns, "alice"))) - set(shared))
            assert alices, kt_objects(ns)
            set_heartbeat(ns, alices + shared, past)
            wait_for("bob's process to heart-beat the router and the stuntman", lambda: all(
                (heartbeat(ns, o) or 0) > past + 600 for o in shared), timeout=200, interval=2)
            r = ktctl.run("clean")
            assert r.returncode == 0, r.stdout + r.stderr
            assert not set(alices) & set(kt_objects(ns)), kt_objects(ns)
            assert mesh_objects(ns, "echo", "bob"), kt_objects(ns)
            assert router_routes(ns, "echo") == ["version:bob"] and ref_count(ns, "echo") == "1"
            assert service(ns, "echo")["spec"]["selector"].get("kt-role") == "router"
            assert mesh_client.get(ECHO, "VERSION: bob")["upstream"] == "bob"
            wait_for("alice's value to reach the cluster again",
                     lambda: mesh_client.get(ECHO, "VERSION: alice").get("upstream") == "cluster", timeout=30)
            assert mesh_client.get(ECHO)["upstream"] == "cluster"
            assert bob.stop() in (0, 130), bob.output()
        finally:
            if bob.proc.poll() is None:
                bob.stop()
            ktctl.run("recover", "echo")
    assert_restored(ns, "echo", before)


# ------------------------------------------------------------------------------------------ protocols
@pytest.fixture
def proto_mesh(ktctl: Ktctl, settled: str, mesh_client: MeshClient):
    """Service proto (8080 -> 8080) on the cluster upstream, meshed to a "laptop" upstream here."""
    ns = settled
    expose(ns, "proto", {"app": "echo"}, 8080, 8080)
    wait_for("proto to answer from the cluster",
             lambda: mesh_client.body("http://proto:8080") == "cluster http/1.1", timeout=60)
    before = service_state(ns, "proto")
    with serve_in_thread("laptop") as port:
        m = _mesh(ktctl, "proto", f"{port}:8080")
        key, value = mesh_header(m)
        yield ns, f"{key}: {value}", value
        assert m.stop() in (0, 130), m.output()
    assert_restored(ns, "proto", before)
    kubectl("-n", ns, "delete", "svc", "proto")


def test_websocket_with_and_without_the_header(proto_mesh, mesh_client: MeshClient) -> None:
    _ns, header, value = proto_mesh
    mine = mesh_client.ws("proto", 8080, ["hello", "again"], header)
    assert mine == {"status": 101, "upstream": "laptop", "echoes": ["laptop:hello", "laptop:again"],
                    "closed": True}, mine
    other = mesh_client.ws("proto", 8080, ["hello", "again"])
    assert other == {"status": 101, "upstream": "cluster", "echoes": ["cluster:hello", "cluster:again"],
                     "closed": True}, other
    unknown = mesh_client.ws("proto", 8080, ["x"], f"VERSION: {value}x")
    assert unknown.get("echoes") == ["cluster:x"], unknown


def test_pipelined_chunked_and_head_requests(proto_mesh, mesh_client: MeshClient) -> None:
    """Requests written back to back before any answer, alternating routes, with chunked and
    Content-Length bodies and a HEAD among them: answered in order, each by its own upstream."""
    _ns, header, value = proto_mesh
    key = header.split(":")[0]
    mine = [[key, value]]
    answers = mesh_client.pipeline("proto", 8080, [
        {"method": "POST", "headers": mine, "body": "x" * 5000, "chunked": True},
        {"method": "GET"},
        {"method": "HEAD", "headers": mine},
        {"method": "POST", "body": "y" * 3000},
        {"method": "GET", "headers": mine},
        {"method": "POST", "body": "z" * 100, "chunked": True},
    ])
    assert [(a.get("status"), a.get("upstream"), a.get("body")) for a in answers] == [
        (200, "laptop", "laptop http/1.1"), (200, "cluster", "cluster http/1.1"), (200, "laptop", ""),
        (200, "cluster", "cluster http/1.1"), (200, "laptop", "laptop http/1.1"),
        (200, "cluster", "cluster http/1.1")], answers


def test_http2_prior_knowledge_per_stream(proto_mesh, mesh_client: MeshClient) -> None:
    """One HTTP/2 connection, its streams opened at once, each routed by its own header; both upstreams are
    spoken to in HTTP/2 (their answer names the protocol they received)."""
    _ns, header, value = proto_mesh
    key = header.split(":")[0]
    answers = mesh_client.h2("proto", 8080, [[], [(key.lower(), value)], [(key.lower(), "nope")], [],
                                             [(key.lower(), value)]])
    assert [(a["status"], a["body"]) for a in answers] == [
        (200, "cluster h2"), (200, "laptop h2"), (200, "cluster h2"), (200, "cluster h2"), (200, "laptop h2")], answers


def test_http2_prior_knowledge_curl_from_the_laptop(proto_mesh, ktctl: Ktctl) -> None:
    """The laptop's curl --http2-prior-knowledge through `ktctl forward` to the Service's cluster IP."""
    ns, header, _value = proto_mesh
    ip = service(ns, "proto")["spec"]["clusterIP"]
    local = free_port()
    fwd = ktctl.start("forward", ip, f"{local}:8080")
    fwd.wait_banner(f"localhost:{local}")
    try:
        def curl(*extra: str) -> str:
            r = subprocess.run(["curl", "-sS", "--noproxy", "*", "--max-time", "20", "--http2-prior-knowledge",
                                "-w", " %{http_version}", *extra, f"http://127.0.0.1:{local}/"],
                               capture_output=True, text=True, timeout=30)
            return r.stdout.strip() or r.stderr.strip()

        assert curl("-H", header) == "laptop h2 2"
        assert curl() == "cluster h2 2"
    finally:
        assert fwd.stop() in (0, 130)


def test_raw_bytes_pass_through_untouched(proto_mesh, mesh_client: MeshClient) -> None:
    out = mesh_client.raw("proto", 8080, 200_000, 3)
    assert [(a["name"], a["ok"]) for a in out.get("answers", [])] == [("cluster", True)] * 3, out


# ------------------------------------------------------------------------------------------ manual
def test_manual_mode_round_robin(ktctl: Ktctl, settled: str, mesh_client: MeshClient, local_server: int) -> None:
    ns = settled
    before = service_state(ns, "tomcat")
    m = ktctl.start("mesh", "tomcat", "--expose", "8080", "--mode", "manual")
    key, value = mesh_label(m)
    assert key == "version" and VALUE.match(value), m.output()
    shadow = pod(ns, f"tomcat-kt-mesh-{value}")
    assert shadow is not None, kt_objects(ns)
    labels = shadow["metadata"]["labels"]
    assert labels.get("app") == "tomcat" and labels.get("version") == value, labels
    assert service_state(ns, "tomcat") == before  # manual mode leaves the service alone
    assert router(ns, "tomcat") is None
    seen: set[str] = set()

    def both() -> bool:
        seen.update(mesh_client.bodies(URL, 20))
        return {DEMO, LOCAL} <= seen

    wait_for("requests to reach both the pods and the laptop", both, timeout=120, interval=0)
    assert seen == {DEMO, LOCAL}, seen
    assert m.stop() in (0, 130), m.output()
    assert MANUAL_BANNER in m.output()
    assert_restored(ns, "tomcat", before)
    assert set(mesh_client.bodies(URL, 10)) == {DEMO}


# ------------------------------------------------------------------------------------------ refusals
def test_mesh_and_exchange_refuse_each_other(ktctl: Ktctl, settled: str, mesh_client: MeshClient,
                                            local_server: int) -> None:
    ns = settled
    before = service_state(ns, "tomcat")
    ex = ktctl.start("exchange", "tomcat", "--expose", "8080", KTCTL_USER="carol")
    ex.wait_banner("Now all request to service 'tomcat' will be redirected to local")
    r = ktctl.run("mesh", "tomcat", "--expose", "8080", KTCTL_USER="dave", timeout=120)
    errors = error_lines(r.stderr)
    assert r.returncode != 0 and len(errors) == 1 and "carol" in errors[0], r.stderr
    assert not [o for o in kt_objects(ns) if "-kt-mesh-" in o or "-kt-router" in o or "-kt-stuntman" in o]
    assert ex.stop() in (0, 130)
    assert_restored(ns, "tomcat", before)

    m = ktctl.start("mesh", "tomcat", "--expose", "8080", "--version-mark", "taken", KTCTL_USER="carol")
    mesh_header(m)
    r = ktctl.run("exchange", "tomcat", "--expose", "8080", KTCTL_USER="dave", timeout=120)
    errors = error_lines(r.stderr)
    assert r.returncode != 0 and len(errors) == 1 and "carol" in errors[0], r.stderr
    # The same value twice: refused in one line, the first mesh untouched.
    r = ktctl.run("mesh", "tomcat", "--expose", "8080", "--version-mark", "taken", KTCTL_USER="dave", timeout=120)
    errors = error_lines(r.stderr)
    assert r.returncode != 0 and len(errors) == 1 and "taken" in errors[0], r.stderr
    assert mesh_client.body(URL, "VERSION: taken") == LOCAL
    assert ref_count(ns, "tomcat") == "1"
    assert m.stop() in (0, 130)
    assert_restored(ns, "tomcat", before)


@pytest.mark.parametrize("args, message", [
    (["mesh", "no-such-svc", "--expose", "8080"], "no-such-svc"),
    (["mesh", "tomcat", "--expose", "8080", "--version-mark", "UPPER_case"], "UPPER_case"),
    (["mesh", "tomcat", "--expose", "8080", "--version-mark", "bad key:abc"], "bad key"),
    (["mesh", "tomcat", "--expose", "8080:9999"], "9999"),
    (["mesh", "tomcat", "--expose", "8080", "--mode", "nope"], "nope"),
    (["mesh", "tomcat", "--expose", "8080:9999", "--mode", "manual"], "9999"),
])
def test_bad_input_one_line_nothing_left(ktctl: Ktctl, settled: str, local_server: int, args: list[str],
                                         message: str) -> None:
    before = service_state(settled, "tomcat")
    r = ktctl.run(*args, timeout=60)
    assert r.returncode != 0
    errors = error_lines(r.stderr) or [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], r.stderr
    assert kt_objects(settled) == []
    assert service_state(settled, "tomcat") == before
