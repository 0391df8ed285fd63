"""Shadow pod/Secret building, flag parsing and pod-state phrasing (no cluster needed)."""

from __future__ import annotations

import argparse

import pytest
from kubernetes.client import V1Pod

from ktproxy.errors import KtError, UsageError
from ktproxy.kube import meta
from ktproxy.kube.shadow import (
    DEFAULT_IMAGE,
    ShadowOptions,
    build_pod,
    build_secret,
    new_name,
    pod_state,
)

PUB = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKtest session"
HOST = "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n"


def test_name_shape():
    for _ in range(50):
        n = new_name()
        assert n.startswith("kt-connect-shadow-")
        tail = n.removeprefix("kt-connect-shadow-")
        assert len(tail) == 5 and tail.isalnum() and tail == tail.lower()


@pytest.mark.parametrize(
    "text,expected",
    [
        (None, {}),
        ("", {}),
        ("a=b", {"a": "b"}),
        ("a=b,c=d", {"a": "b", "c": "d"}),
        (" a = b , kubernetes.io/os=linux ", {"a": "b", "kubernetes.io/os": "linux"}),
        ("k:v", {"k": "v"}),
        ("x=a=b", {"x": "a=b"}),
        ("a=,", {"a": ""}),
    ],
)
def test_parse_kv_list(text, expected):
    assert meta.parse_kv_list(text) == expected


def test_parse_kv_list_errors_name_the_flag():
    with pytest.raises(UsageError, match="--with-label expects key=value"):
        meta.parse_kv_list("novalue", "--with-label")
    with pytest.raises(UsageError, match="empty key"):
        meta.parse_kv_list("=v", "--node-selector")


def test_parse_pod_quota():
    assert meta.parse_pod_quota("500m,512Mi") == {"cpu": "500m", "memory": "512Mi"}
    assert meta.parse_pod_quota("1") == {"cpu": "1"}
    assert meta.parse_pod_quota(",256Mi") == {"memory": "256Mi"}
    with pytest.raises(UsageError):
        meta.parse_pod_quota("1,2,3")


def _args(**kw):
    base = dict(
        image=None,
        image_pull_secret=None,
        service_account=None,
        node_selector=None,
        with_label=None,
        with_annotation=None,
        pod_quota=None,
    )
    base.update(kw)
    return argparse.Namespace(**base)


