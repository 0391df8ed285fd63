"""The cluster-side pieces of exchange / preview / forward / recover against the real local cluster:
selector switch and exact restore, the guard against `kubectl patch`, refusal naming the holder, kt-lock,
a named targetPort, scale mode, preview's refusal, recover, and a forward plan following a replaced pod.

The "shadow" here is a plain pod of the demo image wearing the labels a shadow would: these tests are
about Service, Deployment and pod objects, not about the SSH session (tests/e2e/test_exchange.py).
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from ktproxy import preview
from ktproxy.cleanup import recover
from ktproxy.cluster.client import KubeClient
from ktproxy.cluster.objects import read_service
from ktproxy.errors import KtError
from ktproxy.exchange import lock, scale, takeover
from ktproxy.exchange.target import resolve_exchange_target
from ktproxy.expose import ExposedPort, parse_expose, resolve_expose
from ktproxy.forward.targets import resolve_forward

pytestmark = pytest.mark.cluster

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
  ports: [{name: web, port: 80, targetPort: http}]
"""


@pytest.fixture(scope="module")
def app(kubectl, module_namespace, cluster):
    ns = module_namespace
    kubectl("apply", "-n", ns, "-f", "-", input=APP % {"image": cluster.demo_image})
    kubectl("rollout", "status", "-n", ns, "deployment/tomcat", "--timeout=120s", timeout=150)
    return ns


@pytest.fixture
def kube(kubeconfig, app):
    k = KubeClient.load(str(kubeconfig), namespace=app)
    k.configuration.proxy = None
    yield k
    k.close()


def _svc(kubectl, ns, name="tomcat") -> dict:
    return json.loads(kubectl("get", "service", name, "-n", ns, "-o", "json").stdout)


def _stand_in(kubectl, ns, name, labels, annotations=None, image="tomcat:9"):
    """A pod wearing shadow labels, Ready; deleted by the caller."""
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"control-by": "kt", **labels}, "annotations": annotations or {}},
        "spec": {"terminationGracePeriodSeconds": 0, "containers": [{
            "name": "shadow", "image": image, "imagePullPolicy": "IfNotPresent",
            "ports": [{"name": "http", "containerPort": 8080}]}]},
    }
    kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(pod))
    kubectl("wait", "-n", ns, "--for=condition=Ready", f"pod/{name}", "--timeout=90s", timeout=120)
    return json.loads(kubectl("get", "pod", name, "-n", ns, "-o", "json").stdout)["status"]["podIP"]


async def _poll(check, what, limit=30.0):
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.3)


def _endpoint_ips(kubectl, ns) -> set[str]:
    slices = json.loads(kubectl("get", "endpointslices", "-n", ns, "-l", "kubernetes.io/service-name=tomcat",
                                "-o", "json").stdout)
    return {a for s in slices["items"] for e in s.get("endpoints") or []
            if (e.get("conditions") or {}).get("ready") for a in e["addresses"]}


async def test_named_target_port_resolution(kube, app):
    svc = await read_service(kube, app, "tomcat")
    want = [ExposedPort(6060, 80, 8080, "http")]
    for remote in ("80", "http", "8080", "web"):
        assert await resolve_expose(kube, svc, parse_expose(f"6060:{remote}")) == want
    with pytest.raises(KtError) as err:
        await resolve_expose(kube, svc, parse_expose("9999"))
    assert str(err.value) == "port 9999 is not a port of service 'tomcat' (ports: 80->http/web)"
    target = await resolve_exchange_target(kube, app, "deployment/tomcat")
    assert target.service_name == "tomcat" and target.deployment.metadata.name == "tomcat"


async def test_switch_guard_refusal_restore(kube, app, kubectl):
    before = _svc(kubectl, app)
    ours = takeover.target_labels("shadow-exchange")
    ip = _stand_in(kubectl, app, "tomcat-kt-exchange-e2e1", ours)
    guard = None
    try:
        original = await takeover.switch_selector(kube, app, "tomcat", ours, "alice")
        assert original == {"app": "tomcat"}
        now = _svc(kubectl, app)
        assert now["spec"]["selector"] == ours
        assert now["metadata"]["annotations"]["kt-selector"] == '{"app":"tomcat"}'
        # the named targetPort 'http' resolves on the stand-in, which declares it: the Service follows it
        await _poll(lambda: _endpoint_ips(kubectl, app) == {ip}, "the service's endpoints to be the stand-in")

        with pytest.raises(KtError, match=r"^service 'tomcat' is already exchanged by alice"):
            await takeover.switch_selector(kube, app, "tomcat", takeover.target_labels("shadow-exchange"), "bob")

        guard = asyncio.create_task(takeover.guard_selector(kube, app, "tomcat", ours, original, "alice",
                                                            interval=0.5))
        kubectl("patch", "service", "tomcat", "-n", app, "--type=json",
                "-p", json.dumps([{"op": "replace", "path": "/spec/selector", "value": {"app": "hijack"}}]))
        await _poll(lambda: _svc(kubectl, app)["spec"]["selector"] == ours, "the guard to put our selector back")
    finally:
        if guard is not None:
            guard.cancel()
            await asyncio.gather(guard, return_exceptions=True)
        assert await takeover.restore_selector(kube, app, "tomcat")
        kubectl("delete", "pod", "tomcat-kt-exchange-e2e1", "-n", app, "--wait=false")
    after = _svc(kubectl, app)
    assert after["spec"] == before["spec"]
    assert not any(k.startswith("kt-") for k in (after["metadata"].get("annotations") or {}))


