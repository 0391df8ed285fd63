"""ktctl as a user runs it, for the reverse-traffic e2e tests: an unprivileged account with its own
`pip install .`, a kubeconfig it can read, commands in the background (log file, banner wait, signals),
a client pod that curls from inside the cluster, and a local HTTP server standing in for the laptop's
tomcat.

Test modules import the fixtures they use by name (pytest finds fixtures imported into a module).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KUBECONFIG = ROOT / ".cluster" / "kubeconfig"
USER_VENV = ROOT / ".cluster" / "user-venv"
KTCTL = USER_VENV / "bin" / "ktctl"
USER = "ktproxy-e2e"
BASE_IMAGE = "docker.io/ktproxy/base:0.1.0"
DEMO = "kt-connect demo v1"
LOCAL = "kt-connect local v2"
RULE = "-" * 63


def kubectl(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    local = ROOT / ".cluster" / "bin" / "kubectl"
    exe = str(local) if local.exists() else (shutil.which("kubectl") or "kubectl")
    r = subprocess.run([exe, "--kubeconfig", str(KUBECONFIG), *args], capture_output=True, text=True,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed: {r.stderr.strip()}")
    return r


def wait_for(what: str, probe: Callable[[], object], timeout: float = 90, interval: float = 0.5) -> object:
    """Poll `probe` until it returns something truthy; fail naming `what` and the last value."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {last!r})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kt_objects(namespace: str) -> list[str]:
    """Every object labelled as ktproxy's (or kt-connect's) in the namespace."""
    r = kubectl("get", "pods,secrets,services,configmaps,deployments", "-n", namespace, "-l", "control-by=kt",
                "-o", "name")
    return sorted(line for line in r.stdout.splitlines() if line.strip())


def service(namespace: str, name: str) -> dict:
    return json.loads(kubectl("get", "svc", name, "-n", namespace, "-o", "json").stdout)


def kt_annotations(obj: dict) -> dict[str, str]:
    return {k: v for k, v in (obj["metadata"].get("annotations") or {}).items() if k.startswith("kt-")}


# ------------------------------------------------------------------------------------------ the user
@pytest.fixture(scope="module")
def unprivileged_user() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        return pwd.getpwuid(os.getuid())
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", USER], check=True)
        return pwd.getpwnam(USER)


@pytest.fixture(scope="module")
def user_ktctl() -> Path:
    """`pip install .` of this checkout into the user's venv (its own interpreter, not /root's)."""
    if not (USER_VENV / "bin" / "python").exists():
        subprocess.run(["/usr/bin/python3", "-m", "venv", str(USER_VENV)], check=True)
        subprocess.run([str(USER_VENV / "bin" / "pip"), "install", "-q", "-r", str(ROOT / "requirements.lock")],
                       check=True, timeout=600)
    with tempfile.TemporaryDirectory() as build:
        src = Path(build) / "src"
        shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".cluster", ".git", "*.egg-info",
                                                                   "build", "__pycache__", "benchmarks"))
        subprocess.run([str(USER_VENV / "bin" / "pip"), "install", "-q", "--no-deps", "--force-reinstall",
                        str(src)], check=True, timeout=300)
    os.chmod(USER_VENV, 0o755)
    return KTCTL


@pytest.fixture(scope="module")
def user_kubeconfig(unprivileged_user: pwd.struct_passwd) -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="ktp-e2e-")
    os.chmod(d, 0o755)
    dest = Path(d) / "kubeconfig"
    dest.write_text(kubectl("config", "view", "--raw", "--flatten").stdout)
    os.chown(dest, unprivileged_user.pw_uid, unprivileged_user.pw_gid)
    os.chmod(dest, 0o600)
    yield str(dest)
    shutil.rmtree(d, ignore_errors=True)


