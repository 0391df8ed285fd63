"""The local cluster is a real Kubernetes: each check here is one thing the other e2e tests rely on.

Runs the quickstart's own commands (with -n) against the demo-http stand-in image for tomcat:9.
"""

import http.client
import json
import re
import subprocess
import time

import pytest

DEMO_TEXT = "kt-connect demo v1"


def _wait_rollout(kubectl, ns, what, timeout=180):
    kubectl("rollout", "status", what, "-n", ns, f"--timeout={timeout}s", timeout=timeout + 30)


@pytest.fixture(scope="module")
def demo(kubectl, module_namespace):
    ns = module_namespace
    # The quickstart, verbatim apart from the namespace.
    kubectl("create", "deployment", "tomcat", "--image=tomcat:9", "--port=8080", "-n", ns)
    kubectl("expose", "deployment", "tomcat", "--port=8080", "--target-port=8080", "-n", ns)
    _wait_rollout(kubectl, ns, "deployment/tomcat")
    kubectl("exec", "deployment/tomcat", "-c", "tomcat", "-n", ns, "--", "/bin/bash", "-c",
            'mkdir webapps/ROOT; echo "kt-connect demo v1" > webapps/ROOT/index.html')
    # A client pod in the same namespace, for in-cluster requests and name resolution.
    kubectl("run", "client", "--image=docker.io/ktproxy/base:0.1.0", "-n", ns, "--restart=Never",
            "--command", "--", "sleep", "infinity")
    kubectl("wait", "--for=condition=Ready", "pod/client", "-n", ns, "--timeout=120s", timeout=150)
    svc = json.loads(kubectl("get", "svc", "tomcat", "-n", ns, "-o", "json").stdout)
    pods = json.loads(kubectl("get", "pods", "-n", ns, "-l", "app=tomcat", "-o", "json").stdout)["items"]
    return {"ns": ns, "cluster_ip": svc["spec"]["clusterIP"], "pod": pods[0]["metadata"]["name"],
            "pod_ip": pods[0]["status"]["podIP"]}


def _pod_fetch(kubectl, ns, url):
    code = ("import urllib.request,sys;"
            "o=urllib.request.build_opener(urllib.request.ProxyHandler({}));"
            "sys.stdout.write(o.open(sys.argv[1],timeout=10).read().decode())")
    return kubectl("exec", "client", "-n", ns, "--", "python3", "-c", code, url, timeout=60).stdout


def _http_get(host, port, path="/", method="GET"):
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, r.read().decode(), r
    finally:
        conn.close()


def test_node_ready(kubectl, core_v1, cluster):
    node = json.loads(kubectl("get", "node", cluster.node_name, "-o", "json").stdout)
    ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
    assert ready == "True"
    assert node["status"]["nodeInfo"]["kubeletVersion"].startswith("v1.34")
    nodes = core_v1.list_node().items
    assert [n.metadata.name for n in nodes] == [cluster.node_name]
    addrs = {a.type: a.address for a in nodes[0].status.addresses}
    assert addrs["InternalIP"] == cluster.node_ip


def test_deployment_gets_pods(kubectl, demo):
    dep = json.loads(kubectl("get", "deployment", "tomcat", "-n", demo["ns"], "-o", "json").stdout)
    assert dep["status"].get("readyReplicas") == 1
    assert demo["pod_ip"].startswith("10.244.")


def test_demo_http_behaves_like_the_quickstart_needs(kubectl, demo):
    ip = demo["pod_ip"]
    assert _pod_fetch(kubectl, demo["ns"], f"http://{ip}:8080/") == DEMO_TEXT + "\n"
    # 404 for anything else, HEAD works, and the connection is kept alive between requests.
    conn = http.client.HTTPConnection(demo["cluster_ip"], 8080, timeout=10)
    try:
        conn.request("GET", "/missing")
        r = conn.getresponse()
        r.read()
        assert r.status == 404
        conn.request("HEAD", "/")
        r = conn.getresponse()
        assert r.status == 200 and r.read() == b""
        assert int(r.headers["Content-Length"]) == len(DEMO_TEXT) + 1
        conn.request("GET", "/index.html")
        r = conn.getresponse()
        assert r.read().decode() == DEMO_TEXT + "\n"
        assert "tomcat" not in (r.headers.get("Server") or "").lower()
    finally:
        conn.close()


def test_cluster_ip_reaches_pods_from_host(demo):
    status, body, _ = _http_get(demo["cluster_ip"], 8080)
    assert (status, body) == (200, DEMO_TEXT + "\n")


