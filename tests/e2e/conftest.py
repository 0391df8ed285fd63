"""Fixtures for end-to-end tests against the local cluster (`make cluster-up`).

Every test under tests/e2e is marked `cluster` and skipped, with the reason, when .cluster/kubeconfig
is missing or the API server does not answer.

  kubeconfig   absolute path of the admin kubeconfig (.cluster/kubeconfig)
  kube_env     os.environ plus KUBECONFIG and PATH starting with .cluster/bin (kubectl), no proxy vars
  kubectl      kubectl(*args, input=None, timeout=120, check=True) -> CompletedProcess (text)
  core_v1      kubernetes.client.CoreV1Api bound to the kubeconfig
  namespace    a fresh namespace (kt-e2e-<random>) deleted after the test
  cluster      facts about the cluster (CIDRs, DNS IP, image names), from tests/cluster/lib.sh
"""

import os
import secrets
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER_DIR = Path(os.environ.get("KTPROXY_CLUSTER_DIR", REPO / ".cluster"))
KUBECONFIG = CLUSTER_DIR / "kubeconfig"
KUBECTL_DIR = CLUSTER_DIR / "bin"


@dataclass(frozen=True)
class ClusterInfo:
    node_name: str = "ktproxy-node"
    node_ip: str = "172.31.255.1"
    pod_cidr: str = "10.244.0.0/16"
    service_cidr: str = "10.96.0.0/16"
    dns_ip: str = "10.96.0.10"
    dns_domain: str = "cluster.local"
    api_service_ip: str = "10.96.0.1"
    demo_image: str = "tomcat:9"  # demo-http, a stand-in for the quickstart's tomcat (not Tomcat)
    base_image: str = "docker.io/ktproxy/base:0.1.0"  # Debian bookworm + python3 + iproute2
    shadow_image: str = "docker.io/ktproxy/shadow:0.1.0"
    pause_image: str = "registry.k8s.io/pause:3.10"


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.cluster)


def _clean_env() -> dict:
    env = dict(os.environ)
    # The cluster is local: a proxy set for the outside world must never see its traffic.
    for k in list(env):
        if k.lower() in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
            del env[k]
    env["KUBECONFIG"] = str(KUBECONFIG)
    env["PATH"] = f"{KUBECTL_DIR}{os.pathsep}{env.get('PATH', '')}"
    return env


_api_state: dict = {}
# A cluster that has just come up (or a busy machine) may miss one /readyz: ask again for this long
# before declaring the cluster absent and skipping (or, under `make test`, failing) the whole level.
API_WAIT = float(os.environ.get("KTPROXY_E2E_API_WAIT", "60"))
API_RETRY_EVERY = 3.0


def _readyz_problem() -> str | None:
    try:
        r = subprocess.run(["kubectl", "get", "--raw", "/readyz", "--request-timeout=5s"],
                           env=_clean_env(), capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cluster API unreachable ({e}): run `make cluster-up`"
    if r.returncode != 0:
        return f"cluster API not ready ({r.stderr.strip()[:200]}): run `make cluster-up`"
    return None


def _api_problem() -> str | None:
    if "problem" in _api_state:
        return _api_state["problem"]
    problem = None
    if not KUBECONFIG.is_file():
        problem = f"{KUBECONFIG} missing: run `make cluster-up`"
    elif not (KUBECTL_DIR / "kubectl").exists():
        problem = f"{KUBECTL_DIR / 'kubectl'} missing: run `make cluster-up`"
    else:
        deadline = time.monotonic() + API_WAIT
        while (problem := _readyz_problem()) and time.monotonic() + API_RETRY_EVERY < deadline:
            time.sleep(API_RETRY_EVERY)
        if problem:
            problem += f" (after {API_WAIT:.0f} s of retries)"
    _api_state["problem"] = problem
    return problem


@pytest.fixture(scope="session")
def kubeconfig() -> Path:
    problem = _api_problem()
    if problem:
        pytest.skip(problem)
    return KUBECONFIG


@pytest.fixture(scope="session")
def kube_env(kubeconfig) -> dict:
    return _clean_env()


@pytest.fixture(scope="session")
def cluster(kubeconfig) -> ClusterInfo:
    return ClusterInfo()


@pytest.fixture(scope="session")
def kubectl(kube_env):
    def run(*args, input=None, timeout=120, check=True):
        r = subprocess.run(["kubectl", *map(str, args)], env=kube_env, input=input,
                           capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(map(str, args))} failed ({r.returncode}):\n"
                                 f"{r.stdout}\n{r.stderr}")
        return r

    return run


@pytest.fixture(scope="session")
def api_client(kubeconfig):
    from kubernetes import config

    client = config.new_client_from_config(config_file=str(kubeconfig))
    yield client
    client.close()


@pytest.fixture(scope="session")
def core_v1(api_client):
    from kubernetes import client

    return client.CoreV1Api(api_client)


def _new_namespace(kubectl, prefix: str) -> str:
    name = f"{prefix}-{secrets.token_hex(3)}"
    kubectl("create", "namespace", name)
    # Pods need the namespace's default ServiceAccount, which the controller-manager adds shortly after
    # (slowly on a cluster that has just started). `kubectl wait` fails at once on a missing object: poll.
    deadline = time.monotonic() + 90
    while kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise AssertionError(f"namespace {name}: no default ServiceAccount after 90 s")
        time.sleep(0.5)
    return name


@pytest.fixture
def namespace(kubectl):
    name = _new_namespace(kubectl, "kt-e2e")
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def module_namespace(kubectl):
    name = _new_namespace(kubectl, "kt-e2e")
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


def no_proxy_opener() -> urllib.request.OpenerDirector:
    """urllib opener that ignores *_proxy env vars: cluster addresses are reached directly."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))
