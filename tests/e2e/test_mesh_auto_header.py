"""`ktctl mesh --auto-header` with `ktctl connect` on the same laptop (issue 10 item 6), on the real local
cluster, ktctl run as the unprivileged user.

kt-connect tells its users to add the mesh header with a browser plugin. With --auto-header the laptop's
own plain-HTTP requests through connect's HTTP proxy carry the developer's header by themselves: a
plain `curl http://tomcat:8080` reaches the laptop, while a pod in the cluster still reaches the original
pods. Without the flag (the default, as in the seed) the same curl reaches the original pods.

The laptop's tomcat is a local HTTP server on a free port answering "kt-connect local v2" (exposed as
LOCAL:8080, so parallel runs do not fight over 8080); the cluster's answers "kt-connect demo v1".
"""

from __future__ import annotations

import json
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.register_assert_rewrite("ktctl_runner")
from ktctl_runner import (  # noqa: E402
    DEMO,
    LOCAL,
    Background,
    ClientPod,
    Ktctl,
    free_port,
    kt_objects,
    serve_page,
    wait_for,
)

pytestmark = pytest.mark.cluster
pytest_plugins = ["ktctl_runner"]  # its fixtures: ktctl, demo, client_pod

URL = "http://tomcat:8080"
CONNECT_BANNER = "All looks good, now you can access to resources in the kubernetes cluster"
MESH_BANNER = "Now you can access your service by header"
_HEADER = re.compile(r"Now you can access your service by header '([^':]+): ([^']+)'")


@dataclass
class Connected:
    bg: Background
    port: int

    def curl(self, url: str = URL, *headers: str) -> str:
        """A plain curl through connect's HTTP proxy (as `export http_proxy=...` makes it), no header
        unless given; the page, or the error."""
        args = [a for h in headers for a in ("-H", h)]
        r = subprocess.run(["curl", "-sS", "--max-time", "20", "--noproxy", "", "-x", f"http://127.0.0.1:{self.port}",
                            *args, url], capture_output=True, text=True, timeout=30)
        return r.stdout.strip() if r.returncode == 0 else f"ERROR {r.stderr.strip()}"


@pytest.fixture(scope="module")
def laptop() -> Iterator[int]:
    with serve_page(0, LOCAL) as port:
        yield port


@pytest.fixture(scope="module")
def connect(ktctl: Ktctl, demo: str) -> Iterator[Connected]:
    port = free_port()
    bg = ktctl.start("connect", "--proxy-port", str(port), "--dns-port", "-1")
    bg.wait_banner(CONNECT_BANNER)
    yield Connected(bg, port)
    bg.stop()


@pytest.fixture
def settled(demo: str, client_pod: ClientPod, connect: Connected) -> str:
    """Each test starts from the seed's state: v1 answers in the cluster and through the proxy, and no
    mesh object (connect's own shadow is the only kt object)."""
    client_pod.wait_for(URL, DEMO)
    wait_for("no mesh objects", lambda: _mesh_objects(demo) == [], timeout=90)
    assert connect.curl() == DEMO
    return demo


def _mesh_objects(namespace: str) -> list[str]:
    return [o for o in kt_objects(namespace) if o.split("/", 1)[1].startswith("tomcat-kt-")]


def _marks(user: pwd.struct_passwd, namespace: str) -> list[dict]:
    """The mesh marks of `namespace` in the user's state directory."""
    d = Path(user.pw_dir) / ".ktproxy" / "mesh-marks"
    out = []
    for path in sorted(d.glob("*.json")) if d.is_dir() else []:
        data = json.loads(path.read_text())
        if data.get("namespace") == namespace:
            out.append(data)
    return out


