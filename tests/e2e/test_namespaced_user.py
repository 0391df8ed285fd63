"""`ktctl connect` for the usual test-cluster account: rights in one namespace only, no cluster-scoped
list or get. A ServiceAccount in a fresh namespace, bound to the Role README.md documents (read from the
README, so the documented Role is the tested one), a kubeconfig built from its token, and ktctl run as an
unprivileged user. Discovery that needs cluster rights must fall back without a traceback.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from ktctl_runner import (
    DEMO,
    ROOT,
    Ktctl,
    apply,
    deploy_demo,
    error_lines,
    free_port,
    kt_objects,
    kubectl,
    unprivileged_user,
    user_ktctl,
)

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("user_ktctl")]
__all__ = ["unprivileged_user", "user_ktctl"]  # fixtures, used by name


def documented_role() -> dict:
    """The Role in README.md's "Using it" section."""
    text = (ROOT / "README.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    roles = [b for b in blocks if isinstance(b, dict) and b.get("kind") == "Role"]
    assert len(roles) == 1, "README.md should document exactly one Role"
    return roles[0]


@pytest.fixture(scope="module")
def limited_kubeconfig(unprivileged_user, module_namespace: str) -> Iterator[str]:
    """A kubeconfig with a ServiceAccount token whose only rights are the documented Role's."""
    ns = module_namespace
    deploy_demo(ns)
    role = documented_role()
    role["metadata"]["namespace"] = ns
    apply(ns, role)
    kubectl("-n", ns, "create", "serviceaccount", "dev")
    kubectl("-n", ns, "create", "rolebinding", "dev", f"--role={role['metadata']['name']}",
            f"--serviceaccount={ns}:dev")
    token = kubectl("-n", ns, "create", "token", "dev", "--duration=1h").stdout.strip()
    server = kubectl("config", "view", "--minify", "-o", "jsonpath={.clusters[0].cluster.server}").stdout
    ca = kubectl("config", "view", "--raw", "--minify", "--flatten", "-o",
                 "jsonpath={.clusters[0].cluster.certificate-authority-data}").stdout
    d = Path(tempfile.mkdtemp(prefix="ktp-e2e-"))
    cfg = d / "kubeconfig"
    cfg.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "dev",
        "clusters": [{"name": "c", "cluster": {"server": server, "certificate-authority-data": ca}}],
        "users": [{"name": "dev", "user": {"token": token}}],
        "contexts": [{"name": "dev", "context": {"cluster": "c", "user": "dev", "namespace": ns}}],
    }))
    os.chmod(d, 0o755)
    os.chown(cfg, unprivileged_user.pw_uid, unprivileged_user.pw_gid)
    os.chmod(cfg, 0o600)
    yield str(cfg)
    shutil.rmtree(d, ignore_errors=True)


def test_the_account_really_is_namespaced(limited_kubeconfig: str, module_namespace: str) -> None:
    """The premise: no cluster-scoped list or get (nodes, namespaces), full use of its namespace."""

    def can(*what: str) -> str:
        return kubectl("auth", "can-i", *what, f"--as=system:serviceaccount:{module_namespace}:dev",
                       check=False).stdout.strip()

    assert can("list", "nodes") == "no"
    assert can("get", "namespaces") == "no"
    assert can("list", "pods", "-A") == "no"
    assert can("create", "pods", "-n", module_namespace) == "yes"


def test_connect_runs_a_command_with_namespace_rights_only(unprivileged_user, limited_kubeconfig: str,
                                                           module_namespace: str) -> None:
    pod_ip = kubectl("-n", module_namespace, "get", "pod", "-l", "app=tomcat", "-o",
                     "jsonpath={.items[0].status.podIP}").stdout.strip()
    k = Ktctl(unprivileged_user, limited_kubeconfig, module_namespace)
    # A service name and a pod IP: both networks are found without cluster-scoped rights.
    script = f"curl -fsS --max-time 20 http://tomcat:8080 && curl -fsS --max-time 20 http://{pod_ip}:8080"
    r = k.run("connect", "--proxy-port", str(free_port()), "--dns-port", str(free_port()), "--",
              "sh", "-c", script, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count(DEMO) == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and error_lines(r.stderr) == [], r.stderr
    assert kt_objects(module_namespace) == []
