"""The seed's connect walkthrough on the real local cluster, with ktctl run as an unprivileged user.

Everything a user would type: the seed's kubectl commands verbatim, then curl (HTTP_PROXY and socks5h),
dig against the DNS stub, headless Chromium with the PAC URL, Ctrl-C, SIGKILL + `ktctl clean`, and a
shadow pod deleted mid-session.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

pytest.register_assert_rewrite("ktctl_runner")
# The unprivileged user cannot run the developer venv (its interpreter lives under /root), so it gets
# its own: Debian's python3 with `pip install .`, as a user would install ktctl (ktctl_runner.user_ktctl).
from ktctl_runner import (  # noqa: E402
    DEMO,
    KTCTL,
    KUBECONFIG,
    ROOT,
    free_port,
)

pytestmark = pytest.mark.cluster
pytest_plugins = ["ktctl_runner"]  # its fixtures: unprivileged_user, user_kubeconfig, user_ktctl


def _kubectl_bin() -> str | None:
    local = ROOT / ".cluster" / "bin" / "kubectl"
    return str(local) if local.exists() else shutil.which("kubectl")


def _cluster_up() -> bool:
    kubectl = _kubectl_bin()
    if not KUBECONFIG.exists() or kubectl is None:
        return False
    r = subprocess.run([kubectl, "--kubeconfig", str(KUBECONFIG), "get", "--raw", "/readyz"],
                       capture_output=True, text=True, timeout=20)
    return r.returncode == 0


if not _cluster_up():
    pytest.skip("local cluster not up (make cluster-up writes .cluster/kubeconfig)", allow_module_level=True)


def kubectl(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [_kubectl_bin() or "kubectl", "--kubeconfig", str(KUBECONFIG), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed: {r.stderr.strip()}")
    return r


@pytest.fixture(scope="module", autouse=True)
def user_install(user_ktctl: Path) -> Path:
    """ktctl installed for the unprivileged user (ktctl_runner.user_ktctl) before any test here."""
    return user_ktctl


@pytest.fixture(scope="module")
def demo_app() -> dict[str, str]:
    """The seed's own commands, verbatim, in the default namespace."""
    kubectl("delete", "deployment,service", "tomcat", "--ignore-not-found", "--wait=true")
    kubectl("create", "deployment", "tomcat", "--image=tomcat:9", "--port=8080")
    kubectl("expose", "deployment", "tomcat", "--port=8080", "--target-port=8080")
    kubectl("rollout", "status", "deployment/tomcat", "--timeout=120s", timeout=150)
    kubectl("exec", "deployment/tomcat", "-c", "tomcat", "--", "/bin/bash", "-c",
            'mkdir webapps/ROOT; echo "kt-connect demo v1" > webapps/ROOT/index.html')
    pod_ip = kubectl("get", "pod", "--selector", "app=tomcat", "-o", "jsonpath={.items[0].status.podIP}").stdout
    cluster_ip = kubectl("get", "svc", "tomcat", "-o", "jsonpath={.spec.clusterIP}").stdout
    yield {"pod_ip": pod_ip, "cluster_ip": cluster_ip}
    kubectl("delete", "deployment,service", "tomcat", "--ignore-not-found", check=False)


class Connect:
    """`ktctl connect` as a background process of the unprivileged user."""

    def __init__(self, user: pwd.struct_passwd, kubeconfig: str, *extra: str, proxy_port: int | None = None,
                 dns_port: int | None = None) -> None:
        self.proxy_port = proxy_port or free_port()
        self.dns_port = dns_port or free_port()
        self.log = tempfile.NamedTemporaryFile("w+", prefix="ktctl-", suffix=".log", delete=False)
        os.chmod(self.log.name, 0o666)
        cmd = [str(KTCTL), "--kubeconfig", kubeconfig, "connect", "--proxy-port", str(self.proxy_port),
               "--dns-port", str(self.dns_port), *extra]
        env = {"PATH": "/usr/bin:/bin", "HOME": user.pw_dir, "LANG": "C.UTF-8"}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     user=user.pw_uid, group=user.pw_gid, start_new_session=True)

    def output(self) -> str:
        return Path(self.log.name).read_text()

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "All looks good" in self.output():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"ktctl connect exited {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.5)
        raise AssertionError(f"ktctl connect not ready in {timeout}s:\n{self.output()}")

    def shadow_pod(self) -> str:
        """The shadow pod this connect uses now (the last one it created)."""
        names = re.findall(r"Creating shadow pod (\S+)", self.output())
        assert names, self.output()
        return names[-1]

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def curl(self, url: str, mode: str = "http") -> subprocess.CompletedProcess[str]:
        proxy = {"http": f"http://127.0.0.1:{self.proxy_port}",
                 "socks5h": f"socks5h://127.0.0.1:{self.proxy_port}"}[mode]
        return subprocess.run(["curl", "-sS", "--max-time", "20", "-x", proxy, url],
                              capture_output=True, text=True, timeout=30)