def test_cluster_ip_reaches_pods_from_pod(kubectl, demo):
    assert _pod_fetch(kubectl, demo["ns"], f"http://{demo['cluster_ip']}:8080/") == DEMO_TEXT + "\n"


@pytest.mark.parametrize("name", ["tomcat", "tomcat.{ns}", "tomcat.{ns}.svc.cluster.local"])
def test_pods_resolve_service_names(kubectl, demo, name):
    host = name.format(ns=demo["ns"])
    out = kubectl("exec", "client", "-n", demo["ns"], "--", "getent", "hosts", host).stdout
    assert out.split()[0] == demo["cluster_ip"]
    assert _pod_fetch(kubectl, demo["ns"], f"http://{host}:8080/") == DEMO_TEXT + "\n"


def test_cluster_dns_answers_only_cluster_names(cluster, demo):
    def dig(*args):
        return subprocess.run(["dig", f"@{cluster.dns_ip}", "+time=2", "+tries=1", *args],
                              capture_output=True, text=True, timeout=15).stdout

    assert dig("+short", f"tomcat.{demo['ns']}.svc.cluster.local").split() == [demo["cluster_ip"]]
    # Names outside the cluster are refused, never forwarded to the host's upstream resolver.
    assert "status: REFUSED" in dig("example.com")


def test_pods_have_no_route_off_the_machine(kubectl, demo):
    routes = kubectl("exec", "client", "-n", demo["ns"], "--", "ip", "-4", "route").stdout
    assert "default" not in routes
    assert "10.96.0.0/16" in routes


def test_kubectl_exec(kubectl, demo):
    r = kubectl("exec", "deployment/tomcat", "-c", "tomcat", "-n", demo["ns"], "--", "/bin/bash", "-c",
                "pwd; cat webapps/ROOT/index.html; exit 3", check=False)
    assert r.returncode == 3
    assert r.stdout == f"/usr/local/tomcat\n{DEMO_TEXT}\n"


def test_kubectl_port_forward(kube_env, demo):
    proc = subprocess.Popen(["kubectl", "port-forward", "-n", demo["ns"], "svc/tomcat", ":8080"],
                            env=kube_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        port = None
        while port is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            m = re.search(r"Forwarding from 127\.0\.0\.1:(\d+)", line)
            port = int(m.group(1)) if m else None
        assert port, f"kubectl port-forward did not start: {proc.stderr.read() if proc.poll() else ''}"
        for _ in range(3):
            status, body, _ = _http_get("127.0.0.1", port)
            assert (status, body) == (200, DEMO_TEXT + "\n")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_python_client_port_forward(core_v1, demo):
    from kubernetes.stream import portforward

    pf = portforward(core_v1.connect_get_namespaced_pod_portforward, demo["pod"], demo["ns"], ports="8080")
    sock = pf.socket(8080)
    sock.settimeout(10)
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert body.decode() == DEMO_TEXT + "\n"
    finally:
        sock.close()
        pf.close()


def test_shadow_image_has_its_runtime(kubectl, namespace):
    code = ("import asyncssh, uvloop, importlib.util, sys;"
            "assert importlib.util.find_spec('shadow_image'), 'shadow_image missing';"
            "assert importlib.util.find_spec('ktwire'), 'ktwire missing';"
            "print(sys.executable)")
    kubectl("run", "shadow-check", "--image=docker.io/ktproxy/shadow:0.1.0", "-n", namespace,
            "--restart=Never", "--command", "--", "/opt/ktproxy/bin/python", "-c", code)
    kubectl("wait", "--for=jsonpath={.status.phase}=Succeeded", "pod/shadow-check", "-n", namespace,
            "--timeout=120s", timeout=150)
    logs = kubectl("logs", "shadow-check", "-n", namespace).stdout
    assert logs.strip() == "/opt/ktproxy/bin/python"


def test_image_pulls_never_leave_the_machine(kubectl, namespace):
    # No registry is reachable or may be contacted: a missing image must fail at containerd's dead
    # loopback proxy, not by resolving or dialling a registry.
    kubectl("run", "nopull", "--image=docker.io/library/ktproxy-no-such-image:1", "-n", namespace,
            "--restart=Never")
    deadline = time.monotonic() + 60
    message = ""
    while time.monotonic() < deadline and "127.0.0.1:9" not in message:
        time.sleep(1)
        message = kubectl("get", "pod", "nopull", "-n", namespace, "-o",
                          "jsonpath={.status.containerStatuses[0].state.waiting.message}").stdout
    assert "proxyconnect tcp: dial tcp 127.0.0.1:9" in message