def test_default_pod_spec():
    opts = ShadowOptions.from_args(_args(), "team")
    opts.user = "alice"
    pod = build_pod("kt-connect-shadow-abcde", "kt-connect-shadow-abcde", opts, 1700000000)
    md, spec = pod["metadata"], pod["spec"]
    assert md["labels"] == {"control-by": "kt", "kt-role": "shadow-connect"}
    assert md["annotations"] == {"kt-user": "alice", "kt-last-heart-beat": "1700000000"}
    assert md["namespace"] == "team"
    (c,) = spec["containers"]
    assert c["name"] == "shadow"
    assert c["image"] == DEFAULT_IMAGE == "docker.io/ktproxy/shadow:0.1.0"
    assert c["imagePullPolicy"] == "IfNotPresent"
    assert c["command"] == ["/opt/ktproxy/bin/python", "-m", "shadow_image"]
    assert c["args"] == [
        "--listen", "0.0.0.0:2222",
        "--authorized-keys", "/etc/ktproxy/authorized_keys",
        "--host-key", "/etc/ktproxy/ssh_host_key",
    ]  # fmt: skip
    assert c["readinessProbe"]["tcpSocket"] == {"port": 2222}
    assert c["volumeMounts"] == [{"name": "ktproxy", "mountPath": "/etc/ktproxy", "readOnly": True}]
    assert spec["volumes"] == [
        {"name": "ktproxy", "secret": {"secretName": "kt-connect-shadow-abcde", "defaultMode": 0o400}}
    ]
    assert spec["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in spec
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 65534
    assert "resources" not in c
    assert "nodeSelector" not in spec and "imagePullSecrets" not in spec


def test_pod_spec_honours_flags():
    opts = ShadowOptions.from_args(
        _args(
            image="registry.local/shadow:dev",
            image_pull_secret="regcred",
            service_account="kt-sa",
            node_selector="kubernetes.io/os=linux,pool=dev",
            with_label="team=a,control-by=someone-else",
            with_annotation="owner=alice",
            pod_quota="250m,128Mi",
        ),
        "team",
    )
    pod = build_pod("n", "n", opts, 1)
    spec, c = pod["spec"], pod["spec"]["containers"][0]
    assert c["image"] == "registry.local/shadow:dev"
    assert "command" not in c  # a custom image keeps its own entrypoint
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["serviceAccountName"] == "kt-sa"
    assert spec["automountServiceAccountToken"] is True
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux", "pool": "dev"}
    # user labels are kept, but never override ours (clean must find the pod)
    assert pod["metadata"]["labels"] == {"team": "a", "control-by": "kt", "kt-role": "shadow-connect"}
    assert pod["metadata"]["annotations"]["owner"] == "alice"
    assert c["resources"] == {
        "requests": {"cpu": "250m", "memory": "128Mi"},
        "limits": {"cpu": "250m", "memory": "128Mi"},
    }


def test_secret_holds_public_key_and_host_key_only():
    opts = ShadowOptions(namespace="team", user="bob")
    s = build_secret("kt-connect-shadow-abcde", opts, PUB, HOST, 5)
    assert s["stringData"] == {"authorized_keys": PUB + "\n", "ssh_host_key": HOST}
    assert s["metadata"]["labels"]["control-by"] == "kt"
    assert s["metadata"]["annotations"]["kt-user"] == "bob"
    with pytest.raises(KtError, match="refusing"):
        build_secret("x", opts, HOST, HOST, 5)
    with pytest.raises(KtError, match="host key"):
        build_secret("x", opts, PUB, PUB, 5)


def _pod(status: dict, deleting: bool = False) -> V1Pod:
    md = {"name": "p"}
    if deleting:
        md["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    return V1Pod.from_dict({"metadata": md, "status": status})


def _cs(state: dict, restarts: int = 0) -> dict:
    return {
        "name": "shadow",
        "ready": False,
        "restartCount": restarts,
        "image": "i",
        "imageID": "",
        "state": state,
    }


def test_pod_state_phrases():
    assert pod_state(_pod({"phase": "Pending"})).summary == "Pending: waiting to be scheduled"
    s = pod_state(
        _pod(
            {
                "phase": "Pending",
                "conditions": [
                    {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                     "message": "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."}
                ],
            }
        )
    )  # fmt: skip
    assert s.summary == "Pending: Unschedulable" and not s.fatal and "node affinity" in s.message
    s = pod_state(
        _pod(
            {
                "phase": "Pending",
                "conditions": [{"type": "PodScheduled", "status": "True"}],
                "containerStatuses": [_cs({"waiting": {"reason": "ContainerCreating"}})],
            }
        )
    )
    assert s.summary == "Pending: ContainerCreating" and not s.fatal
    s = pod_state(
        _pod(
            {
                "phase": "Pending",
                "conditions": [{"type": "PodScheduled", "status": "True"}],
                "containerStatuses": [
                    _cs({"waiting": {"reason": "ImagePullBackOff", "message": "Back-off"}})
                ],
            }
        )
    )
    assert s.fatal and s.reason == "ImagePullBackOff"
    s = pod_state(
        _pod(
            {
                "phase": "Running",
                "conditions": [
                    {"type": "PodScheduled", "status": "True"},
                    {"type": "Ready", "status": "False"},
                ],
                "containerStatuses": [_cs({"waiting": {"reason": "CrashLoopBackOff"}}, restarts=3)],
            }
        )
    )
    assert s.fatal and s.summary == "Running: CrashLoopBackOff"
    s = pod_state(
        _pod(
            {
                "phase": "Running",
                "conditions": [
                    {"type": "PodScheduled", "status": "True"},
                    {"type": "Ready", "status": "True"},
                ],
                "containerStatuses": [_cs({"running": {}})],
            }
        )
    )
    assert s.ready
    assert pod_state(_pod({"phase": "Running"}, deleting=True)).fatal