def kt_objects(namespace: str = "default") -> list[str]:
    """Every object ktproxy labels as its own in the namespace connect uses."""
    r = kubectl("get", "pods,secrets,services,configmaps", "-n", namespace, "-l", "control-by=kt", "-o", "name")
    return [line for line in r.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def connect(unprivileged_user: pwd.struct_passwd, user_kubeconfig: str, demo_app: dict[str, str]):
    c = Connect(unprivileged_user, user_kubeconfig)
    try:
        c.wait_ready()
        yield c
    finally:
        c.stop()


def test_connect_runs_without_root(
    connect: Connect, unprivileged_user: pwd.struct_passwd, user_kubeconfig: str
) -> None:
    assert os.stat(f"/proc/{connect.proc.pid}").st_uid == unprivileged_user.pw_uid
    assert "All looks good, now you can access to resources in the kubernetes cluster" in connect.output()
    assert f"export ALL_PROXY=socks5h://127.0.0.1:{connect.proxy_port}" in connect.output()
    # The API server stays direct for a shell that pasted the lines, even after connect has stopped.
    server = urlparse(yaml.safe_load(Path(user_kubeconfig).read_text())["clusters"][0]["cluster"]["server"])
    assert f"export NO_PROXY=localhost,127.0.0.1,::1,{server.hostname}" in connect.output().splitlines()


@pytest.mark.parametrize("mode", ["http", "socks5h"])
@pytest.mark.parametrize("target", ["pod_ip", "cluster_ip", "tomcat", "tomcat.default",
                                    "tomcat.default.svc.cluster.local"])
def test_seed_curls(connect: Connect, demo_app: dict[str, str], target: str, mode: str) -> None:
    host = demo_app.get(target, target)
    r = connect.curl(f"http://{host}:8080", mode)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == DEMO


@pytest.mark.parametrize("name", ["tomcat", "tomcat.default", "tomcat.default.svc.cluster.local"])
def test_dig_against_dns_stub(connect: Connect, demo_app: dict[str, str], name: str) -> None:
    r = subprocess.run(["dig", "@127.0.0.1", "-p", str(connect.dns_port), "+short", "+time=5", "+tries=1",
                        name], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert demo_app["cluster_ip"] in r.stdout.split()


@pytest.mark.chromium
def test_chromium_with_pac(connect: Connect) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian chromium not installed")
    with tempfile.TemporaryDirectory() as profile:
        r = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}",
             f"--proxy-pac-url=http://127.0.0.1:{connect.proxy_port}/proxy.pac",
             "--dump-dom", "http://tomcat:8080/"],
            capture_output=True, text=True, timeout=90)
    assert DEMO in r.stdout, r.stderr[-2000:]


def test_survives_shadow_pod_deletion(connect: Connect) -> None:
    pod = connect.shadow_pod()
    kubectl("delete", "pod", pod, "-n", "default", "--wait=true", "--timeout=60s", timeout=90)
    deadline = time.monotonic() + 120
    last = ""
    while time.monotonic() < deadline:
        r = connect.curl("http://tomcat:8080", "socks5h")
        last = r.stdout + r.stderr
        if r.returncode == 0 and r.stdout.strip() == DEMO:
            break
        time.sleep(2)
    else:
        raise AssertionError(f"no recovery after deleting the shadow pod: {last}\n{connect.output()}")
    assert "re-established" in connect.output(), connect.output()
    assert connect.shadow_pod() != pod  # a new pod replaced the deleted one


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP], ids=["ctrl-c", "terminal-closed"])
def test_stop_signal_leaves_nothing(unprivileged_user: pwd.struct_passwd, user_kubeconfig: str, sig: int) -> None:
    c = Connect(unprivileged_user, user_kubeconfig)
    c.wait_ready()
    mine = {f"pod/{c.shadow_pod()}", f"secret/{c.shadow_pod()}"}
    assert mine <= set(kt_objects()), "connect's pod and secret should exist while it runs"
    assert c.stop(sig) in (0, 130), c.output()
    # Compared by name: the module's long-running connect keeps (and may replace) its own objects.
    assert not mine & set(kt_objects())