async def test_lock(kube, app, kubectl):
    await lock.acquire(kube, app, "tomcat")
    try:
        value = int(_svc(kubectl, app)["metadata"]["annotations"]["kt-lock"])
        assert abs(value - time.time()) < 120
        with pytest.raises(KtError, match=r"^failed to obtain kt lock of service tomcat, please try again later$"):
            await lock.acquire(kube, app, "tomcat", tries=2, retry_interval=0.2)
    finally:
        await lock.release(kube, app, "tomcat")
    assert "kt-lock" not in (_svc(kubectl, app)["metadata"].get("annotations") or {})


async def test_scale_round_trip(kube, app, kubectl):
    svc = await read_service(kube, app, "tomcat")
    dep = await scale.deployment_for_service(kube, app, svc)
    assert dep.metadata.name == "tomcat"
    replicas = await scale.scale_down(kube, app, dep)
    try:
        assert replicas == 1
        got = json.loads(kubectl("get", "deployment", "tomcat", "-n", app, "-o", "json").stdout)
        assert got["spec"]["replicas"] == 0 and got["metadata"]["annotations"]["kt-config"] == "replicas=1"
    finally:
        await scale.scale_back(kube, app, "tomcat", replicas)
    assert await scale.wait_ready(kube, app, "tomcat", replicas, max_wait=120)
    got = json.loads(kubectl("get", "deployment", "tomcat", "-n", app, "-o", "json").stdout)
    assert got["spec"]["replicas"] == 1 and "kt-config" not in (got["metadata"].get("annotations") or {})


async def test_preview_service(kube, app, kubectl):
    ports = [ExposedPort(8080, 8080, 8080)]
    selector = takeover.target_labels("shadow-preview")
    with pytest.raises(KtError) as err:
        await preview.create_service(kube, app, "tomcat", ports, selector, "alice")
    assert str(err.value) == "service 'tomcat' already exists and was not created by ktctl"
    await preview.create_service(kube, app, "tomcat-v2", ports, selector, "alice")
    try:
        got = _svc(kubectl, app, "tomcat-v2")
        assert got["spec"]["selector"] == selector and got["spec"]["type"] == "ClusterIP"
        assert got["metadata"]["labels"]["control-by"] == "kt"
        with pytest.raises(KtError, match="already previewed by alice"):
            await preview.create_service(kube, app, "tomcat-v2", ports, selector, "bob")
    finally:
        await preview.delete_service(kube, app, "tomcat-v2")
    assert kubectl("get", "service", "tomcat-v2", "-n", app, check=False).returncode != 0


async def test_recover_after_a_killed_exchange(kube, app, kubectl):
    before = _svc(kubectl, app)
    ours = takeover.target_labels("shadow-exchange")
    _stand_in(kubectl, app, "tomcat-kt-exchange-e2e2", {**ours}, {"kt-config": "service=tomcat"})
    await takeover.switch_selector(kube, app, "tomcat", ours, "alice")
    await lock.acquire(kube, app, "tomcat")
    # ... and the exchange is killed here: nothing restores, nothing unlocks
    lines = await recover.recover(kube, app, "tomcat")
    assert lines[0] == "Deleted shadow pod tomcat-kt-exchange-e2e2"
    assert any("Restored the original selector" in ln for ln in lines)
    after = _svc(kubectl, app)
    assert after["spec"] == before["spec"]
    assert not any(k.startswith("kt-") for k in (after["metadata"].get("annotations") or {}))
    assert await recover.recover(kube, app, "tomcat") == ["Service tomcat is clean and tidy, nothing would be done"]


async def test_forward_plan_follows_a_replaced_pod(kube, app, kubectl):
    plan = await resolve_forward(kube, app, "tomcat", None, ttl=0)
    assert plan.remote_port == 80
    [(old_ip, port)] = await plan.endpoints()
    assert port == 8080
    kubectl("delete", "pod", "-n", app, "-l", "app=tomcat", "--wait=false")
    deadline = time.monotonic() + 120
    while True:
        try:
            found = await plan.endpoints()
            if found and old_ip not in {h for h, _ in found}:
                break
        except KtError:  # no Ready pod for a moment
            pass
        assert time.monotonic() < deadline, "no new Ready pod behind the service"
        await asyncio.sleep(0.5)
    assert found[0][1] == 8080