@pytest.fixture
def start_mesh(ktctl: Ktctl, laptop: int) -> Iterator[Callable[..., tuple[Background, tuple[str, str]]]]:
    """`ktctl mesh tomcat --expose LAPTOP:8080 FLAGS...` up to its banner: (process, (KEY, value)). A run
    the test did not end is stopped with Ctrl-C after it, so a failure leaves the next test a clean service."""
    started: list[Background] = []

    def start(*flags: str) -> tuple[Background, tuple[str, str]]:
        mesh = ktctl.start("mesh", "tomcat", "--expose", f"{laptop}:8080", *flags)
        started.append(mesh)
        mesh.wait_banner(MESH_BANNER)
        m = _HEADER.search(mesh.output())
        assert m, mesh.output()
        return mesh, (m.group(1), m.group(2))

    yield start
    for mesh in started:
        mesh.stop(signal.SIGINT)


def test_auto_header_sends_the_laptops_plain_curl_to_the_laptop(
        start_mesh: Callable, settled: str, client_pod: ClientPod, connect: Connected,
        unprivileged_user: pwd.struct_passwd) -> None:
    mesh, (key, value) = start_mesh("--auto-header")
    [mark] = _marks(unprivileged_user, settled)
    assert (mark["service"], mark["key"], mark["value"], mark["pid"]) == ("tomcat", key.lower(), value, mesh.proc.pid)
    # This laptop's plain curl, no header given, by every name of the service: the laptop's version.
    assert connect.curl() == LOCAL
    assert connect.curl(f"http://tomcat.{settled}.svc.cluster.local:8080/") == LOCAL
    # Everybody else's traffic is unchanged: a pod in the cluster reaches the original pods.
    assert client_pod.get(URL) == DEMO
    # A header the request already has is kept (another value: the cluster's version).
    assert connect.curl(URL, f"{key}: someone-else") == DEMO
    started = [line for line in connect.bg.output().splitlines() if "auto-header:" in line and "now carry" in line]
    assert len(started) == 1 and f"tomcat.{settled}" in started[0] and value in started[0], connect.bg.output()
    assert mesh.stop(signal.SIGINT) in (0, 130)
    assert _marks(unprivileged_user, settled) == []  # withdrawn at clean-up
    assert connect.curl() != LOCAL  # from the first request after Ctrl-C on
    wait_for("the service restored", lambda: connect.curl() == DEMO and _mesh_objects(settled) == [], timeout=90)


def test_without_the_flag_the_same_curl_reaches_the_cluster(
        start_mesh: Callable, settled: str, client_pod: ClientPod, connect: Connected,
        unprivileged_user: pwd.struct_passwd) -> None:
    mesh, (key, value) = start_mesh()
    assert _marks(unprivileged_user, settled) == []
    assert connect.curl() == DEMO
    assert connect.curl(URL, f"{key}: {value}") == LOCAL  # the mesh itself works: the header is what decides
    assert client_pod.get(URL) == DEMO
    assert mesh.stop(signal.SIGINT) in (0, 130)


@pytest.mark.chromium
def test_a_browser_using_the_http_proxy_sees_the_laptops_version(
        start_mesh: Callable, settled: str, connect: Connected) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian chromium not installed")
    start_mesh("--auto-header")
    with tempfile.TemporaryDirectory() as profile:
        r = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", f"--proxy-server=http://127.0.0.1:{connect.port}",
             "--dump-dom", f"{URL}/"],
            capture_output=True, text=True, timeout=90)
    assert LOCAL in r.stdout, r.stderr[-2000:]


def test_a_sigkilled_mesh_no_longer_changes_the_laptops_traffic(
        ktctl: Ktctl, start_mesh: Callable, settled: str, client_pod: ClientPod, connect: Connected,
        unprivileged_user: pwd.struct_passwd) -> None:
    mesh, _ = start_mesh("--auto-header")
    assert connect.curl() == LOCAL
    mesh.kill()
    assert len(_marks(unprivileged_user, settled)) == 1  # a SIGKILLed mesh cannot withdraw its mark...
    # ...but its process is gone, so the proxy adds nothing: the router sends the plain request to the
    # original pods (with the header it would have answered 502 for the dead route).
    assert connect.curl() == DEMO
    assert client_pod.get(URL) == DEMO
    r = ktctl.run("recover", "tomcat")
    assert r.returncode == 0, r.stdout + r.stderr
