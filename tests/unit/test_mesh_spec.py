"""ktctl mesh's inputs and objects as data: --version-mark as kt-connect parses it (but refusing what it
only warned about), the names, the Service's port map, the router pod and the Services."""

from __future__ import annotations

import argparse

import pytest
from fake_kube import model, service

from ktproxy.cli import build_parser
from ktproxy.cluster import meta
from ktproxy.commands.mesh import auto_banner, manual_banner
from ktproxy.errors import KtError, UsageError
from ktproxy.mesh.participant import probe_request
from ktproxy.mesh.spec import (
    MeshPort,
    check_label_key,
    check_names,
    mesh_service,
    parse_version_mark,
    port_map,
    router_labels,
    router_pod,
    stuntman_service,
)


# ------------------------------------------------------------------------------------------ version mark
@pytest.mark.parametrize("text, key, value", [
    ("abcde", "version", "abcde"),
    ("env:dev1", "env", "dev1"),
    ("x-user:alice", "x-user", "alice"),
    ("my_key:v-1", "my_key", "v-1"),
])
def test_version_mark_given(text: str, key: str, value: str) -> None:
    mark = parse_version_mark(text)
    assert (mark.key, mark.value) == (key, value)


@pytest.mark.parametrize("text, key", [("", "version"), ("env:", "env"), (None, "version")])
def test_version_mark_random_value_is_five_lower_case_letters(text: str | None, key: str) -> None:
    values = {parse_version_mark(text).value for _ in range(20)}
    assert len(values) > 1  # random
    for value in values:
        assert len(value) == 5 and value.isalpha() and value.islower()
    assert parse_version_mark(text).key == key


@pytest.mark.parametrize("text, names", [
    ("Version:abc", "'Version'"),  # kt-connect warned and fell back to `version`: a silent wrong header
    ("bad key:abc", "'bad key'"),
    ("1key:abc", "'1key'"),
    (":abc", "''"),
    ("UPPER_case", "'UPPER_case'"),  # a value becomes part of a Service name
    ("version:a.b", "'a.b'"),
    ("version:-ab", "'-ab'"),
    ("version:" + "a" * 41, "'" + "a" * 41 + "'"),
])
def test_version_mark_refused_in_one_line(text: str, names: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_version_mark(text)
    assert names in str(err.value) and "\n" not in str(err.value)


def test_banners_as_kt_connect_prints_them() -> None:
    mark = parse_version_mark("abcde")
    assert auto_banner(mark) == "Now you can access your service by header 'VERSION: abcde'"
    assert manual_banner(mark) == "Now you can update Istio rule by label 'version=abcde'"
    assert auto_banner(parse_version_mark("x-dev:me")) == "Now you can access your service by header 'X-DEV: me'"


def test_probe_is_an_options_request_with_the_header() -> None:
    raw = probe_request("tomcat", parse_version_mark("abcde"))
    assert raw == b"OPTIONS * HTTP/1.1\r\nHost: tomcat\r\nVERSION: abcde\r\nConnection: close\r\n\r\n"


def test_manual_mode_key_must_be_a_label_name() -> None:
    check_label_key(parse_version_mark("version:abc"))
    with pytest.raises(UsageError, match="'env-'"):
        check_label_key(parse_version_mark("env-:abc"))


def test_names_must_stay_one_dns_label() -> None:
    check_names("tomcat", "abcde")
    with pytest.raises(UsageError, match="too long"):
        check_names("s" * 50, "abcdefgh")
    with pytest.raises(UsageError, match="too long"):
        check_names("s" * 52)  # <svc>-kt-stuntman


def test_cli_flags_and_kt_connect_spelling() -> None:
    args = build_parser().parse_args(["mesh", "tomcat", "--expose", "8080", "--versionMark", "k:v",
                                      "--skipPortChecking", "--mode", "manual", "--auto-header"])
    assert isinstance(args, argparse.Namespace)
    assert (args.service, args.expose, args.version_mark, args.skip_port_checking, args.mode, args.auto_header) == \
        ("tomcat", "8080", "k:v", True, "manual", True)
    defaults = build_parser().parse_args(["mesh", "tomcat", "--expose", "8080"])
    assert (defaults.mode, defaults.version_mark, defaults.auto_header, defaults.timeout) == ("auto", "", False, 120)


# ------------------------------------------------------------------------------------------ ports
def test_port_map_covers_every_tcp_port_and_resolves_names() -> None:
    svc = model("service", service("tomcat", {"app": "tomcat"}, [
        {"name": "web", "port": 80, "targetPort": "http", "protocol": "TCP"},
        {"name": "alt", "port": 9090, "targetPort": 9091, "protocol": "TCP"},
        {"name": "dns", "port": 53, "targetPort": 53, "protocol": "UDP"},
        {"name": "web2", "port": 81, "targetPort": "http", "protocol": "TCP"},  # same target: served once
    ]))
    assert port_map(svc, {"http": 8080}) == [MeshPort(80, 8080, "http"), MeshPort(9090, 9091)]


def test_port_map_refuses_a_service_without_tcp() -> None:
    svc = model("service", service("dns", {"app": "dns"}, [{"port": 53, "targetPort": 53, "protocol": "UDP"}]))
    with pytest.raises(KtError, match="no TCP port"):
        port_map(svc, {})


# ------------------------------------------------------------------------------------------ objects
PORTS = [MeshPort(80, 8080, "http"), MeshPort(9090, 9091)]


def test_router_pod_spec() -> None:
    labels = {meta.KT_ROLE: meta.ROLE_ROUTER, meta.KT_TARGET: "t" * 20}
    pod = router_pod("tomcat", "team", PORTS, labels, [("version", "abcde")], "img:1", 1700000000,
                     image_pull_secrets=["pull"], node_selector={"zone": "a"})
    md = pod["metadata"]
    assert md["name"] == "tomcat-kt-router"
    assert md["labels"] == {**labels, "control-by": "kt"}
    assert md["annotations"] == {"kt-config": "service=tomcat", "kt-last-heart-beat": "1700000000",
                                 "kt-mesh-routes": "version:abcde", "kt-ref-count": "1"}
    spec = pod["spec"]
    assert spec["automountServiceAccountToken"] is False  # the router needs no API credentials
    (c,) = spec["containers"]
    assert c["image"] == "img:1"
    assert c["command"] == ["/opt/ktproxy/bin/python", "-m", "shadow_image.router"]
    assert c["args"] == ["--service", "tomcat", "--port", "8080:80,9091:9090", "--health-port", "2280",
                         "--annotations", "/etc/kt-router/annotations"]
    # A named targetPort keeps resolving once the Service selects the router.
    assert [(p["name"], p["containerPort"]) for p in c["ports"]] == [("http", 8080), ("kt-9091", 9091),
                                                                     ("kt-health", 2280)]
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "kt-health"}
    assert c["volumeMounts"] == [{"name": "kt-router", "mountPath": "/etc/kt-router", "readOnly": True}]
    assert spec["volumes"] == [{"name": "kt-router", "downwardAPI": {"items": [
        {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}]}}]
    assert c["securityContext"]["runAsNonRoot"] is True and "sysctls" not in spec["securityContext"]
    assert spec["imagePullSecrets"] == [{"name": "pull"}] and spec["nodeSelector"] == {"zone": "a"}