def test_sigkill_then_clean(unprivileged_user: pwd.struct_passwd, user_kubeconfig: str, connect: Connect) -> None:
    # The module's connect is stopped first: `clean` with a zero threshold would sweep its objects too.
    connect.stop()
    c = Connect(unprivileged_user, user_kubeconfig)
    c.wait_ready()
    os.killpg(c.proc.pid, signal.SIGKILL)
    c.proc.wait()
    assert kt_objects(), "objects should remain after SIGKILL"
    r = subprocess.run([str(KTCTL), "--kubeconfig", user_kubeconfig, "clean", "--threshold-in-minutes", "0"],
                       capture_output=True, text=True, timeout=120, user=unprivileged_user.pw_uid)
    assert r.returncode == 0, r.stdout + r.stderr
    deadline = time.monotonic() + 60
    while kt_objects() and time.monotonic() < deadline:
        time.sleep(1)
    assert kt_objects() == []  # nothing else runs connect in this namespace now


def test_connect_runs_one_command(unprivileged_user: pwd.struct_passwd, user_kubeconfig: str,
                                  demo_app: dict[str, str]) -> None:
    before = set(kt_objects())
    env = {"PATH": "/usr/bin:/bin", "HOME": unprivileged_user.pw_dir}
    cmd = [str(KTCTL), "--kubeconfig", user_kubeconfig, "connect", "--proxy-port", str(free_port()),
           "--dns-port", str(free_port()), "--", "curl", "-fsS", "--max-time", "20", "http://tomcat:8080"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, user=unprivileged_user.pw_uid)
    assert r.returncode == 0, r.stderr
    assert DEMO in r.stdout
    fail = subprocess.run([*cmd[:-1], "http://tomcat:1"], capture_output=True, text=True, timeout=240,
                          env=env, user=unprivileged_user.pw_uid)
    assert fail.returncode != 0
    assert set(kt_objects()) <= before


def test_command_while_another_connect_holds_the_default_ports(
    unprivileged_user: pwd.struct_passwd, user_kubeconfig: str, demo_app: dict[str, str]
) -> None:
    # A second `ktctl connect -- CMD` picks free ports when none are given, and CMD's env says which.
    held = Connect(unprivileged_user, user_kubeconfig, proxy_port=2223, dns_port=10053)
    try:
        try:
            held.wait_ready()
        except AssertionError:
            if "already in use" not in held.output():  # held by something else: the same situation
                raise
        env = {"PATH": "/usr/bin:/bin", "HOME": unprivileged_user.pw_dir}
        script = 'printf "%s\\n" "$ALL_PROXY" "$http_proxy"; curl -fsS --max-time 20 http://tomcat:8080'
        r = subprocess.run([str(KTCTL), "--kubeconfig", user_kubeconfig, "connect", "--", "sh", "-c", script],
                           capture_output=True, text=True, timeout=240, env=env, user=unprivileged_user.pw_uid)
        assert r.returncode == 0, r.stdout + r.stderr
        all_proxy, http_proxy, page = r.stdout.splitlines()[:3]
        port = urlparse(all_proxy).port
        assert port not in (None, 2223) and urlparse(http_proxy).port == port, r.stdout
        assert page == DEMO
    finally:
        held.stop()


@pytest.mark.parametrize("args, message", [
    (["-n", "no-such-namespace-xyz", "connect"], "no-such-namespace-xyz"),
    (["--context", "no-such-context", "connect"], "no-such-context"),
])
def test_bad_input_one_line(user_kubeconfig: str, unprivileged_user: pwd.struct_passwd, args: list[str],
                            message: str) -> None:
    before = set(kt_objects())
    r = subprocess.run([str(KTCTL), "--kubeconfig", user_kubeconfig, *args, "--proxy-port", str(free_port())],
                       capture_output=True, text=True, timeout=60, user=unprivileged_user.pw_uid)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if " ERR " in line]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert set(kt_objects()) <= before


