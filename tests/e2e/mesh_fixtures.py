"""What the mesh e2e tests share: the test upstream deployed in the cluster (mesh_upstreams.py answering
"cluster" on HTTP/1.1, WebSocket, HTTP/2 and raw bytes), a client pod running mesh_clients.py (one
kept-alive connection, WebSocket, HTTP/2 prior knowledge, raw), the banner's header, the mesh objects
of a service, and "the Service is exactly as before".

Both scripts reach the pods through one ConfigMap (not labelled control-by=kt: it is the test's, not
ktproxy's). Test modules import the fixtures they use by name.
"""

from __future__ import annotations

import json
import queue
import re
import subprocess
import threading
from pathlib import Path

import pytest

pytest.register_assert_rewrite("ktctl_runner")
from ktctl_runner import (  # noqa: E402
    KUBECONFIG,
    ROOT,
    Background,
    apply,
    kt_objects,
    kubectl,
    service,
    wait_for,
)

HERE = Path(__file__).resolve().parent
SHADOW_IMAGE = "docker.io/ktproxy/shadow:0.1.0"  # python3 with h2: both scripts run on it
PYTHON = "/opt/ktproxy/bin/python"
SCRIPTS = "kt-e2e-mesh-scripts"
MOUNT = "/kt-e2e"
CLIENT = "kt-e2e-mesh-client"
AUTO_BANNER = "Now you can access your service by header"
MANUAL_BANNER = "Now you can update Istio rule by label"
_HEADER = re.compile(r"Now you can access your service by header '([^':]+): ([^']+)'")
_LABEL = re.compile(r"Now you can update Istio rule by label '([^'=]+)=([^']+)'")


# ------------------------------------------------------------------------------------------ banner
def mesh_header(bg: Background) -> tuple[str, str]:
    """(KEY, value) from an auto-mode banner, after waiting for it."""
    bg.wait_banner(AUTO_BANNER)
    m = _HEADER.search(bg.output())
    assert m, f"banner without a header:\n{bg.output()}"
    return m.group(1), m.group(2)


def mesh_label(bg: Background) -> tuple[str, str]:
    bg.wait_banner(MANUAL_BANNER)
    m = _LABEL.search(bg.output())
    assert m, f"banner without a label:\n{bg.output()}"
    return m.group(1), m.group(2)


# ------------------------------------------------------------------------------------------ objects
def service_state(namespace: str, name: str) -> dict:
    """What "exactly as before" compares: selector, ports, annotations, labels."""
    svc = service(namespace, name)
    return {"selector": svc["spec"].get("selector"), "ports": svc["spec"].get("ports"),
            "annotations": svc["metadata"].get("annotations") or {}, "labels": svc["metadata"].get("labels") or {}}


def pod(namespace: str, name: str) -> dict | None:
    r = kubectl("-n", namespace, "get", "pod", name, "-o", "json", "--ignore-not-found")
    return json.loads(r.stdout) if r.stdout.strip() else None


def router(namespace: str, svc: str) -> dict | None:
    return pod(namespace, f"{svc}-kt-router")


def router_routes(namespace: str, svc: str) -> list[str] | None:
    """The router pod's kt-mesh-routes as a sorted list (None: no router)."""
    r = router(namespace, svc)
    if r is None:
        return None
    text = (r["metadata"].get("annotations") or {}).get("kt-mesh-routes", "")
    return sorted(p for p in text.split(",") if p)


def ref_count(namespace: str, svc: str) -> str | None:
    r = router(namespace, svc)
    return None if r is None else (r["metadata"].get("annotations") or {}).get("kt-ref-count")


def mesh_objects(namespace: str, svc: str, value: str) -> list[str]:
    """The kt objects that belong to one developer's mesh of `svc` (shadow pod, its Service, its key)."""
    return [o for o in kt_objects(namespace) if o.split("/", 1)[1].startswith(f"{svc}-kt-mesh-{value}")]


def owned_by(namespace: str, user: str) -> list[str]:
    """The kt objects whose kt-user annotation names `user` (KTCTL_USER of the run that made them)."""
    r = kubectl("get", "pods,secrets,services,configmaps", "-n", namespace, "-l", "control-by=kt", "-o", "json")
    return sorted(f"{item['kind'].lower()}/{item['metadata']['name']}" for item in json.loads(r.stdout)["items"]
                  if (item["metadata"].get("annotations") or {}).get("kt-user") == user)


def set_heartbeat(namespace: str, objects: list[str], epoch: int) -> None:
    for obj in objects:
        kubectl("-n", namespace, "annotate", "--overwrite", obj, f"kt-last-heart-beat={epoch}")


def heartbeat(namespace: str, obj: str) -> int | None:
    r = kubectl("-n", namespace, "get", obj, "-o", "jsonpath={.metadata.annotations.kt-last-heart-beat}",
                check=False)
    return int(r.stdout) if r.returncode == 0 and r.stdout.strip().isdigit() else None


def assert_restored(namespace: str, svc: str, before: dict) -> None:
    """The Service is exactly as before the mesh and no kt object is left in the namespace."""
    assert service_state(namespace, svc) == before
    wait_for("no kt objects left", lambda: kt_objects(namespace) == [], timeout=90)


# ------------------------------------------------------------------------------------------ workloads
def scripts_configmap(namespace: str) -> None:
    kubectl("-n", namespace, "create", "configmap", SCRIPTS,
            f"--from-file=mesh_upstreams.py={HERE / 'mesh_upstreams.py'}",
            f"--from-file=mesh_clients.py={HERE / 'mesh_clients.py'}")


