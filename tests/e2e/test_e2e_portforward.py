"""PortForwardTunnel / open_stream against the real local cluster's API server and kubelet.

A test pod runs the demo HTTP server (tomcat:9 stand-in, port 8080) plus two tiny python servers from the
same image: an echo on 9000 and a 200 MB source on 9001. Traffic goes only to the local API server.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import time

import pytest

from ktproxy.cluster.client import KubeClient, KubeError
from ktproxy.cluster.portforward import PortForwardError, PortForwardTunnel, open_stream

pytestmark = pytest.mark.cluster

SERVERS = r"""
import os, socket, threading
def echo(c):
    while True:
        d = c.recv(65536)
        if not d:
            break
        c.sendall(d)
    c.close()
def source(c):
    chunk = os.urandom(1 << 20)
    try:
        for _ in range(200):
            c.sendall(chunk)
    except OSError:
        pass
    c.close()
def serve(port, fn):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(16)
    while True:
        c, _ = s.accept()
        threading.Thread(target=fn, args=(c,), daemon=True).start()
threading.Thread(target=serve, args=(9001, source), daemon=True).start()
serve(9000, echo)
"""


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@pytest.fixture(scope="module")
def pf_pod(kubectl, module_namespace, cluster):
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "pf-target", "namespace": module_namespace},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "containers": [
                {"name": "web", "image": cluster.demo_image, "imagePullPolicy": "IfNotPresent",
                 "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}},
                {"name": "tools", "image": cluster.demo_image, "imagePullPolicy": "IfNotPresent",
                 "command": ["python3", "-c", SERVERS],
                 "readinessProbe": {"tcpSocket": {"port": 9000}, "periodSeconds": 1}},
            ],
        },
    }  # fmt: skip
    kubectl("apply", "-f", "-", input=json.dumps(pod))
    kubectl("wait", "--for=condition=Ready", "pod/pf-target", "-n", module_namespace, "--timeout=120s")
    return module_namespace, "pf-target"


@pytest.fixture
def kube(kubeconfig, module_namespace):
    k = KubeClient.load(str(kubeconfig), namespace=module_namespace)
    k.configuration.proxy = None  # the cluster is local; never through an outside proxy
    yield k
    k.close()


async def test_http_through_portforward(kube, pf_pod):
    ns, pod = pf_pod
    reader, writer = await open_stream(kube, ns, pod, 8080)
    writer.write(b"GET /nothing-here HTTP/1.1\r\nHost: pf\r\nConnection: close\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 15)
    assert data.startswith(b"HTTP/1.1 404 "), data[:100]
    assert b"Server: demo-http/1" in data
    writer.close()


async def test_10mb_echo_integrity(kube, pf_pod):
    ns, pod = pf_pod
    reader, writer = await open_stream(kube, ns, pod, 9000)
    payload = os.urandom(10 * 1024 * 1024)

    async def send():
        for i in range(0, len(payload), 256 * 1024):
            writer.write(payload[i : i + 256 * 1024])
            await writer.drain()

    t0 = time.monotonic()
    sender = asyncio.create_task(send())
    got = await asyncio.wait_for(reader.readexactly(len(payload)), 120)
    await sender
    elapsed = time.monotonic() - t0
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
    print(f"10 MB echoed through the port-forward in {elapsed:.2f}s ({20 / elapsed:.1f} MB/s both ways)")
    writer.close()


async def test_slow_reader_does_not_grow_memory(kube, pf_pod):
    """The pod pushes 200 MB; a reader that stops reading must stall the stream, not buffer it."""
    ns, pod = pf_pod
    rss0 = _rss_kb()
    reader, writer = await open_stream(kube, ns, pod, 9001, limit=64 * 1024)
    first = await asyncio.wait_for(reader.read(65536), 15)
    assert first
    await asyncio.sleep(4)  # not reading: pause_reading -> websocket not read -> TCP window closes
    assert not writer.transport.is_reading()
    assert len(reader._buffer) <= 2 * 64 * 1024 + 256 * 1024
    grown_mb = (_rss_kb() - rss0) / 1024
    assert grown_mb < 40, f"RSS grew {grown_mb:.0f} MB while the reader was paused"
    # and it flows again once we read
    total = len(first)
    while total < 50 * 1024 * 1024:
        chunk = await asyncio.wait_for(reader.read(1 << 20), 30)
        assert chunk
        total += len(chunk)
    writer.close()


async def test_nothing_listening_reports_error_channel(kube, pf_pod):
    ns, pod = pf_pod
    reader, writer = await open_stream(kube, ns, pod, 9999)
    with pytest.raises((PortForwardError, ConnectionError)) as ei:
        await asyncio.wait_for(reader.read(100), 30)
    print("error line:", ei.value)
    writer.close()


async def test_missing_pod_is_one_line(kube, module_namespace):
    with pytest.raises(KubeError) as ei:
        await open_stream(kube, module_namespace, "no-such-pod", 80)
    assert str(ei.value).startswith(f"cannot port-forward to pod {module_namespace}/no-such-pod port 80: ")
    assert "\n" not in str(ei.value)


async def test_tunnel_create_connection_with_plain_protocol(kube, pf_pod):
    """PortForwardTunnel.create_connection as asyncssh calls it (SSH itself: test_e2e_shadow)."""
    ns, pod = pf_pod
    tunnel = PortForwardTunnel(kube, ns, pod, 9000)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _protocol = await tunnel.create_connection(
        lambda: asyncio.StreamReaderProtocol(reader, loop=loop)
    )
    transport.write(b"ping\n")
    assert await asyncio.wait_for(reader.readexactly(5), 15) == b"ping\n"
    transport.close()


async def test_forbidden_portforward_names_the_permission(kubectl, kube, pf_pod, kubeconfig, tmp_path):
    """A service account that may get pods but not create pods/portforward gets one clear line."""
    ns, pod = pf_pod
    kubectl("create", "serviceaccount", "pf-reader", "-n", ns)
    kubectl("create", "role", "pod-reader", "--verb=get,list", "--resource=pods", "-n", ns)
    kubectl(
        "create",
        "rolebinding",
        "pf-reader",
        "--role=pod-reader",
        f"--serviceaccount={ns}:pf-reader",
        "-n",
        ns,
    )
    token = kubectl("create", "token", "pf-reader", "-n", ns).stdout.strip()
    cfg = kube.configuration
    limited = KubeClient.load(str(kubeconfig), namespace=ns)
    limited.configuration.proxy = None
    limited.configuration.cert_file = None
    limited.configuration.key_file = None
    limited.configuration.api_key = {"BearerToken": token}
    limited.configuration.api_key_prefix = {"BearerToken": "Bearer"}
    limited.configuration.refresh_api_key_hook = None
    assert cfg is not limited.configuration
    with pytest.raises(KubeError) as ei:
        await open_stream(limited, ns, pod, 9000)
    # The apiserver names the verb it checked: `get` up to 1.34 for WebSocket upgrades, `create` on
    # newer servers (AuthorizePodWebsocketUpgradeCreatePermission); the line quotes what it said.
    assert re.fullmatch(f"no permission to (get|create) pods/portforward in namespace {ns}", str(ei.value))
    limited.close()


async def test_keepalive_messages_are_harmless_to_the_kubelet(kube, pf_pod):
    """Empty keepalive messages and pings every 0.3 s: the stream keeps working and is not closed."""
    ns, pod = pf_pod
    reader, writer = await open_stream(kube, ns, pod, 9000, keepalive=0.3)
    for i in range(6):
        await asyncio.sleep(0.5)
        writer.write(f"tick {i}\n".encode())
        assert await asyncio.wait_for(reader.readline(), 10) == f"tick {i}\n".encode()
    assert not writer.transport.is_closing()
    writer.close()