def test_proxy_port_in_use(user_kubeconfig: str, unprivileged_user: pwd.struct_passwd) -> None:
    before = set(kt_objects())
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([str(KTCTL), "--kubeconfig", user_kubeconfig, "connect", "--proxy-port", str(port)],
                           capture_output=True, text=True, timeout=60, user=unprivileged_user.pw_uid)
    assert r.returncode != 0
    assert "already in use" in r.stderr
    assert set(kt_objects()) <= before


def test_unreachable_api_server(unprivileged_user: pwd.struct_passwd) -> None:
    # A loopback port nothing listens on: an API server that is down.
    tmp_path = Path(tempfile.mkdtemp(prefix="ktp-e2e-"))  # pytest's tmp_path is private to root
    port = free_port()
    cfg = tmp_path / "kubeconfig"
    cfg.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: down, cluster: {{server: "https://127.0.0.1:{port}", insecure-skip-tls-verify: true}}}}]
users: [{{name: u, user: {{token: x}}}}]
contexts: [{{name: down, context: {{cluster: down, user: u}}}}]
current-context: down
""")
    os.chmod(tmp_path, 0o755)
    os.chmod(cfg, 0o644)
    r = subprocess.run([str(KTCTL), "--kubeconfig", str(cfg), "connect", "--proxy-port", str(free_port())],
                       capture_output=True, text=True, timeout=60, user=unprivileged_user.pw_uid)
    assert r.returncode != 0
    shutil.rmtree(tmp_path, ignore_errors=True)
    assert "127.0.0.1" in r.stderr and len([x for x in r.stderr.splitlines() if " ERR " in x]) == 1, r.stderr


def test_image_that_cannot_start(user_kubeconfig: str, unprivileged_user: pwd.struct_passwd) -> None:
    before = set(kt_objects())
    r = subprocess.run([str(KTCTL), "--kubeconfig", user_kubeconfig, "-i", "ktproxy.invalid/no-such-image:0",
                        "connect", "--proxy-port", str(free_port()), "--dns-port", str(free_port()),
                        "--timeout", "60"],
                       capture_output=True, text=True, timeout=120, user=unprivileged_user.pw_uid)
    assert r.returncode != 0
    errors = [x for x in r.stderr.splitlines() if " ERR " in x]
    assert len(errors) == 1 and "no-such-image" in errors[0], r.stderr
    assert set(kt_objects()) <= before


def test_missing_rbac_permission(unprivileged_user: pwd.struct_passwd) -> None:
    """A service account that may read pods but not create them: one line naming the permission."""
    ns = f"kt-e2e-rbac-{os.getpid()}"
    kubectl("create", "namespace", ns)
    d = Path(tempfile.mkdtemp(prefix="ktp-e2e-"))
    try:
        kubectl("-n", ns, "create", "serviceaccount", "reader")
        kubectl("-n", ns, "create", "role", "reader", "--verb=get,list,watch", "--resource=pods,secrets")
        kubectl("-n", ns, "create", "rolebinding", "reader", "--role=reader", f"--serviceaccount={ns}:reader")
        token = kubectl("-n", ns, "create", "token", "reader").stdout.strip()
        server = kubectl("config", "view", "--minify", "-o", "jsonpath={.clusters[0].cluster.server}").stdout
        ca = kubectl("config", "view", "--raw", "--minify", "--flatten", "-o",
                     "jsonpath={.clusters[0].cluster.certificate-authority-data}").stdout
        cfg = d / "kubeconfig"
        cfg.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "{server}", certificate-authority-data: "{ca}"}}}}]
users: [{{name: reader, user: {{token: "{token}"}}}}]
contexts: [{{name: c, context: {{cluster: c, user: reader, namespace: {ns}}}}}]
current-context: c
""")
        os.chmod(d, 0o755)
        os.chmod(cfg, 0o644)
        r = subprocess.run([str(KTCTL), "--kubeconfig", str(cfg), "connect", "--proxy-port", str(free_port()),
                            "--dns-port", str(free_port())],
                           capture_output=True, text=True, timeout=60, user=unprivileged_user.pw_uid)
        assert r.returncode != 0
        errors = [x for x in r.stderr.splitlines() if " ERR " in x]
        assert len(errors) == 1 and "no permission to create pods" in errors[0], r.stderr
        assert kt_objects(ns) == []
    finally:
        shutil.rmtree(d, ignore_errors=True)
        kubectl("delete", "namespace", ns, "--wait=false", check=False)
