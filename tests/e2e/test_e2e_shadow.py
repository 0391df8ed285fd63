"""Shadow pod lifecycle, SSH over the port-forward, heartbeats, discovery, clean and status on the real
local cluster. Only the local API server and the cluster's own pods are contacted; the "bad image" case
uses a present image that exits, never a registry pull.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import asyncssh
import pytest

from ktproxy.cluster.client import KubeClient, KubeError
from ktproxy.cluster.discovery import discover
from ktproxy.cluster.heartbeat import beat_once
from ktproxy.errors import KtError
from ktproxy.shadow.pod import ShadowOptions, create_shadow, delete_shadow

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
KTCTL = [sys.executable, "-m", "ktproxy"]


@pytest.fixture
def kube(kubeconfig, namespace):
    k = KubeClient.load(str(kubeconfig), namespace=namespace)
    k.configuration.proxy = None
    yield k
    k.close()


def _keys():
    client = asyncssh.generate_private_key("ssh-ed25519")
    host = asyncssh.generate_private_key("ssh-ed25519")
    return client, host


def _gone(kubectl, ns: str, kind: str, name: str) -> bool:
    r = kubectl("get", kind, name, "-n", ns, "-o", "name", check=False)
    return r.returncode != 0 and "NotFound" in r.stderr


async def _wait_gone(kubectl, ns, kind, name, within=30):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if _gone(kubectl, ns, kind, name):
            return True
        await asyncio.sleep(0.5)
    return False


async def _left_behind(kubectl, ns, within=30) -> str:
    """The pods and secrets labelled control-by=kt still in ns: waits (at most `within` s) for a deleted
    pod to finish terminating, and returns "" once nothing is left."""
    deadline = time.monotonic() + within
    while True:
        left = kubectl("get", "pods,secrets", "-l", "control-by=kt", "-n", ns, "-o", "name").stdout.strip()
        if not left or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.5)


async def test_shadow_ready_ssh_and_delete(kube, namespace, kubectl, caplog):
    client_key, host_key = _keys()
    kubectl("run", "web", "--image=tomcat:9", "--image-pull-policy=IfNotPresent", "-n", namespace)
    opts = ShadowOptions(
        namespace=namespace, user="e2e-user", labels={"team": "qa"}, annotations={"note": "x"}
    )
    caplog.set_level("INFO", logger="ktproxy")
    shadow = await create_shadow(
        kube, opts, client_key.export_public_key().decode(), host_key.export_private_key().decode()
    )
    try:
        assert any(f"waiting for pod {shadow.name} to be ready (" in r.getMessage() for r in caplog.records)
        pod = json.loads(kubectl("get", "pod", shadow.name, "-n", namespace, "-o", "json").stdout)
        md, spec = pod["metadata"], pod["spec"]
        assert md["labels"]["control-by"] == "kt" and md["labels"]["kt-role"] == "shadow-connect"
        assert md["labels"]["team"] == "qa" and md["annotations"]["note"] == "x"
        assert md["annotations"]["kt-user"] == "e2e-user"
        assert abs(int(md["annotations"]["kt-last-heart-beat"]) - time.time()) < 120
        assert spec["securityContext"]["runAsUser"] == 65534
        assert spec["automountServiceAccountToken"] is False
        secret = json.loads(kubectl("get", "secret", shadow.secret, "-n", namespace, "-o", "json").stdout)
        assert sorted(secret["data"]) == ["authorized_keys", "ssh_host_key"]
        assert secret["metadata"]["ownerReferences"][0]["name"] == shadow.name

        # SSH to the shadow through the WebSocket port-forward, host key pinned, then a direct-tcpip
        # stream to the demo pod's IP.
        kubectl("wait", "--for=condition=Ready", "pod/web", "-n", namespace, "--timeout=60s")
        web_ip = kubectl(
            "get", "pod", "web", "-n", namespace, "-o", "jsonpath={.status.podIP}"
        ).stdout.strip()
        known = asyncssh.import_known_hosts(f"kt-shadow {host_key.export_public_key().decode()}")
        async with asyncssh.connect(
            "kt-shadow",
            tunnel=shadow.tunnel(kube),
            username="kt",
            client_keys=[client_key],
            known_hosts=known,
        ) as conn:
            reader, writer = await conn.open_connection(web_ip, 8080)
            writer.write(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
            data = await asyncio.wait_for(reader.read(), 15)
            assert b"Server: demo-http/1" in data
            # and a wrong host key is refused
        wrong = asyncssh.generate_private_key("ssh-ed25519")
        bad_known = asyncssh.import_known_hosts(f"kt-shadow {wrong.export_public_key().decode()}")
        with pytest.raises((asyncssh.HostKeyNotVerifiable, asyncssh.PermissionDenied, asyncssh.Error)):
            await asyncssh.connect(
                "kt-shadow", tunnel=shadow.tunnel(kube), username="kt", client_keys=[client_key],
                known_hosts=bad_known,
            )  # fmt: skip

        # heartbeat in cluster time
        before = int(md["annotations"]["kt-last-heart-beat"])
        await asyncio.sleep(1.1)
        assert (
            await beat_once(kube, [("pod", namespace, shadow.name), ("secret", namespace, shadow.secret)])
            == 2
        )
        pod = json.loads(kubectl("get", "pod", shadow.name, "-n", namespace, "-o", "json").stdout)
        assert int(pod["metadata"]["annotations"]["kt-last-heart-beat"]) > before
    finally:
        await delete_shadow(kube, shadow)
    assert await _wait_gone(kubectl, namespace, "pod", shadow.name)
    assert await _wait_gone(kubectl, namespace, "secret", shadow.secret)


async def test_container_that_cannot_start_names_reason_and_leaves_nothing(kube, namespace, kubectl, cluster):
    client_key, host_key = _keys()
    opts = ShadowOptions(
        namespace=namespace,
        image=cluster.base_image,  # present locally: no registry is ever contacted
        command=["sh", "-c", "echo 'shadow: cannot bind 2222: boom' >&2; exit 3"],
        ready_timeout=90,
    )
    t0 = time.monotonic()
    with pytest.raises(KtError) as ei:
        await create_shadow(
            kube, opts, client_key.export_public_key().decode(), host_key.export_private_key().decode()
        )
    msg = str(ei.value)
    print("error line:", msg, f"({time.monotonic() - t0:.1f}s)")
    assert "\n" not in msg
    assert msg.startswith("shadow pod kt-connect-shadow-")
    assert "CrashLoopBackOff" in msg or "Error" in msg
    assert "cannot bind 2222: boom" in msg
    assert await _left_behind(kubectl, namespace) == ""


async def test_unschedulable_times_out_with_reason(kube, namespace, kubectl):
    client_key, host_key = _keys()
    opts = ShadowOptions(namespace=namespace, node_selector={"ktproxy.test/nowhere": "true"}, ready_timeout=6)
    with pytest.raises(KtError) as ei:
        await create_shadow(
            kube, opts, client_key.export_public_key().decode(), host_key.export_private_key().decode()
        )
    msg = str(ei.value)
    print("error line:", msg)
    assert "did not become ready in time: Unschedulable" in msg
    assert "node" in msg
    assert await _left_behind(kubectl, namespace) == ""


async def test_discovery(kube, namespace, cluster):
    import ipaddress

    info = await discover(kube, namespace)
    assert [str(n) for n in info.service_cidrs] == [cluster.service_cidr]
    assert info.pod_cidrs and all(n.subnet_of(ipaddress.ip_network(cluster.pod_cidr)) for n in info.pod_cidrs)
    assert info.dns == cluster.dns_ip
    assert info.domain == "cluster.local"
    assert namespace in info.namespaces and "kube-system" in info.namespaces
    assert (await discover(kube, namespace, "corp.example")).domain == "corp.example"


# ---------------------------------------------------------------------------------------- clean / status
def _ktctl(kube_env, *args, user="e2e-user", timeout=60):
    env = dict(kube_env, KTCTL_USER=user, PYTHONPATH=str(ROOT))
    return subprocess.run([*KTCTL, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _kt_objects(kubectl, ns, user, stale_name, fresh_name, cluster):
    now = int(time.time())
    for name, hb in ((stale_name, now - 3600), (fresh_name, now)):
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": name,
                "namespace": ns,
                "labels": {"control-by": "kt", "kt-role": "shadow-connect"},
                "annotations": {"kt-user": user, "kt-last-heart-beat": str(hb)},
            },
            "stringData": {"authorized_keys": "ssh-ed25519 AAAA test"},
        }
        kubectl("apply", "-f", "-", input=json.dumps(secret))
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": stale_name,
            "namespace": ns,
            "labels": {"control-by": "kt", "kt-role": "shadow-connect"},
            "annotations": {"kt-user": user, "kt-last-heart-beat": str(now - 3600)},
        },
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "c", "image": cluster.base_image, "imagePullPolicy": "IfNotPresent",
                            "command": ["sleep", "3600"]}],
        },
    }  # fmt: skip
    kubectl("apply", "-f", "-", input=json.dumps(pod))


def test_status_and_clean(kubectl, kube_env, namespace, cluster):
    stale, fresh = "kt-connect-shadow-stale", "kt-connect-shadow-fresh"
    _kt_objects(kubectl, namespace, "e2e-user", stale, fresh, cluster)

    r = _ktctl(kube_env, "status", "-n", namespace)
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAMESPACE", "KIND", "NAME", "ROLE", "AGE", "HEARTBEAT", "STATE"]
    rows = {(ln.split()[1], ln.split()[2]): ln for ln in lines[1:]}
    assert "1h ago" in rows[("secret", stale)] and rows[("secret", stale)].endswith("stale")
    assert rows[("secret", fresh)].endswith("active")
    assert ("pod", stale) in rows
    other = _ktctl(kube_env, "status", "-n", namespace, user="someone-else")
    assert other.stdout.strip() == f"No ktproxy objects of user someone-else in namespace {namespace}"

    r = _ktctl(kube_env, "clean", "--dry-run", "-n", namespace)
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    assert f"Would delete pod {namespace}/{stale} (user e2e-user, last heartbeat 1h ago)" in r.stdout
    assert f"Would delete secret {namespace}/{stale}" in r.stdout
    assert fresh not in r.stdout
    assert not _gone(kubectl, namespace, "secret", stale) and not _gone(kubectl, namespace, "pod", stale)

    r = _ktctl(kube_env, "clean", "-n", namespace)
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    assert f"Deleted pod {namespace}/{stale}" in r.stdout
    assert f"Deleted secret {namespace}/{stale}" in r.stdout
    assert _gone(kubectl, namespace, "secret", stale)
    assert not _gone(kubectl, namespace, "secret", fresh)

    r = _ktctl(kube_env, "clean", "-n", namespace)
    assert r.stdout.strip() == f"Nothing to clean in namespace {namespace} (1 kt object(s) still active)"


# ---------------------------------------------------------------------------------------- error lines
def _one_error_line(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0
    assert len(lines) == 1, r.stderr
    return lines[0].split(" ERR ", 1)[1]


def test_unknown_namespace(kube_env):
    r = _ktctl(kube_env, "status", "-n", "kt-no-such-namespace")
    assert _one_error_line(r) == "namespace kt-no-such-namespace not found"


def test_unknown_context(kube_env, kubeconfig):
    r = _ktctl(kube_env, "clean", "--context", "nope")
    assert _one_error_line(r).startswith(f"context nope not found in kubeconfig {kubeconfig} (available: ")


def test_unreachable_api_server(kube_env, kubeconfig, tmp_path):
    import yaml

    cfg = yaml.safe_load(Path(kubeconfig).read_text())
    for c in cfg["clusters"]:
        c["cluster"]["server"] = "https://127.0.0.1:1"
    bad = tmp_path / "kubeconfig"
    bad.write_text(yaml.safe_dump(cfg))
    t0 = time.monotonic()
    r = _ktctl(kube_env, "status", "--kubeconfig", str(bad))
    assert time.monotonic() - t0 < 15
    assert (
        _one_error_line(r)
        == "cannot reach the Kubernetes API server at https://127.0.0.1:1: Connection refused"
    )


def test_forbidden_list_names_permission(kubectl, kube_env, namespace, kubeconfig, tmp_path):
    import yaml

    kubectl("create", "serviceaccount", "nobody", "-n", namespace)
    token = kubectl("create", "token", "nobody", "-n", namespace).stdout.strip()
    cfg = yaml.safe_load(Path(kubeconfig).read_text())
    for u in cfg["users"]:
        u["user"] = {"token": token}
    limited = tmp_path / "kubeconfig"
    limited.write_text(yaml.safe_dump(cfg))
    r = _ktctl(kube_env, "status", "--kubeconfig", str(limited), "-n", namespace)
    line = _one_error_line(r)
    assert line.startswith("no permission to list ") and line.endswith(f" in namespace {namespace}"), line


async def test_unknown_namespace_create(kube):
    opts = ShadowOptions(namespace="kt-no-such-namespace")
    c, h = _keys()
    with pytest.raises(KubeError) as ei:
        await create_shadow(kube, opts, c.export_public_key().decode(), h.export_private_key().decode())
    assert str(ei.value) == "namespace kt-no-such-namespace not found"


def test_env_has_no_proxy(kube_env):
    assert not any(k.lower().endswith("_proxy") for k in kube_env)
    assert os.path.exists(kube_env["KUBECONFIG"])
