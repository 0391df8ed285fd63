"""Two developers on one Service (issue 18, item 6): two kubeconfig users, two ktctl processes.

alice and bob are two cluster identities (client certificates signed by the local cluster's CA, each
bound to the `edit` ClusterRole in the test namespace only), each with their own kubeconfig, home and
laptop server, and $USER (ktctl's kt-user, the name a refusal prints). Both run ktctl as the same
unprivileged OS account, as two laptops would, in separate processes.

  exchange vs exchange         the second is refused in one line naming the first, leaves nothing, and
                               can have the Service once the first left
  exchange vs mesh, both ways  the same
  mesh vs mesh, two marks      each gets its own header's requests, the rest reach the pods; either may
                               leave first and the other keeps working
  recover while the other is   the Service is put back and stays so; the exchange's guard stands down,
  alive                        says so and the exchange ends (exit 1); the other then exchanges alone

After every case the Service is exactly as it started (selector, ports, annotations, labels) and no kt
object is left. Requests come from a client pod with and without the headers (mesh_clients.py).
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.register_assert_rewrite("ktctl_runner", "mesh_fixtures")
from ktctl_runner import (  # noqa: E402
    DEMO,
    ROOT,
    Background,
    Ktctl,
    error_lines,
    free_port,
    kt_annotations,
    kt_objects,
    kubectl,
    serve_page,
    service,
    wait_for,
)
from mesh_fixtures import (  # noqa: E402
    MeshClient,
    assert_restored,
    mesh_header,
    mesh_objects,
    owned_by,
    router,
    router_routes,
    scripts_configmap,
    service_state,
)

pytestmark = pytest.mark.cluster
pytest_plugins = ["ktctl_runner", "mesh_fixtures"]  # unprivileged_user, user_ktctl, demo, module_namespace

PKI = ROOT / ".cluster" / "pki"
SVC = "tomcat"
URL = "http://tomcat:8080"
EXCHANGED = "Now all request to service 'tomcat' will be redirected to local"
GUARD_INTERVALS = 7  # seconds: more than 3 of the exchange guard's 2 s polls


# ------------------------------------------------------------------------------------------ developers
class Developer(Ktctl):
    """ktctl as one developer: their own kubeconfig (a cluster user of their own), home and $USER."""

    def __init__(self, name: str, user, kubeconfig: str, home: str, namespace: str, port: int) -> None:
        super().__init__(user, kubeconfig, namespace)
        self.name = name
        self.home = home
        self.port = port  # this developer's laptop server
        self.page = f"kt-connect local {name}"

    def env(self, **extra: str) -> dict[str, str]:
        return super().env(HOME=self.home, USER=self.name, KUBECONFIG=self.kubeconfig, **extra)

    def exchange(self) -> Background:
        return self.start("exchange", SVC, "--expose", f"{self.port}:8080")

    def mesh(self) -> Background:
        return self.start("mesh", SVC, "--expose", f"{self.port}:8080", "--version-mark", f"version:{self.name}")

    def refused(self, *args: str) -> str:
        """Run a command that must be refused: non-zero, exactly one error line, which it returns."""
        r = self.run(*args, timeout=120)
        errors = error_lines(r.stderr)
        assert r.returncode != 0 and len(errors) == 1, f"{self.name}: ktctl {' '.join(args)}\n{r.stderr}"
        assert "Traceback" not in r.stderr, r.stderr
        return errors[0]


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


def _client_certificate(name: str, where: Path) -> tuple[Path, Path]:
    """A key and a certificate for user `name` signed by the cluster's CA (nothing written under pki)."""
    key, csr, crt = where / f"{name}.key", where / f"{name}.csr", where / f"{name}.crt"
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key))
    _openssl("req", "-new", "-key", str(key), "-subj", f"/O=kt-e2e-developers/CN={name}", "-out", str(csr))
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(PKI / "ca.crt"), "-CAkey", str(PKI / "ca.key"),
             "-set_serial", f"0x{secrets.token_hex(16)}", "-days", "1", "-out", str(crt))
    return key, crt


