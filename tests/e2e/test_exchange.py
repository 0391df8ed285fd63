"""The seed's exchange on the real local cluster, ktctl run as an unprivileged user, plus what kt-connect
gets wrong: SIGKILL then `ktctl recover`, a second exchange refused naming the first user, a selector
overwritten with kubectl put back, scale mode, a named targetPort, two ports at once, the shadow pod
deleted mid-exchange, and bad input that leaves nothing behind.

The laptop's tomcat is a local HTTP server on 127.0.0.1:8080 answering "kt-connect local v2"; cluster
traffic is a pod fetching http://tomcat:8080 with python3's urllib.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time

import pytest

pytest.register_assert_rewrite("ktctl_runner")
from ktctl_runner import (  # noqa: E402
    DEMO,
    LOCAL,
    RULE,
    SHADOW_RULES,
    ClientPod,
    Ktctl,
    apply,
    error_lines,
    free_port,
    kt_annotations,
    kt_objects,
    kubectl,
    serve_page,
    service,
    service_account_kubeconfig,
    wait_for,
    write_page,
)

pytestmark = pytest.mark.cluster
pytest_plugins = ["ktctl_runner"]  # its fixtures: ktctl, demo, client_pod, local_server

BANNER = "Now all request to service 'tomcat' will be redirected to local"
URL = "http://tomcat:8080"


@pytest.fixture
def settled(demo: str, client_pod: ClientPod) -> str:
    """Each test starts from the seed's state: v1 answers, nothing of ours in the namespace."""
    client_pod.wait_for(URL, DEMO)
    assert kt_objects(demo) == []
    return demo


def _selector(ns: str) -> dict:
    return service(ns, "tomcat")["spec"]["selector"]


def _assert_pristine(ns: str, client_pod: ClientPod) -> None:
    client_pod.wait_for(URL, DEMO)
    svc = service(ns, "tomcat")
    assert svc["spec"]["selector"] == {"app": "tomcat"}
    assert kt_annotations(svc) == {}
    wait_for("no kt objects left", lambda: kt_objects(ns) == [], timeout=60)


def test_seed_exchange_and_ctrl_c(ktctl: Ktctl, settled: str, client_pod: ClientPod, local_server: int) -> None:
    ex = ktctl.start("exchange", "tomcat", "--expose", "8080")
    ex.wait_banner(BANNER)
    lines = ex.output().splitlines()
    at = next(i for i, line in enumerate(lines) if line.endswith(BANNER))
    assert lines[at - 1].endswith(RULE) and lines[at + 1].endswith(RULE), ex.output()
    assert "Service tomcat now sends its traffic to shadow pod" in ex.output()  # endpoints confirmed
    # ... and the node's service routing too: a connection to the cluster IP reached the laptop before
    # the banner, so the very first request after it is the laptop's (no waiting, no retry).
    checked = next(i for i, line in enumerate(lines) if "Checked: service tomcat (" in line)
    assert checked < at, ex.output()
    assert client_pod.get(URL) == LOCAL
    svc = service(settled, "tomcat")
    assert json.loads(kt_annotations(svc)["kt-selector"]) == {"app": "tomcat"}
    assert "kt-lock" not in kt_annotations(svc)  # the lock guards set-up only
    shadows = [o for o in kt_objects(settled) if o.startswith("pod/tomcat-kt-exchange-")]
    assert len(shadows) == 1, kt_objects(settled)
    status = ktctl.run("status").stdout  # knows the shadow it made and the selector it switched
    assert shadows[0].removeprefix("pod/") in status, status
    assert f"service {settled}/tomcat: selector switched by" in status, status
    assert ex.stop(signal.SIGINT) in (0, 130)
    # The shadow went only once the cluster IP led to the original pods again: the first request after
    # Ctrl-C is answered by them (deleted at once, kube-proxy's lag sent it to a dead pod: a 502).
    assert "Checked: service tomcat (" in ex.output() and "no longer reaches this machine" in ex.output()
    assert client_pod.get(URL) == DEMO
    _assert_pristine(settled, client_pod)


