"""The cluster side of `ktctl mesh` against the real local cluster: the router pod as ktctl builds it (Ready,
no API credentials, routes read from its own annotations), route updates by concurrent writers, the last
one out putting the Service back exactly, `clean` after a participant's heartbeat went stale, exchange
and mesh refusing each other, and failures (typed or half-way) that leave nothing behind.

ktctl runs here as the test's own user with the admin kubeconfig (tests/e2e/test_mesh.py runs the user's
scenarios as an unprivileged account); the laptop's service is a local HTTP server on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.server
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ktproxy.cluster.client import KubeClient
from ktproxy.cluster.objects import read_service
from ktproxy.errors import KtError
from ktproxy.exchange import takeover
from ktproxy.mesh import routes as mesh_routes
from ktproxy.mesh import shared as mesh
from ktproxy.mesh.spec import resolve_port_map
from ktproxy.shadow.pod import ShadowOptions

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
DEMO = "kt-connect demo v1"
APP = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: tomcat}
spec:
  replicas: 1
  selector: {matchLabels: {app: tomcat}}
  template:
    metadata: {labels: {app: tomcat}}
    spec:
      terminationGracePeriodSeconds: 0
      containers:
      - name: tomcat
        image: %(image)s
        imagePullPolicy: IfNotPresent
        ports: [{name: http, containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: tomcat}
spec:
  selector: {app: tomcat}
  ports: [{name: web, port: 8080, targetPort: http}]
"""
CLIENT = "kt-e2e-client"
GET = ("import sys, urllib.request\n"
       "r = urllib.request.Request(sys.argv[1])\n"
       "if len(sys.argv) > 2: r.add_header('VERSION', sys.argv[2])\n"
       "try:\n"
       "    print(urllib.request.urlopen(r, timeout=10).read().decode().strip())\n"
       "except Exception as e:\n"
       "    print('ERROR', e)\n")


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def app(kubectl, module_namespace, cluster):
    ns = module_namespace
    kubectl("apply", "-n", ns, "-f", "-", input=APP % {"image": cluster.demo_image})
    kubectl("rollout", "status", "-n", ns, "deployment/tomcat", "--timeout=120s", timeout=150)
    kubectl("exec", "-n", ns, "deployment/tomcat", "-c", "tomcat", "--", "/bin/bash", "-c",
            f'mkdir -p webapps/ROOT; echo "{DEMO}" > webapps/ROOT/index.html')
    kubectl("run", CLIENT, "-n", ns, f"--image={cluster.base_image}", "--restart=Never", "--command", "--",
            "sleep", "infinity")
    kubectl("wait", "-n", ns, "--for=condition=Ready", f"pod/{CLIENT}", "--timeout=120s", timeout=150)
    return ns


@pytest.fixture
def kube(kubeconfig, app):
    k = KubeClient.load(str(kubeconfig), namespace=app)
    k.configuration.proxy = None
    yield k
    k.close()


@pytest.fixture
def pristine(kubectl, app) -> Iterator[dict]:
    """The Service as the test found it; afterwards: put back whatever a failed test left (recover)."""
    before = _svc(kubectl, app)
    yield before
    _ktctl("recover", "tomcat", ns=app)
    kubectl("delete", "svc", "tomcat-kt-stuntman", "-n", app, "--ignore-not-found", check=False)


def _svc(kubectl, ns, name="tomcat") -> dict:
    return json.loads(kubectl("get", "service", name, "-n", ns, "-o", "json").stdout)


def _kt_objects(kubectl, ns) -> list[str]:
    out = kubectl("get", "pods,secrets,services", "-n", ns, "-l", "control-by=kt", "-o", "name").stdout
    return sorted(line for line in out.splitlines() if line.strip())


def _assert_as_before(kubectl, ns, before: dict) -> None:
    deadline = time.monotonic() + 60
    while _kt_objects(kubectl, ns) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _kt_objects(kubectl, ns) == []
    after = _svc(kubectl, ns)
    assert after["spec"] == before["spec"]
    assert (after["metadata"].get("annotations") or {}) == (before["metadata"].get("annotations") or {})


def _get(kubectl, ns, header: str | None = None) -> str:
    args = ["exec", "-n", ns, CLIENT, "--", "python3", "-c", GET, "http://tomcat:8080/"]
    return kubectl(*args, *([header] if header else []), timeout=60).stdout.strip()