def _developer(name: str, user, namespace: str, port: int, where: Path) -> Developer:
    key, crt = _client_certificate(name, where)
    kubectl("-n", namespace, "create", "rolebinding", f"kt-e2e-{name}", "--clusterrole=edit", f"--user={name}")
    server = kubectl("config", "view", "--minify", "-o", "jsonpath={.clusters[0].cluster.server}").stdout
    home = where / name
    home.mkdir()
    cfg = home / "kubeconfig"
    cfg.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": name,
        "clusters": [{"name": "local", "cluster": {"server": server,
                                                   "certificate-authority-data": _b64(PKI / "ca.crt")}}],
        "users": [{"name": name, "user": {"client-certificate-data": _b64(crt), "client-key-data": _b64(key)}}],
        "contexts": [{"name": name, "context": {"cluster": "local", "user": name, "namespace": namespace}}],
    }))
    for p in (home, cfg):
        shutil.chown(p, user.pw_uid, user.pw_gid)
    home.chmod(0o700)
    cfg.chmod(0o600)
    return Developer(name, user, str(cfg), str(home), namespace, port)


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def developers(unprivileged_user, user_ktctl, demo: str) -> Iterator[tuple[Developer, Developer]]:
    if not (PKI / "ca.key").is_file():
        pytest.skip(f"{PKI / 'ca.key'} missing: the developers' certificates are signed by the local cluster's CA")
    where = Path(tempfile.mkdtemp(prefix="ktp-e2e-devs-"))
    where.chmod(0o755)
    try:
        with serve_page(free_port(), "kt-connect local alice") as pa, serve_page(free_port(),
                                                                                "kt-connect local bob") as pb:
            alice = _developer("alice", unprivileged_user, demo, pa, where)
            bob = _developer("bob", unprivileged_user, demo, pb, where)
            for dev in (alice, bob):  # the premise: two identities, each with rights in this namespace only
                as_dev = ("--kubeconfig", dev.kubeconfig)
                who = kubectl(*as_dev, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}").stdout
                assert who.strip() == dev.name
                assert kubectl(*as_dev, "auth", "can-i", "patch", "services", "-n", demo).stdout.strip() == "yes"
                assert kubectl(*as_dev, "auth", "can-i", "list", "pods", "-A", check=False).stdout.strip() == "no"
            yield alice, bob
            for dev in (alice, bob):
                dev.stop_all()
    finally:
        shutil.rmtree(where, ignore_errors=True)


@pytest.fixture(scope="module")
def client(demo: str) -> MeshClient:
    scripts_configmap(demo)
    return MeshClient(demo)


@pytest.fixture(scope="module")
def pristine(demo: str) -> dict:
    """The Service as the seed made it, before any developer touched it."""
    return service_state(demo, SVC)


@pytest.fixture
def devs(developers: tuple[Developer, Developer], client: MeshClient, pristine: dict,
         demo: str) -> Iterator[tuple[Developer, Developer]]:
    """Each case starts from the seed's state; a failed case's processes are stopped and the Service
    recovered at its end, so the next case fails only for its own reasons."""
    wait_for("tomcat to answer v1", lambda: client.body(URL) == DEMO, timeout=60)
    wait_for("nothing of ktproxy's left by an earlier case", lambda: kt_objects(demo) == [], timeout=90)
    assert service_state(demo, SVC) == pristine
    yield developers
    for dev in developers:
        for bg in dev.running:
            if bg.proc.poll() is None:
                bg.stop()
        dev.running.clear()
    if service_state(demo, SVC) != pristine or kt_objects(demo):
        developers[0].run("recover", SVC, timeout=120)


def _holder(ns: str) -> str | None:
    return kt_annotations(service(ns, SVC)).get("kt-user")


def _stop(bg: Background) -> None:
    assert bg.stop() in (0, 130), bg.output()
    assert not error_lines(bg.output()), bg.output()


# ------------------------------------------------------------------------------------------ the cases
def test_exchange_vs_exchange(devs, client: MeshClient, demo: str, pristine: dict) -> None:
    alice, bob = devs
    a = alice.exchange()
    a.wait_banner(EXCHANGED)
    assert client.body(URL) == alice.page
    held = service_state(demo, SVC)
    objects = kt_objects(demo)
    line = bob.refused("exchange", SVC, "--expose", f"{bob.port}:8080")
    assert "'tomcat' is already exchanged by alice" in line, line
    # bob left nothing and changed nothing: alice's exchange is untouched.
    assert owned_by(demo, "bob") == [] and kt_objects(demo) == objects
    assert service_state(demo, SVC) == held and _holder(demo) == "alice"
    assert client.body(URL) == alice.page
    _stop(a)
    assert service_state(demo, SVC) == pristine
    assert client.body(URL) == DEMO
    assert_restored(demo, SVC, pristine)
    # The refusal left no lock behind: once alice has gone, bob's exchange goes through.
    b = bob.exchange()
    b.wait_banner(EXCHANGED)
    assert client.body(URL) == bob.page and _holder(demo) == "bob"
    _stop(b)
    assert_restored(demo, SVC, pristine)