def test_sigterm_and_sighup_also_restore(ktctl: Ktctl, settled: str, client_pod: ClientPod, local_server: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        ex = ktctl.start("exchange", "tomcat", "--expose", "8080")
        ex.wait_banner(BANNER)
        client_pod.wait_for(URL, LOCAL, timeout=5)
        assert ex.stop(sig) in (0, 130, 128 + sig)
        _assert_pristine(settled, client_pod)


def test_sigkill_then_recover(ktctl: Ktctl, settled: str, client_pod: ClientPod, local_server: int) -> None:
    ex = ktctl.start("exchange", "tomcat", "--expose", "8080")
    ex.wait_banner(BANNER)
    ex.kill()
    assert "kt-selector" in kt_annotations(service(settled, "tomcat"))  # left switched by the crash
    r = ktctl.run("recover", "tomcat")
    assert r.returncode == 0, r.stdout + r.stderr
    _assert_pristine(settled, client_pod)
    again = ktctl.run("recover", "tomcat")
    assert again.returncode == 0 and "nothing" in again.stderr.lower(), again.stderr


def test_second_exchange_refused_naming_the_first(ktctl: Ktctl, settled: str, client_pod: ClientPod,
                                                   local_server: int) -> None:
    first = ktctl.start("exchange", "tomcat", "--expose", "8080", KTCTL_USER="alice")
    first.wait_banner(BANNER)
    r = ktctl.run("exchange", "tomcat", "--expose", "8080", KTCTL_USER="bob")
    assert r.returncode != 0
    errors = error_lines(r.stderr)
    assert len(errors) == 1 and "alice" in errors[0] and "tomcat" in errors[0], r.stderr
    assert client_pod.get(URL) == LOCAL  # the first exchange is untouched
    assert len([o for o in kt_objects(settled) if o.startswith("pod/")]) == 1
    assert first.stop() in (0, 130)
    _assert_pristine(settled, client_pod)


def test_overwritten_selector_is_put_back(ktctl: Ktctl, settled: str, client_pod: ClientPod, local_server: int) -> None:
    ex = ktctl.start("exchange", "tomcat", "--expose", "8080")
    ex.wait_banner(BANNER)
    ours = _selector(settled)
    kubectl("-n", settled, "patch", "svc", "tomcat", "--type=merge", "-p",
            json.dumps({"spec": {"selector": {k: None for k in ours} | {"app": "tomcat"}}}))
    wait_for("the watcher to put the selector back", lambda: _selector(settled) == ours, timeout=60)
    client_pod.wait_for(URL, LOCAL)
    assert ex.stop() in (0, 130)
    _assert_pristine(settled, client_pod)


def test_recover_sticks_while_the_exchange_lives(ktctl: Ktctl, settled: str, client_pod: ClientPod) -> None:
    """G1 + G3: `ktctl recover` on a live exchange (the "already exchanged ... ktctl recover" message invites
    it, and the sweep after a sleep does the same): the exchange's guard stands down and says so in one
    line, the exchange ends (exit 1) instead of running on half-alive, and leaves the Service exactly as
    recover did."""
    before = service(settled, "tomcat")
    # Its own local port (not the module's 8080): these two exchanges need no fixed port on the machine.
    with serve_page(free_port(), LOCAL) as port:
        _recover_while_alive(ktctl, settled, client_pod, f"{port}:8080", before)


def _recover_while_alive(ktctl: Ktctl, settled: str, client_pod: ClientPod, expose: str, before: dict) -> None:
    ex = ktctl.start("exchange", "tomcat", "--expose", expose, KTCTL_USER="alice")
    ex.wait_banner(BANNER)
    client_pod.wait_for(URL, LOCAL, timeout=5)
    r = ktctl.run("recover", "tomcat", KTCTL_USER="bob")
    assert r.returncode == 0, r.stdout + r.stderr
    wait_for("the exchange to stand down", lambda: "stands down" in ex.output(), timeout=30)
    stood = [line for line in ex.output().splitlines() if "stands down" in line]
    assert len(stood) == 1 and " WRN " in stood[0] and "ktctl recover" in stood[0], ex.output()
    # G3: the exchange has ended on its own; > 3 guard intervals (2 s) later the Service still selects
    # the original pods.
    assert ex.proc.wait(timeout=120) == 1, ex.output()
    for _ in range(8):
        svc = service(settled, "tomcat")
        assert svc["spec"]["selector"] == {"app": "tomcat"} and kt_annotations(svc) == {}, svc["metadata"]
        time.sleep(1)
    client_pod.wait_for(URL, DEMO)
    after = service(settled, "tomcat")
    assert after["spec"] == before["spec"] and kt_annotations(after) == {}
    assert after["metadata"].get("annotations") == before["metadata"].get("annotations")
    _assert_pristine(settled, client_pod)


def test_guard_leaves_the_service_to_the_next_developer(ktctl: Ktctl, settled: str, client_pod: ClientPod) -> None:
    """G1: alice's exchange is recovered while alive and bob exchanges; alice's guard stands down (no
    flip-flop) and her exchange ends (G3) without ending bob's."""
    with serve_page(free_port(), LOCAL) as a, serve_page(free_port(), LOCAL) as b:
        _next_developer(ktctl, settled, client_pod, f"{a}:8080", f"{b}:8080")


def _next_developer(ktctl: Ktctl, settled: str, client_pod: ClientPod, alice_port: str, bob_port: str) -> None:
    alice = ktctl.start("exchange", "tomcat", "--expose", alice_port, KTCTL_USER="alice")
    alice.wait_banner(BANNER)
    assert ktctl.run("recover", "tomcat", KTCTL_USER="bob").returncode == 0
    bob = ktctl.start("exchange", "tomcat", "--expose", bob_port, KTCTL_USER="bob")
    bob.wait_banner(BANNER)
    bobs = _selector(settled)
    wait_for("alice to stand down", lambda: "stands down" in alice.output(), timeout=30)
    time.sleep(7)  # > 3 guard intervals
    assert _selector(settled) == bobs and kt_annotations(service(settled, "tomcat"))["kt-user"] == "bob"
    assert alice.proc.wait(timeout=120) == 1, alice.output()
    assert _selector(settled) == bobs, alice.output()
    client_pod.wait_for(URL, LOCAL)
    assert bob.stop() in (0, 130)
    _assert_pristine(settled, client_pod)


def test_shadow_pod_deleted_mid_exchange(ktctl: Ktctl, settled: str, client_pod: ClientPod, local_server: int) -> None:
    ex = ktctl.start("exchange", "tomcat", "--expose", "8080")
    ex.wait_banner(BANNER)
    pod = next(o for o in kt_objects(settled) if o.startswith("pod/tomcat-kt-exchange-"))
    kubectl("-n", settled, "delete", pod, "--wait=true", "--timeout=60s", timeout=90)
    client_pod.wait_for(URL, LOCAL, timeout=120)
    assert ex.proc.poll() is None, ex.output()
    assert "forwarded again" in ex.output(), ex.output()  # the log says the port came back
    assert ex.stop() in (0, 130)
    _assert_pristine(settled, client_pod)


def test_scale_mode_round_trip(ktctl: Ktctl, settled: str, client_pod: ClientPod, local_server: int) -> None:
    ex = ktctl.start("exchange", "deployment/tomcat", "--expose", "8080", "--mode", "scale")
    ex.wait_banner("will be redirected to local")
    wait_for("the deployment scaled to 0", lambda: kubectl(
        "-n", settled, "get", "deploy", "tomcat", "-o", "jsonpath={.spec.replicas}").stdout == "0")
    client_pod.wait_for(URL, LOCAL)
    assert _selector(settled) == {"app": "tomcat"}  # scale mode leaves the service alone
    # A second scale-mode exchange would share the traffic and scale the deployment back under the first.
    second = ktctl.run("exchange", "deployment/tomcat", "--expose", "8080", "--mode", "scale", timeout=120)
    errors = error_lines(second.stderr)
    assert second.returncode != 0 and len(errors) == 1, second.stderr
    # Refused naming the holder (the first exchange's shadow and the Deployment's kt-user say who).
    assert "already exchanged (scale mode) by" in errors[0], second.stderr
    assert ex.stop() in (0, 130)
    ready = kubectl("-n", settled, "get", "deploy", "tomcat", "-o", "jsonpath={.status.readyReplicas}").stdout
    assert ready == "1", "exit waits for the original pods to be ready"
    # The new pod serves the image's empty docroot: give it the seed's page again.
    write_page(settled, "deployment/tomcat", DEMO)
    _assert_pristine(settled, client_pod)


def test_named_target_port_and_two_ports(ktctl: Ktctl, module_namespace: str, client_pod: ClientPod,
                                         local_server: int) -> None:
    """REMOTE given as a named target port and as a service port; both ports ride one session."""
    ns = module_namespace
    apply(ns, {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "named"},
        "spec": {"selector": {"matchLabels": {"app": "named"}},
                 "template": {"metadata": {"labels": {"app": "named"}},
                              "spec": {"containers": [{"name": "tomcat", "image": "tomcat:9",
                                                       "ports": [{"name": "http", "containerPort": 8080},
                                                                 {"name": "alt", "containerPort": 9091}]}]}}},
    })
    apply(ns, {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "named"},
        "spec": {"selector": {"app": "named"},
                 "ports": [{"name": "web", "port": 80, "targetPort": "http"},
                           {"name": "other", "port": 9090, "targetPort": "alt"}]},
    })
    kubectl("-n", ns, "rollout", "status", "deployment/named", "--timeout=120s", timeout=150)
    try:
        with serve_page(0, "kt-connect local alt") as alt:
            ex = ktctl.start("exchange", "named", "--expose", f"8080:http,{alt}:9090")
            ex.wait_banner("Now all request to service 'named' will be redirected to local")
            client_pod.wait_for("http://named:80", LOCAL, timeout=5)
            client_pod.wait_for("http://named:9090", "kt-connect local alt", timeout=5)
            assert ex.output().count("Creating shadow pod") == 1
            assert ex.stop() in (0, 130)
        wait_for("no kt objects left", lambda: kt_objects(ns) == [], timeout=60)
        assert service(ns, "named")["spec"]["selector"] == {"app": "named"}
    finally:
        kubectl("-n", ns, "delete", "svc,deployment", "named", check=False)