def _volume() -> tuple[dict, dict]:
    return ({"name": "scripts", "configMap": {"name": SCRIPTS}},
            {"name": "scripts", "mountPath": MOUNT, "readOnly": True})


def deploy_upstream(namespace: str, name: str = "echo", port: int = 8080) -> None:
    """A deployment (label app=NAME) running mesh_upstreams.py, answering "cluster" on `port`."""
    volume, mount = _volume()
    apply(namespace, {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}}, "spec": {
                     "volumes": [volume],
                     "containers": [{
                         "name": "upstream", "image": SHADOW_IMAGE, "imagePullPolicy": "Never",
                         "command": [PYTHON, f"{MOUNT}/mesh_upstreams.py", "cluster", str(port)],
                         "ports": [{"name": "http", "containerPort": port}],
                         "volumeMounts": [mount],
                         "readinessProbe": {"tcpSocket": {"port": port}, "periodSeconds": 1}}]}}}})
    kubectl("-n", namespace, "rollout", "status", f"deployment/{name}", "--timeout=120s", timeout=150)


def expose(namespace: str, name: str, selector: dict, port: int, target: int) -> None:
    apply(namespace, {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
                      "spec": {"selector": selector,
                               "ports": [{"name": "web", "port": port, "targetPort": target}]}})


class Session:
    """One kept-alive HTTP/1.1 connection from the client pod (`mesh_clients.py session`), asked one
    request at a time: it stays open across mesh participants coming and going."""

    def __init__(self, namespace: str, host: str, port: int) -> None:
        local = ROOT / ".cluster" / "bin" / "kubectl"
        self.proc = subprocess.Popen(
            [str(local) if local.exists() else "kubectl", "--kubeconfig", str(KUBECONFIG), "-n", namespace,
             "exec", "-i", CLIENT, "--", PYTHON, f"{MOUNT}/mesh_clients.py", "session", host, str(port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")

    def ask(self, headers: list[tuple[str, str]] | None = None, timeout: float = 60) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(headers or []) + "\n")
        self.proc.stdin.flush()
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no answer on the kept-alive connection within {timeout}s") from None
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"the session ended: {err.strip()}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            with_stdin = self.proc.stdin
            if with_stdin:
                with_stdin.close()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class MeshClient:
    """The client pod: mesh_clients.py on the shadow image, inside the cluster."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        volume, mount = _volume()
        apply(namespace, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": CLIENT},
                          "spec": {"volumes": [volume], "terminationGracePeriodSeconds": 0,
                                   "containers": [{"name": "client", "image": SHADOW_IMAGE,
                                                   "imagePullPolicy": "Never", "command": ["sleep", "infinity"],
                                                   "volumeMounts": [mount]}]}})
        kubectl("-n", namespace, "wait", "--for=condition=Ready", f"pod/{CLIENT}", "--timeout=120s", timeout=150)

    @property
    def ip(self) -> str:
        return kubectl("-n", self.namespace, "get", "pod", CLIENT, "-o", "jsonpath={.status.podIP}").stdout.strip()

    def run(self, *args: str, timeout: float = 90) -> object:
        r = kubectl("-n", self.namespace, "exec", CLIENT, "--", PYTHON, f"{MOUNT}/mesh_clients.py", *args,
                    check=False, timeout=timeout)
        try:
            return json.loads(r.stdout)
        except ValueError:
            raise AssertionError(f"mesh_clients.py {' '.join(args)}: {r.stdout}{r.stderr}") from None

    def get(self, url: str, *headers: str) -> dict:
        """One request on a new connection: {"status", "body", "upstream", ...} or {"error"}."""
        out = self.run("get", url, *[x for h in headers for x in ("-H", h)])
        assert isinstance(out, dict)
        return out

    def body(self, url: str, *headers: str) -> str:
        r = self.get(url, *headers)
        if "error" in r:
            return f"ERROR {r['error']}"
        return r["body"] if r["status"] == 200 else f"HTTP {r['status']}: {r['body']}"

    def bodies(self, url: str, n: int, *headers: str) -> list[str]:
        out = self.run("get", url, "--repeat", str(n), *[x for h in headers for x in ("-H", h)], timeout=300)
        assert isinstance(out, list), out
        return [r.get("body", f"ERROR {r.get('error')}") for r in out]

    def session(self, host: str, port: int) -> Session:
        return Session(self.namespace, host, port)

    def pipeline(self, host: str, port: int, requests: list[dict]) -> list[dict]:
        out = self.run("pipeline", host, str(port), json.dumps(requests))
        assert isinstance(out, list), out
        return out

    def ws(self, host: str, port: int, messages: list[str], *headers: str) -> dict:
        out = self.run("ws", host, str(port), *[x for h in headers for x in ("-H", h)], *messages)
        assert isinstance(out, dict)
        return out

    def h2(self, host: str, port: int, streams: list[list[tuple[str, str]]]) -> list[dict]:
        out = self.run("h2", host, str(port), json.dumps(streams))
        assert isinstance(out, list), out
        return out

    def raw(self, host: str, port: int, size: int, rounds: int) -> dict:
        out = self.run("raw", host, str(port), str(size), str(rounds))
        assert isinstance(out, dict)
        return out


@pytest.fixture(scope="module")
def mesh_workloads(demo: str) -> str:
    """The module's namespace with the seed's tomcat (v1), the scripts and the "cluster" upstream."""
    scripts_configmap(demo)
    deploy_upstream(demo, "echo", 8080)
    return demo


@pytest.fixture(scope="module")
def mesh_client(mesh_workloads: str) -> MeshClient:
    return MeshClient(mesh_workloads)
