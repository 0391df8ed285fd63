"""The seed's preview and forward on the real local cluster, ktctl run as an unprivileged user.

preview registers the laptop's 127.0.0.1:8080 ("kt-connect local v2") as Service tomcat-v2; forward maps
it (or any service, pod or address of the cluster) to a local port, and keeps answering when the pod
behind a service is deleted and replaced.
"""

from __future__ import annotations

import socket
import subprocess

import pytest

pytest.register_assert_rewrite("ktctl_runner")
from ktctl_runner import (  # noqa: E402
    DEMO,
    LOCAL,
    RULE,
    SHADOW_RULES,
    ClientPod,
    Ktctl,
    error_lines,
    free_port,
    kt_objects,
    kubectl,
    local_get,
    service_account_kubeconfig,
    wait_for,
    write_page,
)

pytestmark = pytest.mark.cluster
pytest_plugins = ["ktctl_runner"]  # its fixtures: ktctl, demo, client_pod, local_server

PREVIEW_BANNER = "Now you can access your local service in cluster by name 'tomcat-v2'"


@pytest.fixture(scope="module")
def preview(ktctl: Ktctl, demo: str, local_server: int):
    p = ktctl.start("preview", "tomcat-v2", "--expose", "8080")
    p.wait_banner(PREVIEW_BANNER)
    yield p
    p.stop()


