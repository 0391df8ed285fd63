"""Shadow pod/Secret building, flag parsing and pod-state phrasing (no cluster needed)."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest
from kubernetes.client import V1Pod

from ktproxy import __version__
from ktproxy.cluster import meta
from ktproxy.commands.options import shadow_options
from ktproxy.errors import KtError, UsageError
from ktproxy.shadow.pod import (
    CONNECT,
    DEFAULT_IMAGE,
    ShadowOptions,
    ShadowRole,
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
    opts = shadow_options(_args(), "team")
    opts.user = "alice"
    pod = build_pod("kt-connect-shadow-abcde", "kt-connect-shadow-abcde", opts, 1700000000)
    md, spec = pod["metadata"], pod["spec"]
    assert md["labels"] == {"control-by": "kt", "kt-role": "shadow-connect"}
    assert md["annotations"] == {"kt-user": "alice", "kt-last-heart-beat": "1700000000"}
    assert md["namespace"] == "team"
    (c,) = spec["containers"]
    assert c["name"] == "shadow"
    assert c["image"] == DEFAULT_IMAGE == f"docker.io/ktproxy/shadow:{__version__}"
    assert c["imagePullPolicy"] == "IfNotPresent"
    assert c["command"] == ["/opt/ktproxy/bin/python", "-m", "shadow_image"]
    assert c["args"] == [
        "--authorized-keys", "/etc/ktproxy/authorized_keys",
        "--host-key", "/etc/ktproxy/ssh_host_key",
    ]  # fmt: skip
    assert c["ports"] == [{"name": "ssh", "containerPort": 2222, "protocol": "TCP"}]
    assert c["readinessProbe"]["tcpSocket"] == {"port": "ssh"}
    assert "startupProbe" not in c
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
    opts = shadow_options(
        _args(
            image="registry.local/shadow:dev",
            image_pull_secret="regcred, other",
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
    assert spec["imagePullSecrets"] == [{"name": "regcred"}, {"name": "other"}]
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


# ------------------------------------------------------------------------------------------- roles
EXCHANGE = ShadowRole(
    role=meta.ROLE_EXCHANGE_SHADOW,
    name_prefix="tomcat-kt-exchange-",
    ports=(("http", 8080), ("kt-9090", 9090), ("health", 2280)),
    args=("--expose", "8080,9090", "--health-port", "2280"),
    health_port="health",
    labels={"app": "tomcat"},
    annotations={meta.KT_CONFIG: "expose=8080"},
)


def test_role_shapes_the_pod():
    pod = build_pod("tomcat-kt-exchange-abcde", "s", ShadowOptions(namespace="team", user="a"), 1, EXCHANGE)
    md, c = pod["metadata"], pod["spec"]["containers"][0]
    assert md["labels"] == {"app": "tomcat", "control-by": "kt", "kt-role": "shadow-exchange"}
    assert md["annotations"]["kt-config"] == "expose=8080"
    # named ports: a Service whose targetPort is "http" resolves against the shadow
    assert c["ports"] == [
        {"name": "ssh", "containerPort": 2222, "protocol": "TCP"},
        {"name": "http", "containerPort": 8080, "protocol": "TCP"},
        {"name": "kt-9090", "containerPort": 9090, "protocol": "TCP"},
        {"name": "health", "containerPort": 2280, "protocol": "TCP"},
    ]
    assert c["args"][-4:] == ["--expose", "8080,9090", "--health-port", "2280"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "health"}
    assert "tcpSocket" not in c["readinessProbe"]
    # `started` says the SSH port listens (the client may attach); Ready waits for the laptop
    assert c["startupProbe"]["tcpSocket"] == {"port": "ssh"}
    assert "sysctls" not in pod["spec"]["securityContext"]  # every port >= 1024


def test_secret_gets_no_selector_labels():
    secret = build_secret("n", ShadowOptions(namespace="team", user="a"), PUB, HOST, 1, EXCHANGE)
    assert secret["metadata"]["labels"] == {"control-by": "kt", "kt-role": "shadow-exchange"}
    assert "kt-config" not in secret["metadata"]["annotations"]


def test_every_role_runs_locked_down():
    for role in (CONNECT, EXCHANGE):
        pod = build_pod("n", "s", ShadowOptions(namespace="team"), 1, role)
        sc = pod["spec"]["containers"][0]["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 65534
        assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}


def test_ports_below_1024_lower_the_unprivileged_port_start():
    low = dataclasses.replace(EXCHANGE, ports=(("http", 80), ("health", 2280)))
    pod = build_pod("n", "s", ShadowOptions(namespace="team"), 1, low)
    assert pod["spec"]["securityContext"]["sysctls"] == [
        {"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}]
    # no capability can do it for a non-root process: none is added back
    assert pod["spec"]["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}


@pytest.mark.parametrize("ports,health,message", [
    ((("HTTP", 80),), None, "not a valid port name"),
    ((("a-very-long-port-name", 80),), None, "not a valid port name"),
    ((("web", 2222),), None, "twice"),
    ((("ssh", 80),), None, "twice"),
    ((("web", 80), ("web", 81)), None, "twice"),
    ((("web", 0),), None, "not a port number"),
    ((("web", 80),), "health", "health port"),
])
def test_bad_role_ports_fail_before_any_call(ports, health, message):
    role = ShadowRole(role=meta.ROLE_PREVIEW_SHADOW, name_prefix="p-kt-", ports=ports, health_port=health)
    with pytest.raises(KtError, match=message):
        build_pod("n", "s", ShadowOptions(namespace="team"), 1, role)


def test_role_names():
    assert ShadowRole(meta.ROLE_PREVIEW_SHADOW, "tomcat-v2-kt-").new_name().startswith("tomcat-v2-kt-")
    long = ShadowRole(meta.ROLE_EXCHANGE_SHADOW, "s" * 70 + "-kt-exchange-").new_name()
    assert len(long) == 63 and long[-6] == "-"


def test_default_image_tag_follows_the_package_version():
    # A fresh interpreter, so the module computes its default from a version other than today's.
    code = ("import ktproxy; ktproxy.__version__ = '9.8.7'; "
            "from ktproxy.shadow.pod import DEFAULT_IMAGE; print(DEFAULT_IMAGE)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "docker.io/ktproxy/shadow:9.8.7"