class Ktctl:
    """Runs ktctl commands as the unprivileged user, in one namespace."""

    def __init__(self, user: pwd.struct_passwd, kubeconfig: str, namespace: str) -> None:
        self.user = user
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.running: list[Background] = []

    def env(self, **extra: str) -> dict[str, str]:
        return {"PATH": "/usr/bin:/bin", "HOME": self.user.pw_dir, "LANG": "C.UTF-8", **extra}

    def argv(self, args: tuple[str, ...], kubeconfig: str | None = None) -> list[str]:
        return [str(KTCTL), "--kubeconfig", kubeconfig or self.kubeconfig, "-n", self.namespace, *args]

    def run(self, *args: str, timeout: float = 180, kubeconfig: str | None = None,
            **env: str) -> subprocess.CompletedProcess[str]:
        """The command to its end; `kubeconfig`: as another identity than the admin's copy."""
        return subprocess.run(self.argv(args, kubeconfig), capture_output=True, text=True, timeout=timeout,
                              env=self.env(**env), user=self.user.pw_uid, group=self.user.pw_gid)

    def start(self, *args: str, **env: str) -> Background:
        bg = Background(self.argv(args), self.env(**env), self.user)
        self.running.append(bg)
        return bg

    def stop_all(self) -> None:
        for bg in self.running:
            bg.stop()