@pytest.mark.parametrize("args, message", [
    (["exchange", "no-such-svc", "--expose", "8080"], "no-such-svc"),
    (["exchange", "tomcat", "--expose", "8080:9999"], "9999"),
    (["exchange", "tomcat", "--expose", "abc"], "abc"),
    (["exchange", "tomcat", "--expose", "{idle}:8080"], "{idle}"),
    (["exchange", "tomcat", "--expose", "8080", "--mode", "nope"], "nope"),
    (["-n", "no-such-namespace-xyz", "exchange", "tomcat", "--expose", "8080"], "no-such-namespace-xyz"),
    (["recover", "no-such-svc"], "no-such-svc"),
])
def test_bad_input_one_line_nothing_left(ktctl: Ktctl, settled: str, local_server: int, args: list[str],
                                         message: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        idle = str(s.getsockname()[1])  # bound, not listening: nothing answers there
        args = [a.replace("{idle}", idle) for a in args]
        r = ktctl.run(*args, timeout=60)
    assert r.returncode != 0
    message = message.replace("{idle}", idle)
    errors = error_lines(r.stderr) or [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], r.stderr
    assert kt_objects(settled) == []
    svc = service(settled, "tomcat")
    assert svc["spec"]["selector"] == {"app": "tomcat"} and kt_annotations(svc) == {}


def test_sigkill_then_clean(ktctl: Ktctl, settled: str, client_pod: ClientPod, local_server: int) -> None:
    """`ktctl clean` also puts back what a killed exchange changed, once its heartbeat is stale."""
    ex = ktctl.start("exchange", "tomcat", "--expose", "8080")
    ex.wait_banner(BANNER)
    ex.kill()
    try:
        r = ktctl.run("clean", "--threshold-in-minutes", "0")
        assert r.returncode == 0, r.stdout + r.stderr
        _assert_pristine(settled, client_pod)
    finally:  # a failure here must not leave the next tests an exchanged service
        ktctl.run("recover", "tomcat")


def test_exchange_through_connects_proxy(ktctl: Ktctl, settled: str, local_server: int) -> None:
    """The seed's `curl http://tomcat:8080` on the laptop, through connect, during an exchange."""
    proxy = free_port()
    connect = ktctl.start("connect", "--proxy-port", str(proxy), "--dns-port", str(free_port()))
    connect.wait_banner("All looks good")

    def curl() -> str:
        r = subprocess.run(["curl", "-sS", "--max-time", "20", "-x", f"http://127.0.0.1:{proxy}", URL],
                           capture_output=True, text=True, timeout=30)
        return r.stdout.strip() or r.stderr.strip()

    assert curl() == DEMO
    ex = ktctl.start("exchange", "tomcat", "--expose", "8080")
    ex.wait_banner(BANNER)
    assert curl() == LOCAL
    assert ex.stop() in (0, 130)
    wait_for("v1 through connect again", lambda: curl() == DEMO, timeout=30)
    assert connect.stop() in (0, 130)
    wait_for("no kt objects left", lambda: kt_objects(settled) == [], timeout=60)


def test_skip_port_checking_allows_a_later_start(ktctl: Ktctl, settled: str, client_pod: ClientPod) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        later = s.getsockname()[1]
    ex = ktctl.start("exchange", "tomcat", "--expose", f"{later}:8080", "--skip-port-checking")
    ex.wait_banner(BANNER)
    with serve_page(later, "kt-connect local, started later"):
        client_pod.wait_for(URL, "kt-connect local, started later")
    assert ex.stop() in (0, 130)
    _assert_pristine(settled, client_pod)


def test_scale_mode_second_interrupt_stops_only_the_wait(ktctl: Ktctl, module_namespace: str) -> None:
    """Exit waits for the deployment's pods; a second Ctrl-C ends that wait, and the shadow still goes."""
    ns = module_namespace
    apply(ns, {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "slow"},
               "spec": {"selector": {"matchLabels": {"app": "slow"}},
                        "template": {"metadata": {"labels": {"app": "slow"}},
                                     "spec": {"containers": [{"name": "tomcat", "image": "tomcat:9",
                                                              "ports": [{"containerPort": 8080}]}]}}}})
    kubectl("-n", ns, "expose", "deployment", "slow", "--port=8080")
    kubectl("-n", ns, "rollout", "status", "deployment/slow", "--timeout=120s", timeout=150)
    try:
        with serve_page(0, LOCAL) as local:
            ex = ktctl.start("exchange", "deployment/slow", "--expose", f"{local}:8080", "--mode", "scale")
            ex.wait_banner("Now all request to deployment 'slow' will be redirected to local")
            # Pods that never get Ready once the deployment comes back: exit would wait the full 120 s.
            kubectl("-n", ns, "patch", "deployment", "slow", "--type=json", "-p", json.dumps([
                {"op": "add", "path": "/spec/template/spec/containers/0/readinessProbe",
                 "value": {"tcpSocket": {"port": 1}, "periodSeconds": 1}}]))
            ex.proc.send_signal(signal.SIGINT)
            wait_for("the wait for the deployment", lambda: "Waiting for deployment slow" in ex.output())
            assert ex.stop(signal.SIGINT, timeout=30) in (0, 130)
        assert "stopped waiting" in ex.output(), ex.output()
        assert not [o for o in kt_objects(ns) if o.startswith(("pod/slow-kt-exchange", "secret/slow-kt-exchange"))]
        replicas = kubectl("-n", ns, "get", "deploy", "slow", "-o", "jsonpath={.spec.replicas}").stdout
        assert replicas == "1"
    finally:
        kubectl("-n", ns, "delete", "svc,deployment", "slow", check=False)