def test_router_health_port_avoids_target_ports_and_low_ports_get_the_sysctl() -> None:
    pod = router_pod("web", "team", [MeshPort(80, 80), MeshPort(2280, 2280)], {}, [], "img", 1)
    (c,) = pod["spec"]["containers"]
    assert c["args"][c["args"].index("--health-port") + 1] == "2281"
    assert pod["spec"]["securityContext"]["sysctls"] == [
        {"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}]
    assert pod["metadata"]["annotations"]["kt-ref-count"] == "0"


def test_router_labels_follow_a_switched_selector() -> None:
    switched = model("service", service("tomcat", {"kt-role": "router", "kt-target": "abc"}, []))
    assert router_labels(switched) == {"kt-role": "router", "kt-target": "abc"}
    fresh = router_labels(model("service", service("tomcat", {"app": "tomcat"}, [])))
    assert fresh["kt-role"] == "router" and len(fresh["kt-target"]) == 20


def test_stuntman_and_mesh_services() -> None:
    stunt = stuntman_service("tomcat", "team", PORTS, {"app": "tomcat"}, 5)
    assert stunt["metadata"]["name"] == "tomcat-kt-stuntman"
    assert stunt["metadata"]["labels"] == {"control-by": "kt"}
    assert stunt["spec"]["selector"] == {"app": "tomcat"}
    assert stunt["spec"]["ports"] == [
        {"name": "kt-80", "port": 80, "targetPort": 8080, "protocol": "TCP"},
        {"name": "kt-9090", "port": 9090, "targetPort": 9091, "protocol": "TCP"}]
    own = mesh_service("tomcat", "team", ("version", "abcde"), PORTS,
                       {"kt-role": "shadow-mesh", "kt-target": "x" * 20, "app": "ignored"}, "alice", 5)
    assert own["metadata"]["name"] == "tomcat-kt-mesh-abcde"
    assert own["spec"]["selector"] == {"kt-role": "shadow-mesh", "kt-target": "x" * 20}
    assert own["metadata"]["labels"] == {"kt-role": "shadow-mesh", "control-by": "kt"}
    assert own["metadata"]["annotations"]["kt-config"] == "service=tomcat,route=version:abcde"
    assert own["metadata"]["annotations"]["kt-user"] == "alice"


def test_the_router_pods_grace_outlasts_its_drain() -> None:
    """Issue 18 G8: a grace equal to the router's drain let the kubelet kill it exactly as the drain ended;
    the pod's grace must leave a margin after the drain to close connections and exit."""
    from ktproxy.mesh.spec import ROUTER_GRACE_SECONDS, router_pod
    from shadow_image.router.server import DRAIN

    assert ROUTER_GRACE_SECONDS >= DRAIN + 3, (ROUTER_GRACE_SECONDS, DRAIN)
    body = router_pod("tomcat", "default", [], {"kt-role": "router"}, [], "img", 0)
    assert body["spec"]["terminationGracePeriodSeconds"] == ROUTER_GRACE_SECONDS