@pytest.mark.parametrize("first", ["exchange", "mesh"])
def test_exchange_vs_mesh(devs, client: MeshClient, demo: str, pristine: dict, first: str) -> None:
    """alice does `first`, bob the other: bob is refused naming alice and leaves nothing."""
    alice, bob = devs
    if first == "exchange":
        a = alice.exchange()
        a.wait_banner(EXCHANGED)
        assert client.body(URL) == alice.page
        second = ("mesh", SVC, "--expose", f"{bob.port}:8080", "--version-mark", "version:bob")
    else:
        a = alice.mesh()
        assert mesh_header(a) == ("VERSION", "alice")
        assert client.body(URL, "VERSION: alice") == alice.page and client.body(URL) == DEMO
        second = ("exchange", SVC, "--expose", f"{bob.port}:8080")
    held = service_state(demo, SVC)
    objects = kt_objects(demo)
    routes = router_routes(demo, SVC)
    line = bob.refused(*second)
    assert f"'tomcat' is already {'exchanged' if first == 'exchange' else 'meshed'} by alice" in line, line
    assert owned_by(demo, "bob") == [] and kt_objects(demo) == objects
    assert service_state(demo, SVC) == held and router_routes(demo, SVC) == routes
    if first == "exchange":
        assert router(demo, SVC) is None
        assert client.body(URL) == alice.page
    else:
        assert client.body(URL, "VERSION: alice") == alice.page
        assert client.body(URL, "VERSION: bob") == DEMO and client.body(URL) == DEMO
    _stop(a)
    assert client.body(URL) == DEMO
    assert_restored(demo, SVC, pristine)


@pytest.mark.parametrize("leaves_first", ["alice", "bob"])
def test_mesh_vs_mesh_different_marks(devs, client: MeshClient, demo: str, pristine: dict,
                                      leaves_first: str) -> None:
    alice, bob = devs
    a = alice.mesh()
    assert mesh_header(a) == ("VERSION", "alice")
    b = bob.mesh()  # joins alice's router
    assert mesh_header(b) == ("VERSION", "bob")
    assert router_routes(demo, SVC) == ["version:alice", "version:bob"]
    for headers, page in [((), DEMO), (("VERSION: alice",), alice.page), (("VERSION: bob",), bob.page),
                          (("VERSION: carol",), DEMO), (("version: bob",), bob.page)]:
        assert client.body(URL, *headers) == page, headers
    first, stays = (alice, bob) if leaves_first == "alice" else (bob, alice)
    runs = {"alice": a, "bob": b}
    _stop(runs[first.name])
    # The one who stays keeps working; the leaver's header now reaches the pods.
    assert client.body(URL, f"VERSION: {stays.name}") == stays.page
    assert client.body(URL, f"VERSION: {first.name}") == DEMO
    assert client.body(URL) == DEMO
    assert router_routes(demo, SVC) == [f"version:{stays.name}"]
    assert mesh_objects(demo, SVC, first.name) == [] and owned_by(demo, first.name) == []
    assert service(demo, SVC)["spec"]["selector"].get("kt-role") == "router"
    assert runs[stays.name].proc.poll() is None, runs[stays.name].output()
    _stop(runs[stays.name])
    assert client.body(URL, f"VERSION: {stays.name}") == DEMO
    assert client.body(URL) == DEMO
    assert_restored(demo, SVC, pristine)


def test_recover_while_the_other_is_alive(devs, client: MeshClient, demo: str, pristine: dict) -> None:
    """alice exchanges, bob runs `ktctl recover`: the Service is put back and stays so; alice's guard stands
    down, says so in one line, and her exchange ends (exit 1) instead of running on half-alive (G1, G3);
    bob then exchanges and her leaving never disturbs him."""
    alice, bob = devs
    a = alice.exchange()
    a.wait_banner(EXCHANGED)
    assert client.body(URL) == alice.page
    r = bob.run("recover", SVC, timeout=120)
    assert r.returncode == 0 and not error_lines(r.stderr), r.stdout + r.stderr
    assert service_state(demo, SVC) == pristine
    wait_for("alice's exchange to stand down", lambda: "stands down" in a.output(), timeout=30)
    stood = [line for line in a.output().splitlines() if "stands down" in line]
    assert len(stood) == 1 and " WRN " in stood[0] and "ktctl recover" in stood[0], a.output()
    assert a.proc.wait(timeout=120) == 1, a.output()
    assert service_state(demo, SVC) == pristine, service(demo, SVC)["metadata"]
    assert client.body(URL) == DEMO

    b = bob.exchange()
    b.wait_banner(EXCHANGED)
    bobs = service_state(demo, SVC)
    assert _holder(demo) == "bob" and client.body(URL) == bob.page
    time.sleep(GUARD_INTERVALS)  # nothing of alice's is left to take it back
    assert service_state(demo, SVC) == bobs and client.body(URL) == bob.page
    _stop(b)
    assert [line for line in a.output().splitlines() if "stands down" in line] == stood, a.output()
    assert client.body(URL) == DEMO
    assert_restored(demo, SVC, pristine)
