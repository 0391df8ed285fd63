"""KubeClient loading and the one-line error messages (no cluster needed)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest
import urllib3
import yaml
from kubernetes.client.exceptions import ApiException

from ktproxy.cluster.client import KubeClient
from ktproxy.cluster.errors import Access, KubeError, api_error, forbidden_message


def _kubeconfig(tmp_path, server="https://127.0.0.1:1", ns=None, name="kubeconfig"):
    ctx = {"cluster": "c", "user": "u"}
    if ns:
        ctx["namespace"] = ns
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": server, "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"token": "abc"}}],
        "contexts": [
            {"name": "dev", "context": ctx},
            {"name": "other", "context": {"cluster": "c", "user": "u"}},
        ],
        "current-context": "dev",
    }
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_namespace_from_context_flag_and_default(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBECONFIG", raising=False)
    p = _kubeconfig(tmp_path, ns="team")
    k = KubeClient.load(str(p))
    assert (k.context, k.namespace) == ("dev", "team")
    assert KubeClient.load(str(p), namespace="x").namespace == "x"
    assert KubeClient.load(str(p), context="other").namespace == "default"
    monkeypatch.setenv("KUBECONFIG", str(p))
    assert KubeClient.load().context == "dev"


def test_token_is_used(tmp_path):
    k = KubeClient.load(str(_kubeconfig(tmp_path)))
    assert k.configuration.get_api_key_with_prefix("BearerToken", alias="authorization") == "Bearer abc"


def test_unknown_context_is_one_line(tmp_path):
    p = _kubeconfig(tmp_path)
    with pytest.raises(KubeError) as ei:
        KubeClient.load(str(p), context="nope")
    assert str(ei.value) == f"context nope not found in kubeconfig {p} (available: dev, other)"


def test_missing_kubeconfig(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(
        KubeError, match=r"kubeconfig .*/missing not found \(use --kubeconfig or set KUBECONFIG\)"
    ):
        KubeClient.load(str(tmp_path / "missing"))


def test_forbidden_names_verb_resource_namespace():
    body = json.dumps(
        {
            "kind": "Status",
            "code": 403,
            "reason": "Forbidden",
            "message": 'pods is forbidden: User "dev" cannot create resource "pods" in API group "" '
            'in the namespace "team"',
        }
    )
    assert forbidden_message(body, None) == "no permission to create pods in namespace team"
    body2 = json.dumps({"message": 'deployments.apps "x" is forbidden: User "dev" cannot patch resource '
                        '"deployments" in API group "apps" in the namespace "t"'})  # fmt: skip
    assert forbidden_message(body2, None) == "no permission to patch deployments.apps in namespace t"
    body3 = json.dumps(
        {"message": 'nodes is forbidden: User "dev" cannot list resource "nodes" in API group ""'}
    )
    assert forbidden_message(body3, None) == "no permission to list nodes (cluster scope)"
    # no parseable message: fall back to what the caller said it needed
    assert forbidden_message("", Access("create", "pods/portforward", "x")) == (
        "no permission to create pods/portforward in namespace x"
    )


def test_api_error_mapping():
    exc = ApiException(status=404, reason="Not Found")
    exc.body = json.dumps(
        {"kind": "Status", "code": 404, "reason": "NotFound", "message": 'namespaces "nope" not found'}
    )
    err = api_error(exc, "https://h", Access("create", "pods", "nope"))
    assert str(err) == "namespace nope not found"
    exc = ApiException(status=401, reason="Unauthorized")
    assert "rejected the credentials" in str(api_error(exc, "https://h"))
    e = urllib3.exceptions.MaxRetryError(
        None, "/version", urllib3.exceptions.NewConnectionError(None, "[Errno 111] Connection refused")
    )
    assert str(api_error(e, "https://h:6443")) == (
        "cannot reach the Kubernetes API server at https://h:6443: Connection refused"
    )


async def test_unreachable_api_server_is_fast(tmp_path):
    k = KubeClient.load(str(_kubeconfig(tmp_path, server="https://127.0.0.1:1")))
    t0 = time.monotonic()
    with pytest.raises(KubeError, match=r"^cannot reach the Kubernetes API server at https://127.0.0.1:1: "):
        await k.cluster_time()
    assert time.monotonic() - t0 < 5


async def _fake_api(served: list[bytes]) -> tuple[asyncio.Server, str]:
    """A loopback keep-alive HTTP server with a fixed Date header standing in for the API server: /version
    for GETs, a Secret for anything else. Each response goes out in one write, headers and body together,
    so the client buffers a body it does not read."""

    async def handle(reader, writer):
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if length:
                await reader.readexactly(length)
            served.append(head.split(b" ")[0])
            if head.startswith(b"GET"):
                body = b'{"major":"1","minor":"34","gitVersion":"v1.34.4"}'
            else:
                body = json.dumps({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}}).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nDate: Tue, 02 Jan 2024 03:04:05 GMT\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_cluster_time_from_date_header(tmp_path):
    server, url = await _fake_api([])
    k = KubeClient.load(str(_kubeconfig(tmp_path, server=url)))
    k.configuration.proxy = None
    t = await k.cluster_time()
    assert t.isoformat() == "2024-01-02T03:04:05+00:00"
    k.close()
    server.close()


async def test_cluster_time_leaves_the_pooled_connection_reusable(tmp_path):
    """cluster_time reads only a header; the body must still be consumed before the keep-alive connection
    goes back to the pool, or the next call on it (a create, which is never retried) fails with
    'Connection aborted ... ResponseNotReady' (seen in CI on the real API server)."""
    served: list[bytes] = []
    server, url = await _fake_api(served)
    k = KubeClient.load(str(_kubeconfig(tmp_path, server=url)))
    k.configuration.proxy = None
    # Keep every raw /version response referenced, as any lingering reference (a frame, a log record) did
    # in CI: without that, CPython's refcounting closes the unread response early and hides the bug.
    kept = []
    get_code = k.version_api.get_code

    def keeping(*args, **kwargs):
        kept.append(get_code(*args, **kwargs))
        return kept[-1]

    k.version_api.get_code = keeping
    try:
        for _ in range(20):
            await k.cluster_time()
            secret = await k.call(k.core.create_namespaced_secret, "default", {"metadata": {"name": "s"}})
            assert secret.metadata.name == "s"
        assert served.count(b"POST") == 20
    finally:
        k.close()
        server.close()


@pytest.fixture
def unreadable_key():
    """A kubeconfig whose client key file has mode 000, and a way to act as a user (nobody) who cannot
    read it. The tests run as root, who reads anything: the effective uid is dropped around the calls
    only (the real uid stays root, so it can be restored), with what those calls import loaded first."""
    if not hasattr(os, "seteuid"):
        pytest.skip("POSIX only")
    import concurrent.futures.thread  # noqa: F401 - imported before the uid drop: nobody cannot read /root

    tmp_path = Path(tempfile.mkdtemp(prefix="ktp-unit-"))  # pytest's tmp_path is private to root
    key = tmp_path / "client.key"
    cert = tmp_path / "client.crt"
    key.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    cert.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    cfg = tmp_path / "kubeconfig"
    cfg.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1", "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"client-certificate": str(cert), "client-key": str(key)}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
    }))
    for p in (cert, cfg):
        p.chmod(0o644)
    key.chmod(0o000)
    tmp_path.chmod(0o755)

    @contextlib.contextmanager
    def as_nobody():
        if os.geteuid() != 0:
            yield  # already unprivileged: mode 000 is enough
            return
        os.setegid(65534)
        os.seteuid(65534)
        try:
            yield
        finally:
            os.seteuid(0)
            os.setegid(0)

    yield cfg, key, as_nobody
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_unreadable_key_file_is_named_at_load(unreadable_key):
    cfg, key, as_nobody = unreadable_key
    with as_nobody(), pytest.raises(KubeError) as ei:
        KubeClient.load(str(cfg))
    assert str(ei.value) == f"kubeconfig context c: cannot read the client key file {key}: Permission denied"


async def test_unreadable_key_file_is_named_on_a_call(unreadable_key):
    """The loader's own path: the key is read at the first request, inside urllib3's TLS set-up, which
    reports the PermissionError as 'Connection aborted' (it used to read 'cannot reach the API server')."""
    cfg, key, as_nobody = unreadable_key
    kube = KubeClient.load(str(cfg))  # as root: readable now, not when the request goes out
    with socket.create_server(("127.0.0.1", 0)) as listener:  # TLS set-up starts once TCP connects
        kube.configuration.host = f"https://127.0.0.1:{listener.getsockname()[1]}"
        kube.api.configuration.host = kube.configuration.host
        with as_nobody(), pytest.raises(KubeError) as ei:
            await kube.cluster_time()
    assert str(ei.value) == f"cannot read the client key file {key}: Permission denied"