class _Page(http.server.SimpleHTTPRequestHandler):
    def log_message(self, fmt: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def _laptop(text: str) -> Iterator[int]:
    """A local HTTP server answering `text` on a free port (the developer's own version)."""
    with tempfile.TemporaryDirectory() as root:
        Path(root, "index.html").write_text(text + "\n")
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Page, directory=root))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield server.server_address[1]
        finally:
            server.shutdown()
            server.server_close()


def _env(user: str = "e2e") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update(KUBECONFIG=str(REPO / ".cluster" / "kubeconfig"), KTCTL_USER=user, PYTHONPATH=str(REPO))
    return env


def _ktctl(*args: str, ns: str, user: str = "e2e", timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ktproxy", "-n", ns, *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(user), cwd=REPO)


class _Mesh:
    """`ktctl mesh` in the background."""

    def __init__(self, ns: str, user: str, port: int, value: str, *extra: str) -> None:
        self.log = tempfile.NamedTemporaryFile("w+", prefix="k1-mesh-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ktproxy", "-n", ns, "mesh", "tomcat", "--expose", f"{port}:8080",
             "--version-mark", value, *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env=_env(user), cwd=REPO, start_new_session=True)
        self.value = value

    def output(self) -> str:
        return Path(self.log.name).read_text()

    def wait_banner(self, timeout: float = 180) -> None:
        text = f"Now you can access your service by header 'VERSION: {self.value}'"
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no banner (exit {self.proc.poll()}):\n{self.output()}")
            time.sleep(0.3)

    def stop(self, sig: int = signal.SIGINT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                raise AssertionError(f"did not stop:\n{self.output()}") from None
        return self.proc.returncode

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _router_annotations(kubectl, ns) -> dict[str, str]:
    pod = json.loads(kubectl("get", "pod", "tomcat-kt-router", "-n", ns, "-o", "json").stdout)
    return pod["metadata"]["annotations"]


def _wait(what: str, check, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


# ------------------------------------------------------------------------------------------ router pod
async def test_router_pod_ready_credential_free_and_following_its_annotation(kube, app, kubectl, pristine):
    """The router ktctl builds starts, needs no token, and serves the routes written to its annotation
    (the kubelet's downward API file): the contract between ktproxy/kube/mesh*.py and the router."""
    svc = await read_service(kube, app, "tomcat")
    ports = await resolve_port_map(kube, svc, {"app": "tomcat"})
    try:
        assert await mesh.ensure_stuntman(kube, app, "tomcat", ports, {"app": "tomcat"})
        assert not await mesh.ensure_stuntman(kube, app, "tomcat", ports, {"app": "tomcat"})  # reused
        router, created = await mesh.ensure_router(kube, app, svc, ports, ("version", "alice"),
                                                   ShadowOptions(namespace=app), 120)
        assert created and router.status.pod_ip
        pod = json.loads(kubectl("get", "pod", "tomcat-kt-router", "-n", app, "-o", "json").stdout)
        mounts = [m["mountPath"] for m in pod["spec"]["containers"][0].get("volumeMounts") or []]
        assert not [m for m in mounts if "serviceaccount" in m], mounts  # no API token in the pod
        # Named targetPort 'http' declared on the router: the Service will resolve it there.
        assert {"name": "http", "containerPort": 8080, "protocol": "TCP"} in pod["spec"]["containers"][0]["ports"]

        def routes() -> list:
            r = kubectl("exec", "-n", app, "tomcat-kt-router", "--", "/opt/ktproxy/bin/python", "-c",
                        "import urllib.request; print(urllib.request.urlopen("
                        "'http://127.0.0.1:2280/routes', timeout=5).read().decode())", check=False)
            return json.loads(r.stdout)["routes"] if r.returncode == 0 else None

        assert routes() == [["version", "alice"]]
        assert await mesh_routes.add_route(kube, app, "tomcat-kt-router", ("version", "bob")) == [
            ("version", "alice"), ("version", "bob")]
        _wait("the router to read the new route", lambda: routes() == [["version", "alice"], ["version", "bob"]])
        assert await mesh_routes.remove_route(kube, app, "tomcat-kt-router", "alice") == [("version", "bob")]
        _wait("the router to drop the old route", lambda: routes() == [["version", "bob"]])
        # Asked again while it exists: the same pod, not a second one.
        again, created = await mesh.ensure_router(kube, app, svc, ports, ("version", "carol"),
                                                  ShadowOptions(namespace=app), 120)
        assert not created and again.metadata.uid == router.metadata.uid
    finally:
        await mesh.remove_shared(kube, app, "tomcat")
    assert _kt_objects(kubectl, app) == []
    assert _svc(kubectl, app)["spec"] == pristine["spec"]


async def test_concurrent_route_writers_lose_nothing(kube, app, kubectl, pristine):
    """Eight developers join at once and four leave at once: every write is guarded by the version it
    read, the losers read again; no route and no count is lost (kt-connect: GET+Update, fault d)."""
    svc = await read_service(kube, app, "tomcat")
    ports = await resolve_port_map(kube, svc, {"app": "tomcat"})
    values = [f"dev{i}" for i in range(8)]
    try:
        await mesh.ensure_router(kube, app, svc, ports, ("version", "first"), ShadowOptions(namespace=app), 120)
        await asyncio.gather(*(mesh_routes.add_route(kube, app, "tomcat-kt-router", ("version", v)) for v in values))
        ann = _router_annotations(kubectl, app)
        assert sorted(ann["kt-mesh-routes"].split(",")) == sorted(f"version:{v}" for v in ["first", *values])
        assert ann["kt-ref-count"] == "9"
        await asyncio.gather(*(mesh_routes.remove_route(kube, app, "tomcat-kt-router", v) for v in values[:4]))
        ann = _router_annotations(kubectl, app)
        assert sorted(ann["kt-mesh-routes"].split(",")) == sorted(f"version:{v}" for v in ["first", *values[4:]])
        assert ann["kt-ref-count"] == "5"
    finally:
        await mesh.remove_shared(kube, app, "tomcat")
    assert _kt_objects(kubectl, app) == []


# ------------------------------------------------------------------------------------------ join, leave
def test_two_developers_then_the_last_one_out_restores_exactly(app, kubectl, pristine):
    with _laptop("alice v2") as pa, _laptop("bob v2") as pb:
        alice = _Mesh(app, "alice", pa, "alice")
        alice.wait_banner()
        bob = _Mesh(app, "bob", pb, "bob")
        try:
            bob.wait_banner()
            assert _get(kubectl, app) == DEMO
            assert _get(kubectl, app, "alice") == "alice v2"
            assert _get(kubectl, app, "bob") == "bob v2"
            ann = _router_annotations(kubectl, app)
            assert (ann["kt-mesh-routes"], ann["kt-ref-count"]) == ("version:alice,version:bob", "2")
            selector = _svc(kubectl, app)["spec"]["selector"]
            assert selector["kt-role"] == "router"
            # The router's creator leaves first: the mesh stays, bob's route keeps working.
            assert alice.stop() in (0, 130), alice.output()
            assert "Route 'VERSION: alice' removed" in alice.output()
            assert "no longer reaches this machine" in alice.output()  # waited for the router to reload
            ann = _router_annotations(kubectl, app)
            assert (ann["kt-mesh-routes"], ann["kt-ref-count"]) == ("version:bob", "1")
            assert _svc(kubectl, app)["spec"]["selector"] == selector
            assert not [o for o in _kt_objects(kubectl, app) if "alice" in o]
            assert _get(kubectl, app, "bob") == "bob v2"
            assert _get(kubectl, app, "alice") == DEMO
            assert bob.stop() in (0, 130), bob.output()
        finally:
            alice.stop()
            bob.stop()
    _assert_as_before(kubectl, app, pristine)
    assert _get(kubectl, app, "bob") == DEMO
    assert "Last developer meshing service tomcat" in bob.output()


def test_clean_removes_only_a_stale_participants_share(app, kubectl, pristine):
    with _laptop("alice v2") as pa, _laptop("bob v2") as pb:
        alice = _Mesh(app, "alice", pa, "alice")
        alice.wait_banner()
        bob = _Mesh(app, "bob", pb, "bob")
        try:
            bob.wait_banner()
            alice.kill()
            past = str(int(time.time()) - 3600)
            for obj in ("pod/tomcat-kt-mesh-alice", "secret/tomcat-kt-mesh-alice", "service/tomcat-kt-mesh-alice"):
                kubectl("annotate", "-n", app, obj, f"kt-last-heart-beat={past}", "--overwrite")
            r = _ktctl("clean", ns=app)
            assert r.returncode == 0, r.stdout + r.stderr
            assert not [o for o in _kt_objects(kubectl, app) if "alice" in o], _kt_objects(kubectl, app)
            ann = _router_annotations(kubectl, app)
            assert (ann["kt-mesh-routes"], ann["kt-ref-count"]) == ("version:bob", "1")
            assert "remove route 'VERSION: alice'" in r.stdout, r.stdout
            assert _svc(kubectl, app)["spec"]["selector"]["kt-role"] == "router"
            assert _get(kubectl, app, "bob") == "bob v2"
            # Bob dies too; once all its heartbeats are stale, clean is the last one out.
            bob.kill()
            for obj in _kt_objects(kubectl, app):
                kubectl("annotate", "-n", app, obj, f"kt-last-heart-beat={past}", "--overwrite")
            r = _ktctl("clean", ns=app)
            assert r.returncode == 0, r.stdout + r.stderr
            assert "restore selector of service" in r.stdout, r.stdout
        finally:
            alice.stop()
            bob.stop()
    _assert_as_before(kubectl, app, pristine)
    assert _get(kubectl, app, "bob") == DEMO


def _kt_connect_mesh(kubectl, ns: str, base_image: str, beat: int) -> None:
    """tomcat meshed as kt-connect leaves it: its router pod (here a stand-in that only sleeps: kt-connect's
    nginx keeps its routes in a file, so the pod has no kt-mesh-routes), the stuntman, one developer's
    shadow pod and Service, every heartbeat `beat`, and the Service switched to the router."""
    target = "k" * 20
    beat_ann = {"kt-last-heart-beat": str(beat)}

    def pod_(name: str, labels: dict, annotations: dict) -> dict:
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "labels": {"control-by": "kt", **labels}, "annotations": annotations},
                "spec": {"terminationGracePeriodSeconds": 0, "automountServiceAccountToken": False,
                         "containers": [{"name": "c", "image": base_image, "imagePullPolicy": "IfNotPresent",
                                         "command": ["sleep", "infinity"]}]}}

    def svc_(name: str, selector: dict, labels: dict, annotations: dict) -> dict:
        return {"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "labels": {"control-by": "kt", **labels}, "annotations": annotations},
                "spec": {"selector": selector, "ports": [{"name": "kt-8080", "port": 8080, "targetPort": 8080}]}}

    items = [
        pod_("tomcat-kt-router", {"kt-role": "router", "kt-target": target},
             {"kt-config": "service=tomcat", "kt-ref-count": "1", **beat_ann}),
        svc_("tomcat-kt-stuntman", {"app": "tomcat"}, {}, {"kt-config": "service=tomcat", **beat_ann}),
        pod_("tomcat-kt-mesh-abcde", {"kt-role": "shadow-mesh", "kt-target": "abcde"},
             {"kt-config": "service=tomcat-kt-mesh-abcde", "kt-user": "kt-connect-user", **beat_ann}),
        svc_("tomcat-kt-mesh-abcde", {"kt-role": "shadow-mesh", "kt-target": "abcde"},
             {"kt-role": "shadow-mesh"}, {"kt-user": "kt-connect-user", **beat_ann}),
    ]
    kubectl("apply", "-n", ns, "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    kubectl("wait", "-n", ns, "--for=condition=Ready", "pod/tomcat-kt-router", "--timeout=120s", timeout=150)
    kubectl("annotate", "-n", ns, "service/tomcat", "--overwrite", 'kt-selector={"app":"tomcat"}',
            "kt-user=kt-connect-user")
    kubectl("patch", "-n", ns, "service/tomcat", "--type=json", "-p", json.dumps(
        [{"op": "replace", "path": "/spec/selector", "value": {"kt-role": "router", "kt-target": target}}]))


def test_clean_leaves_a_live_kt_connect_mesh_alone(app, kubectl, pristine, cluster):
    """Issue 18 G2: kt-connect's router keeps its routes in a file; clean read its missing kt-mesh-routes as
    'no live mesh left', put the selector back and deleted router and stuntman under its live users."""
    try:
        _kt_connect_mesh(kubectl, app, cluster.base_image, int(time.time()))
        meshed = _svc(kubectl, app)
        objects = _kt_objects(kubectl, app)
        uids = {o: json.loads(kubectl("get", "-n", app, o, "-o", "json").stdout)["metadata"]["uid"] for o in objects}
        r = _ktctl("clean", ns=app)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "restore selector" not in r.stdout and "delete" not in r.stdout.lower(), r.stdout
        after = _svc(kubectl, app)
        assert after["spec"]["selector"] == meshed["spec"]["selector"]
        assert after["metadata"]["annotations"].get("kt-selector") == '{"app":"tomcat"}'
        assert _kt_objects(kubectl, app) == objects
        for o, uid in uids.items():  # the same objects, not re-created ones
            got = json.loads(kubectl("get", "-n", app, o, "-o", "json").stdout)["metadata"]
            assert got["uid"] == uid and not got.get("deletionTimestamp"), o
    finally:
        r = _ktctl("recover", "tomcat", ns=app)
        assert r.returncode == 0, r.stdout + r.stderr
    _assert_as_before(kubectl, app, pristine)


# ------------------------------------------------------------------------------------------ refusals
def test_exchange_and_mesh_refuse_each_other_naming_the_holder(app, kubectl, pristine):
    with _laptop("laptop") as port:
        ex = subprocess.Popen([sys.executable, "-m", "ktproxy", "-n", app, "exchange", "tomcat", "--expose",
                               f"{port}:8080"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=_env("carol"), cwd=REPO, start_new_session=True)
        try:
            _wait("the exchange", lambda: _svc(kubectl, app)["spec"]["selector"].get("kt-role") == "shadow-exchange",
                  timeout=120)
            time.sleep(1)
            r = _ktctl("mesh", "tomcat", "--expose", f"{port}:8080", ns=app, user="dave")
            errors = [line for line in r.stderr.splitlines() if " ERR " in line]
            assert r.returncode != 0 and len(errors) == 1 and "carol" in errors[0], r.stderr
            assert not [o for o in _kt_objects(kubectl, app) if "-kt-mesh-" in o or "kt-router" in o
                        or "kt-stuntman" in o], _kt_objects(kubectl, app)
        finally:
            ex.send_signal(signal.SIGINT)
            ex.wait(120)
        _assert_as_before(kubectl, app, pristine)

        m = _Mesh(app, "carol", port, "carol")
        try:
            m.wait_banner()
            r = _ktctl("exchange", "tomcat", "--expose", f"{port}:8080", ns=app, user="dave")
            errors = [line for line in r.stderr.splitlines() if " ERR " in line]
            assert r.returncode != 0 and len(errors) == 1, r.stderr
            assert "already meshed by carol" in errors[0], r.stderr
            assert not [o for o in _kt_objects(kubectl, app) if "exchange" in o]
            assert _router_annotations(kubectl, app)["kt-ref-count"] == "1"
        finally:
            m.stop()
    _assert_as_before(kubectl, app, pristine)


# ------------------------------------------------------------------------------------------ failures
@pytest.mark.parametrize("args, message", [
    (["--version-mark", "Bad:abc"], "'Bad'"),
    (["--version-mark", "a.b"], "'a.b'"),
    (["--version-mark", "x" * 41], "x" * 41),
    (["--mode", "manual", "--version-mark", "env-:abc"], "'env-'"),
])
def test_bad_input_one_line_nothing_left(app, kubectl, pristine, args, message):
    with _laptop("laptop") as port:
        r = _ktctl("mesh", "tomcat", "--expose", f"{port}:8080", *args, ns=app, timeout=60)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if " ERR " in line]
    assert len(errors) == 1 and message in errors[0], r.stderr
    _assert_as_before(kubectl, app, pristine)


def test_failure_half_way_leaves_nothing(app, kubectl, pristine):
    """The stuntman's name is taken by a Service that is not ours: mesh fails after its own shadow and
    Service exist; those go, the foreign Service stays, the Service is untouched."""
    kubectl("create", "service", "clusterip", "tomcat-kt-stuntman", "--tcp=8080:8080", "-n", app)
    try:
        with _laptop("laptop") as port:
            r = _ktctl("mesh", "tomcat", "--expose", f"{port}:8080", ns=app, timeout=120)
        errors = [line for line in r.stderr.splitlines() if " ERR " in line]
        assert r.returncode != 0 and len(errors) == 1 and "tomcat-kt-stuntman" in errors[0], r.stderr
        assert "Creating shadow pod" in r.stderr  # it did get that far
        _assert_as_before(kubectl, app, pristine)
        assert kubectl("get", "svc", "tomcat-kt-stuntman", "-n", app, check=False).returncode == 0
    finally:
        kubectl("delete", "svc", "tomcat-kt-stuntman", "-n", app, check=False)


async def test_refusals_at_the_kube_layer(kube, app, kubectl, pristine):
    """A taken version is refused before anything is created, naming who holds it."""
    kubectl("create", "service", "clusterip", "tomcat-kt-mesh-taken", "--tcp=8080:8080", "-n", app)
    kubectl("annotate", "service", "tomcat-kt-mesh-taken", "kt-user=erin", "-n", app)
    try:
        with pytest.raises(KtError, match=r"^erin is meshing service 'tomcat' via version 'taken'"):
            await mesh.check_value_free(kube, app, "tomcat", "taken")
        await mesh.check_value_free(kube, app, "tomcat", "free")
        svc = await takeover.read(kube, app, "tomcat")
        await mesh.refuse_if_exchanged(kube, app, svc)  # a plain Service may be meshed
    finally:
        kubectl("delete", "svc", "tomcat-kt-mesh-taken", "-n", app, check=False)


def test_joining_and_leaving_drop_no_request_of_others(app, kubectl, pristine):
    """A pod requests the service without the header, back to back, while a developer meshes and leaves
    three times (each time the first one in switches the selector and the last one out puts it back):
    every answer is the original pods'."""
    loop = ("import time, urllib.request, collections\n"
            "c = collections.Counter()\n"
            "end = time.time() + float(__import__('sys').argv[1])\n"
            "while time.time() < end:\n"
            "    try:\n"
            "        c[urllib.request.urlopen('http://tomcat:8080/', timeout=5).read().decode().strip()] += 1\n"
            "    except Exception as e:\n"
            "        c['ERROR ' + type(e).__name__ + ' ' + str(e)[:80]] += 1\n"
            "    time.sleep(0.02)\n"
            "print(__import__('json').dumps(c))\n")
    local = REPO / ".cluster" / "bin" / "kubectl"
    client = subprocess.Popen([str(local), "--kubeconfig", str(REPO / ".cluster" / "kubeconfig"), "exec", "-n", app,
                               CLIENT, "--", "python3", "-c", loop, "75"], stdout=subprocess.PIPE, text=True)
    with _laptop("alice v2") as port:
        for _ in range(3):
            m = _Mesh(app, "alice", port, "alice")
            try:
                m.wait_banner()
                assert _get(kubectl, app, "alice") == "alice v2"
            finally:
                assert m.stop() in (0, 130), m.output()
    out, _ = client.communicate(timeout=150)
    answers = json.loads(out)
    assert set(answers) == {DEMO} and answers[DEMO] > 100, answers
    _assert_as_before(kubectl, app, pristine)


def test_a_deleted_router_or_shadow_comes_back(app, kubectl, pristine):
    """kt-connect's watcher did nothing when the router vanished (its fault c): here the participant
    creates it again with its route; a deleted shadow (fixed name <svc>-kt-mesh-<value>) comes back too."""
    with _laptop("alice v2") as port:
        m = _Mesh(app, "alice", port, "alice")
        try:
            m.wait_banner()
            kubectl("delete", "pod", "tomcat-kt-router", "-n", app, "--wait=true", timeout=90)
            _wait("the router to be back with the route", lambda: _get(kubectl, app, "alice") == "alice v2",
                  timeout=120)
            assert _router_annotations(kubectl, app)["kt-mesh-routes"] == "version:alice"
            assert _get(kubectl, app) == DEMO
            assert "creating it again" in m.output()
            kubectl("delete", "pod", "tomcat-kt-mesh-alice", "-n", app, "--wait=true", timeout=90)
            _wait("the shadow to be back", lambda: _get(kubectl, app, "alice") == "alice v2", timeout=120)
            assert m.proc.poll() is None, m.output()
        finally:
            assert m.stop() in (0, 130), m.output()
    _assert_as_before(kubectl, app, pristine)