def _port_free(port: int) -> int:
    """The seed's fixed local port, if this machine has it free (else the test is meaningless)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            pytest.skip(f"local port {port} is taken on this machine")
    return port


def test_seed_preview(preview, demo: str, client_pod: ClientPod) -> None:
    lines = preview.output().splitlines()
    at = next(i for i, line in enumerate(lines) if line.endswith(PREVIEW_BANNER))
    assert lines[at - 1].endswith(RULE) and lines[at + 1].endswith(RULE), preview.output()
    assert "Service tomcat-v2 now sends its traffic to shadow pod" in preview.output()
    checked = next(i for i, line in enumerate(lines) if "Checked: service tomcat-v2 (" in line)
    assert checked < at, preview.output()  # the cluster IP reached the laptop before the banner
    assert client_pod.get("http://tomcat-v2:8080") == LOCAL
    svc = kubectl("-n", demo, "get", "svc", "tomcat-v2", "-o", "jsonpath={.spec.type} {.metadata.labels.control-by}")
    assert svc.stdout == "ClusterIP kt"


def test_seed_forward_of_the_preview(ktctl: Ktctl, preview, demo: str) -> None:
    port = _port_free(6060)
    f = ktctl.start("forward", "tomcat-v2", "6060:8080")
    f.wait_banner("Now you can access port 8080 of service 'tomcat-v2' via 'localhost:6060'")
    assert local_get(f"http://localhost:{port}") == LOCAL
    assert f.stop() in (0, 130)


def test_preview_name_taken(ktctl: Ktctl, demo: str, local_server: int) -> None:
    before = kt_objects(demo)
    r = ktctl.run("preview", "tomcat", "--expose", "8080", timeout=60)
    assert r.returncode != 0
    errors = error_lines(r.stderr)
    assert len(errors) == 1 and "tomcat" in errors[0], r.stderr
    assert kt_objects(demo) == before
    assert kubectl("-n", demo, "get", "svc", "tomcat", "-o", "jsonpath={.spec.selector.app}").stdout == "tomcat"


def test_preview_ctrl_c_leaves_nothing(ktctl: Ktctl, demo: str, local_server: int) -> None:
    before = kt_objects(demo)
    p = ktctl.start("preview", "tomcat-v3", "--expose", "8080")
    p.wait_banner("by name 'tomcat-v3'")
    assert "service/tomcat-v3" in kt_objects(demo)
    assert p.stop() in (0, 130)
    wait_for("preview's objects gone", lambda: kt_objects(demo) == before, timeout=60)


def test_forward_follows_a_replaced_pod(ktctl: Ktctl, demo: str) -> None:
    port = free_port()
    f = ktctl.start("forward", "tomcat", str(port))
    f.wait_banner(f"Now you can access port 8080 of service 'tomcat' via 'localhost:{port}'")
    assert local_get(f"http://127.0.0.1:{port}") == DEMO
    old = kubectl("-n", demo, "get", "pod", "-l", "app=tomcat", "-o", "jsonpath={.items[0].metadata.name}").stdout
    kubectl("-n", demo, "delete", "pod", old, "--wait=true", "--timeout=60s", timeout=90)
    kubectl("-n", demo, "rollout", "status", "deployment/tomcat", "--timeout=120s", timeout=150)
    new = kubectl("-n", demo, "get", "pod", "-l", "app=tomcat", "--field-selector=status.phase=Running",
                  "-o", "jsonpath={.items[0].metadata.name}").stdout
    assert new and new != old
    write_page(demo, f"pod/{new}", "kt-connect demo v1 (replaced)")
    wait_for("forward to reach the new pod",
             lambda: local_get(f"http://127.0.0.1:{port}") == "kt-connect demo v1 (replaced)", timeout=60)
    assert f.proc.poll() is None
    assert f.stop() in (0, 130)
    write_page(demo, "deployment/tomcat", DEMO)


def test_forward_to_a_pod_ip(ktctl: Ktctl, demo: str) -> None:
    ip = kubectl("-n", demo, "get", "pod", "-l", "app=tomcat", "-o", "jsonpath={.items[0].status.podIP}").stdout
    port = free_port()
    f = ktctl.start("forward", ip, f"{port}:8080")
    f.wait_banner(f"via 'localhost:{port}'")
    assert local_get(f"http://127.0.0.1:{port}") == DEMO
    assert f.stop() in (0, 130)


def test_forward_to_a_dns_name(ktctl: Ktctl, demo: str) -> None:
    port = free_port()
    f = ktctl.start("forward", f"tomcat.{demo}.svc.cluster.local", f"{port}:8080")
    f.wait_banner(f"via 'localhost:{port}'")
    assert local_get(f"http://127.0.0.1:{port}") == DEMO
    assert f.stop() in (0, 130)


@pytest.fixture(scope="module")
def two_port_service(demo: str) -> str:
    kubectl("-n", demo, "create", "service", "clusterip", "twoports", "--tcp=8080:8080", "--tcp=9090:9090")
    return "twoports"


@pytest.mark.parametrize("args, message", [
    (["forward", "twoports"], "several ports"),
    (["forward", "no-such-svc", "6061:8080"], "no-such-svc"),
    (["forward", "tomcat", "6061:9999"], "9999"),
    (["forward", "tomcat", "abc"], "abc"),
    (["forward", "10.1.2.3"], "10.1.2.3"),
    (["preview", "tomcat-v9", "--expose", "{idle}"], "{idle}"),
    (["preview", "tomcat-v9", "--expose", "8080:http"], "http"),
])
def test_bad_input_one_line_nothing_left(ktctl: Ktctl, demo: str, two_port_service: str, local_server: int,
                                         args: list[str], message: str) -> None:
    before = kt_objects(demo)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        idle = str(s.getsockname()[1])  # bound, not listening: nothing answers there
        r = ktctl.run(*[a.replace("{idle}", idle) for a in args], timeout=60)
    assert r.returncode != 0
    errors = error_lines(r.stderr) or [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message.replace("{idle}", idle) in errors[0], r.stderr
    assert kt_objects(demo) == before


def test_forward_local_port_in_use(ktctl: Ktctl, demo: str) -> None:
    before = kt_objects(demo)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = ktctl.run("forward", "tomcat", f"{port}:8080", timeout=60)
    assert r.returncode != 0
    errors = error_lines(r.stderr)
    assert len(errors) == 1 and "in use" in errors[0], r.stderr
    assert kt_objects(demo) == before


def test_all_commands_at_once(ktctl: Ktctl, preview, demo: str, client_pod: ClientPod) -> None:
    """connect, exchange, preview and forward side by side in one namespace, then each stopped: every
    one keeps working while the others run, and none removes what another made."""
    before = kt_objects(demo)
    proxy = free_port()
    connect = ktctl.start("connect", "--proxy-port", str(proxy), "--dns-port", str(free_port()))
    ex = ktctl.start("exchange", "tomcat", "--expose", "8080")
    port = free_port()
    fwd = ktctl.start("forward", "tomcat-v2", f"{port}:8080")
    connect.wait_banner("All looks good")
    ex.wait_banner("Now all request to service 'tomcat' will be redirected to local")
    fwd.wait_banner(f"via 'localhost:{port}'")
    via_proxy = subprocess.run(["curl", "-sS", "--max-time", "20", "-x", f"http://127.0.0.1:{proxy}",
                                "http://tomcat-v2:8080"], capture_output=True, text=True, timeout=30)
    assert via_proxy.stdout.strip() == LOCAL, via_proxy.stderr
    client_pod.wait_for("http://tomcat:8080", LOCAL, timeout=5)
    assert client_pod.get("http://tomcat-v2:8080") == LOCAL
    assert local_get(f"http://127.0.0.1:{port}") == LOCAL
    for bg in (fwd, ex, connect):
        assert bg.stop() in (0, 130)
    client_pod.wait_for("http://tomcat:8080", DEMO)
    assert client_pod.get("http://tomcat-v2:8080") == LOCAL  # the preview is untouched
    wait_for("only the preview's objects left", lambda: kt_objects(demo) == before, timeout=60)


def test_preview_external(ktctl: Ktctl, demo: str, client_pod: ClientPod, local_server: int) -> None:
    before = kt_objects(demo)
    p = ktctl.start("preview", "tomcat-ext", "--expose", "8080", "--external")
    p.wait_banner("by name 'tomcat-ext'")
    kind = kubectl("-n", demo, "get", "svc", "tomcat-ext", "-o", "jsonpath={.spec.type}").stdout
    assert kind == "LoadBalancer"
    client_pod.wait_for("http://tomcat-ext:8080", LOCAL, timeout=5)
    assert p.stop() in (0, 130)
    wait_for("preview's objects gone", lambda: kt_objects(demo) == before, timeout=60)


def test_forward_to_a_pod_by_name(ktctl: Ktctl, demo: str) -> None:
    pod = kubectl("-n", demo, "get", "pod", "-l", "app=tomcat", "--field-selector=status.phase=Running",
                  "-o", "jsonpath={.items[0].metadata.name}").stdout
    port = free_port()
    f = ktctl.start("forward", f"pod/{pod}", f"{port}:8080")
    f.wait_banner(f"Now you can access port 8080 of pod '{pod}' via 'localhost:{port}'")
    assert local_get(f"http://127.0.0.1:{port}") == DEMO
    assert f.stop() in (0, 130)


def test_preview_without_permission_to_create_services(ktctl: Ktctl, demo: str, local_server: int) -> None:
    before = kt_objects(demo)
    cfg = service_account_kubeconfig(demo, "reader", SHADOW_RULES, ktctl.user)
    r = ktctl.run("preview", "tomcat-v9", "--expose", "8080", kubeconfig=cfg, timeout=120)
    assert r.returncode != 0
    errors = error_lines(r.stderr)
    assert len(errors) == 1 and "no permission to create services" in errors[0], r.stderr
    assert kt_objects(demo) == before


def test_preview_comes_back_after_a_sweep_while_stopped(ktctl: Ktctl, demo: str, local_server: int,
                                                         client_pod: ClientPod) -> None:
    """G3: the laptop "sleeps" (SIGSTOP) while `ktctl clean` with a short threshold sweeps the preview's
    Service and shadow; woken (SIGCONT), it creates both again within one heartbeat (60 s) and the
    cluster reaches the laptop by name again."""
    import os
    import signal
    import time

    p = ktctl.start("preview", "tomcat-v4", "--expose", "8080")
    p.wait_banner("by name 'tomcat-v4'")
    os.kill(p.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(8)
        r = ktctl.run("clean", "--threshold-in-minutes", "0.05", timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert not [o for o in kt_objects(demo) if "tomcat-v4" in o], kt_objects(demo)
    finally:
        os.kill(p.proc.pid, signal.SIGCONT)
    wait_for("the preview's Service back", lambda: "service/tomcat-v4" in kt_objects(demo), timeout=100)
    assert "was deleted while this preview was away (ktctl clean); creating it again" in p.output(), p.output()
    client_pod.wait_for("http://tomcat-v4:8080", LOCAL, timeout=120)
    assert p.proc.poll() is None, p.output()
    assert p.stop() in (0, 130)
    assert not [o for o in kt_objects(demo) if "tomcat-v4" in o]