def test_missing_permission_one_line_nothing_left(ktctl: Ktctl, settled: str, local_server: int) -> None:
    """A user who may run a shadow and read services, but not change them."""
    cfg = service_account_kubeconfig(settled, "reader", SHADOW_RULES, ktctl.user)
    r = ktctl.run("exchange", "tomcat", "--expose", "8080", kubeconfig=cfg, timeout=120)
    assert r.returncode != 0
    errors = error_lines(r.stderr)
    assert len(errors) == 1 and "no permission to patch services" in errors[0], r.stderr
    assert kt_objects(settled) == []
    assert kt_annotations(service(settled, "tomcat")) == {}


def test_port_below_1024(ktctl: Ktctl, settled: str, client_pod: ClientPod, local_server: int) -> None:
    """The shadow runs as non-root and still listens on a privileged target port."""
    apply(settled, {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "low"},
                    "spec": {"selector": {"app": "tomcat"}, "ports": [{"port": 80, "targetPort": 80}]}})
    try:
        ex = ktctl.start("exchange", "low", "--expose", "8080:80")
        ex.wait_banner("Now all request to service 'low' will be redirected to local")
        client_pod.wait_for("http://low:80", LOCAL, timeout=5)
        assert ex.stop() in (0, 130)
        wait_for("no kt objects left", lambda: kt_objects(settled) == [], timeout=60)
    finally:
        kubectl("-n", settled, "delete", "svc", "low", check=False)