class Background:
    """A long-running ktctl command, its combined output in a file."""

    def __init__(self, argv: list[str], env: dict[str, str], user: pwd.struct_passwd) -> None:
        self.log = tempfile.NamedTemporaryFile("w+", prefix="ktctl-", suffix=".log", delete=False)
        os.chmod(self.log.name, 0o666)
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     user=user.pw_uid, group=user.pw_gid, start_new_session=True)

    def output(self) -> str:
        return Path(self.log.name).read_text()

    def wait_banner(self, text: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"{' '.join(self.argv[3:])} exited {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.3)
        raise AssertionError(f"no {text!r} within {timeout}s:\n{self.output()}")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                raise AssertionError(f"did not stop within {timeout}s after signal {sig}:\n{self.output()}") from None
        return self.proc.returncode

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture(scope="module")
def ktctl(unprivileged_user: pwd.struct_passwd, user_ktctl: Path, user_kubeconfig: str,
          module_namespace: str) -> Iterator[Ktctl]:
    k = Ktctl(unprivileged_user, user_kubeconfig, module_namespace)
    yield k
    k.stop_all()


# ------------------------------------------------------------------------------------------ workloads
@pytest.fixture(scope="module")
def demo(module_namespace: str) -> str:
    """The seed's tomcat (answering v1) in the module's namespace."""
    deploy_demo(module_namespace)
    return module_namespace


def deploy_demo(namespace: str, name: str = "tomcat", page: str = DEMO) -> None:
    """The seed's own commands, in `namespace`."""
    kubectl("-n", namespace, "create", "deployment", name, "--image=tomcat:9", "--port=8080")
    kubectl("-n", namespace, "expose", "deployment", name, "--port=8080", "--target-port=8080")
    kubectl("-n", namespace, "rollout", "status", f"deployment/{name}", "--timeout=120s", timeout=150)
    write_page(namespace, f"deployment/{name}", page)


def write_page(namespace: str, workload: str, page: str) -> None:
    kubectl("-n", namespace, "exec", workload, "-c", "tomcat", "--", "/bin/bash", "-c",
            f'mkdir -p webapps/ROOT; echo "{page}" > webapps/ROOT/index.html')


class ClientPod:
    """A pod inside the cluster that fetches URLs with python3's urllib (the base image has no curl)."""

    SCRIPT = ("import sys, urllib.request\n"
              "try:\n"
              "    print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode().strip())\n"
              "except Exception as e:\n"
              "    print('ERROR', e); sys.exit(1)\n")

    def __init__(self, namespace: str, name: str = "kt-e2e-client") -> None:
        self.namespace = namespace
        self.name = name
        kubectl("-n", namespace, "run", name, f"--image={BASE_IMAGE}", "--restart=Never", "--command", "--",
                "sleep", "infinity")
        kubectl("-n", namespace, "wait", "--for=condition=Ready", f"pod/{name}", "--timeout=120s", timeout=150)

    def get(self, url: str) -> str:
        r = kubectl("-n", self.namespace, "exec", self.name, "--", "python3", "-c", self.SCRIPT, url,
                    check=False, timeout=60)
        return r.stdout.strip() or r.stderr.strip()

    def wait_for(self, url: str, expected: str, timeout: float = 60) -> None:
        answers: list[str] = []

        def probe() -> bool:
            answers.append(self.get(url))
            return answers[-1] == expected

        try:
            wait_for(f"{url} to answer {expected!r} in the cluster", probe, timeout=timeout, interval=1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last answer: {answers[-1] if answers else None!r}") from None


@pytest.fixture(scope="module")
def client_pod(module_namespace: str) -> ClientPod:
    return ClientPod(module_namespace)


class _Server(http.server.ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True


class _Page(http.server.SimpleHTTPRequestHandler):
    def log_message(self, fmt: str, *args: object) -> None:  # quiet test output
        pass


@contextlib.contextmanager
def serve_page(port: int, text: str) -> Iterator[int]:
    """A local HTTP server on 127.0.0.1:port answering `text` (port 0: any free port)."""
    with tempfile.TemporaryDirectory() as docroot:
        Path(docroot, "index.html").write_text(text + "\n")
        server = _Server(("127.0.0.1", port), functools.partial(_Page, directory=docroot))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield server.server_address[1]
        finally:
            server.shutdown()
            server.server_close()


@pytest.fixture(scope="module")
def local_server() -> Iterator[int]:
    """The laptop's 'tomcat': 127.0.0.1:8080 answering the seed's local v2 page."""
    with serve_page(8080, LOCAL) as port:
        yield port


def local_get(url: str, timeout: float = 10) -> str:
    """GET through no proxy at all (localhost listeners of forward)."""
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        return opener.open(url, timeout=timeout).read().decode().strip()
    except OSError as exc:
        return f"ERROR {exc}"


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if " ERR " in line]


def apply(namespace: str, obj: dict) -> None:
    """kubectl apply of one object given as a dict."""
    local = ROOT / ".cluster" / "bin" / "kubectl"
    r = subprocess.run([str(local) if local.exists() else "kubectl", "--kubeconfig", str(KUBECONFIG), "-n",
                        namespace, "apply", "-f", "-"], input=json.dumps(obj), capture_output=True, text=True,
                       timeout=60)
    if r.returncode != 0:
        raise AssertionError(f"kubectl apply failed: {r.stderr.strip()}")


def service_account_kubeconfig(namespace: str, name: str, rules: list[dict], owner: pwd.struct_passwd) -> str:
    """A kubeconfig (readable by `owner`) for a new ServiceAccount bound to a Role with `rules`."""
    apply(namespace, {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}})
    apply(namespace, {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": name},
                      "rules": rules})
    apply(namespace, {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                      "metadata": {"name": name},
                      "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                      "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]})
    token = kubectl("-n", namespace, "create", "token", name).stdout.strip()
    server = kubectl("config", "view", "--minify", "-o", "jsonpath={.clusters[0].cluster.server}").stdout
    ca = kubectl("config", "view", "--raw", "--minify", "--flatten", "-o",
                 "jsonpath={.clusters[0].cluster.certificate-authority-data}").stdout
    d = tempfile.mkdtemp(prefix="ktp-e2e-")
    os.chmod(d, 0o755)
    cfg = Path(d) / "kubeconfig"
    cfg.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": server, "certificate-authority-data": ca}}],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": name, "namespace": namespace}}],
    }))
    os.chown(cfg, owner.pw_uid, owner.pw_gid)
    os.chmod(cfg, 0o600)
    return str(cfg)


# What a shadow pod needs (connect's minimal Role in the README), and reading services.
SHADOW_RULES = [
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "create", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["get", "create"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list"]},
]
