"""The mesh router against nginx with kt-connect's route.conf in the cluster (issue 10): the same loads as
benchmarks.cases.mesh, from a client pod, with every piece a pod of the run's namespace (deleted by name at
the end, benchmarks.cases.cluster's):

- origins: pods `mesh-origin-s` and `mesh-origin-m` (nginx, 1 worker, a fixed 128-byte body `S...` / `M...`
  on 8080) behind Services `bench-kt-stuntman` and `bench-kt-mesh-abcde` (port 80 -> 8080): the names the
  mesh design gives the original pods' and the developer's Services.
- `bench-kt-router`: the shadow image running `python -m shadow_image.router --service bench --port 8080:80
  --health-port 8081 --annotations /etc/kt-router/annotations` with its annotations as a downward API file,
  the route in `kt-mesh-routes`, as the mesh command makes it (no API token, non-root).
- nginx pods `mesh-nginx-1`, `mesh-nginx-auto`, `mesh-nginx-shipped`: docker.io/ktproxy/nginx-light:0.1.0
  (tests/cluster/images/nginx.sh, built here on first use) with route.conf rendered for the same Services.
- `mesh-client`: the base image's python3 running benchmarks/httpload.py's coroutines (plain asyncio: no
  uvloop there) via `kubectl exec`, against the pods' IPs.
Traffic: the pod range and the API server only.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from benchmarks.cases.cluster import BASE_IMAGE, Cluster, cluster_fixture
from benchmarks.cases.mesh import (
    BODY_LEN,
    DIRECT,
    NGINX_1,
    NGINX_AUTO,
    NGINX_SHIPPED,
    NGINX_VARIANTS,
    ROUTE,
    ROUTER,
    ROUTES,
    SERVICE,
    Load,
    RouteConf,
    Target,
    add_memory,
    check_body,
    checked,
    render_nginx_conf,
    render_origin,
    render_route_conf,
    require_router,
    run_reps,
    sizes,
    verdict,
)
from benchmarks.harness import Context, Skip, case
from benchmarks.procs import REPO

NGINX_IMAGE = "docker.io/ktproxy/nginx-light:0.1.0"
SHADOW_IMAGE = "docker.io/ktproxy/shadow:0.1.0"
SP, TP, HEALTH = 80, 8080, 8081
POD_PREFIX = Path("/tmp")  # nginx's pid, logs and temp files inside its container

ORIGIN_POD = """\
apiVersion: v1
kind: Pod
metadata: {name: %(name)s, labels: {app: %(name)s}}
spec:
  terminationGracePeriodSeconds: 0
  automountServiceAccountToken: false
  containers:
  - name: nginx
    image: %(image)s
    imagePullPolicy: IfNotPresent
    args: ["-p", "/tmp", "-c", "/etc/bench/%(conf)s", "-e", "stderr"]
    readinessProbe: {tcpSocket: {port: %(port)d}, periodSeconds: 1}
    volumeMounts: [{name: conf, mountPath: /etc/bench}]
  volumes:
  - name: conf
    configMap: {name: mesh-nginx}
"""

SERVICE_YAML = """\
apiVersion: v1
kind: Service
metadata: {name: %(name)s}
spec:
  selector: {app: %(app)s}
  ports: [{name: kt-%(sp)d, port: %(sp)d, targetPort: %(tp)d}]
"""

# As the mesh design's router pod, without the kt labels (no ktctl in this namespace needs to find it).
ROUTER_POD = """\
apiVersion: v1
kind: Pod
metadata:
  name: %(service)s-kt-router
  labels: {app: mesh-router}
  annotations: {kt-config: "service=%(service)s", kt-mesh-routes: "%(route)s"}
spec:
  terminationGracePeriodSeconds: 0
  automountServiceAccountToken: false
  securityContext: {runAsUser: 10001, runAsGroup: 10001, runAsNonRoot: true}
  containers:
  - name: router
    image: %(image)s
    imagePullPolicy: IfNotPresent
    command: ["/opt/ktproxy/bin/python", "-m", "shadow_image.router"]
    args: ["--service", "%(service)s", "--port", "%(tp)d:%(sp)d", "--health-port", "%(health)d",
           "--annotations", "/etc/kt-router/annotations"]
    readinessProbe: {httpGet: {path: /ready, port: %(health)d}, periodSeconds: 1}
    volumeMounts: [{name: kt-router, mountPath: /etc/kt-router}]
  volumes:
  - name: kt-router
    downwardAPI: {items: [{path: annotations, fieldRef: {fieldPath: metadata.annotations}}]}
"""

CLIENT_POD = """\
apiVersion: v1
kind: Pod
metadata: {name: mesh-client}
spec:
  terminationGracePeriodSeconds: 0
  automountServiceAccountToken: false
  containers:
  - name: client
    image: %(image)s
    imagePullPolicy: IfNotPresent
    command: ["python3", "-c", "import time; time.sleep(10**9)"]
    volumeMounts: [{name: bench, mountPath: /bench/benchmarks}]
  volumes:
  - name: bench
    configMap: {name: mesh-client}
"""

# Run in the client pod: benchmarks/httpload.py's coroutines, aimed only at pod IPs.
IN_POD = """\
import asyncio, json, sys
sys.path.insert(0, "/bench")
from benchmarks import httpload
mode, host, port, streams, duration, warmup, *headers = sys.argv[1:]
assert host.startswith("10.244."), host
target = (host, int(port))
if mode == "check":
    status, body = httpload.fetch(target, headers)
    print(json.dumps({"status": status, "body": body.decode("latin-1")}))
else:
    run = httpload.keepalive if mode == "rr" else httpload.connections
    print(json.dumps(asyncio.run(run(target, int(streams), float(duration), float(warmup), headers))))
"""

# Run in a measured pod: the VmRSS and PSS (kB) of every process in its container but this one.
MEMORY = """\
import os
me, rss, pss = os.getpid(), 0, 0
for pid in filter(str.isdigit, os.listdir("/proc")):
    if int(pid) == me:
        continue
    try:
        rss += int(next(l for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS:")).split()[1])
        pss += int(next(l for l in open(f"/proc/{pid}/smaps_rollup") if l.startswith("Pss:")).split()[1])
    except (OSError, StopIteration):
        pass
print(rss, pss)
"""

# (yardstick, pod (its nginx.conf in the ConfigMap is POD.conf), worker_processes, upstream keepalive, access log)
POD_NAMES = {NGINX_1: "mesh-nginx-1", NGINX_AUTO: "mesh-nginx-auto", NGINX_SHIPPED: "mesh-nginx-shipped"}
NGINX_PODS = tuple((name, POD_NAMES[name], *rest) for name, *rest in NGINX_VARIANTS)


def nginx_confs() -> dict[str, str]:
    """The ConfigMap's files: the two origins' and the three route.conf proxies' nginx.conf."""
    out = {f"{which}.conf": render_nginx_conf(POD_PREFIX, 1, render_origin(TP, {"0.0.0.0": body * BODY_LEN}))
           for which, body in (("mesh-origin-s", b"S"), ("mesh-origin-m", b"M"))}
    for _, pod, workers, keepalive, log in NGINX_PODS:
        rc = RouteConf(SERVICE, ((SP, TP),), ROUTE[0], (ROUTE[1],), "0.0.0.0", f"{SERVICE}-kt-stuntman",
                       f"{SERVICE}-kt-mesh-{{version}}", keepalive)
        out[f"{pod}.conf"] = render_nginx_conf(POD_PREFIX, workers, render_route_conf(rc), log)
    return out


def ensure_nginx_image(ctx: Context) -> None:
    ctx.log("  nginx image (tests/cluster/images/nginx.sh; cached)")
    r = subprocess.run(["flock", "/tmp/ktproxy-images.lock", "bash", str(REPO / "tests/cluster/images/nginx.sh")],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise Skip(f"no nginx image for the cluster: {(r.stderr or r.stdout).strip()[-300:]}")


def apply(cl: Cluster, manifest: str) -> None:
    cl.kubectl("-n", cl.namespace, "apply", "-f", "-", input=manifest)


def pod_ip(cl: Cluster, pod: str) -> str:
    ip = cl.kubectl("-n", cl.namespace, "get", "pod", pod, "-o", "jsonpath={.status.podIP}").stdout.strip()
    if not ip.startswith("10.244."):
        raise RuntimeError(f"pod {pod} IP {ip!r} is not in the pod range 10.244.0.0/16")
    return ip


def setup(ctx: Context) -> tuple[Cluster, list[Target]]:
    require_router()
    cl = cluster_fixture(ctx)
    ensure_nginx_image(ctx)
    ns = cl.namespace
    confs = ctx.workdir / "mesh-nginx"
    confs.mkdir(exist_ok=True)
    for name, text in nginx_confs().items():
        (confs / name).write_text(text)
    cl.kubectl("-n", ns, "create", "configmap", "mesh-nginx", f"--from-file={confs}")
    init = ctx.workdir / "empty__init__.py"
    init.write_text("")
    bench = REPO / "benchmarks"
    cl.kubectl("-n", ns, "create", "configmap", "mesh-client", f"--from-file=__init__.py={init}",
               *(f"--from-file={f}.py={bench / f'{f}.py'}" for f in ("httpload", "load", "target")))
    for pod, app in (("mesh-origin-s", f"{SERVICE}-kt-stuntman"), ("mesh-origin-m", f"{SERVICE}-kt-mesh-{ROUTE[1]}")):
        apply(cl, ORIGIN_POD % {"name": pod, "image": NGINX_IMAGE, "conf": f"{pod}.conf", "port": TP})
        apply(cl, SERVICE_YAML % {"name": app, "app": pod, "sp": SP, "tp": TP})
    cl.kubectl("-n", ns, "wait", "--for=condition=Ready", "pod/mesh-origin-s", "pod/mesh-origin-m",
               "--timeout=90s", timeout=120)
    # After the Services: nginx resolves its upstreams' names once, at start ("host not found in upstream").
    apply(cl, ROUTER_POD % {"service": SERVICE, "route": f"{ROUTE[0]}:{ROUTE[1]}", "image": SHADOW_IMAGE, "tp": TP,
                            "sp": SP, "health": HEALTH})
    for _, pod, *_ in NGINX_PODS:
        apply(cl, ORIGIN_POD % {"name": pod, "image": NGINX_IMAGE, "conf": f"{pod}.conf", "port": TP})
    apply(cl, CLIENT_POD % {"image": BASE_IMAGE})
    pods = [f"{SERVICE}-kt-router", *(p for _, p, *_ in NGINX_PODS), "mesh-client"]
    r = cl.kubectl("-n", ns, "wait", "--for=condition=Ready", *(f"pod/{p}" for p in pods), "--timeout=120s",
                   timeout=150, check=False)
    if r.returncode != 0:
        logs = cl.kubectl("-n", ns, "logs", f"{SERVICE}-kt-router", "--tail=20", check=False).stdout
        raise RuntimeError(f"mesh pods not ready: {r.stderr.strip()[-300:]}\nrouter log:\n{logs}")

    def memory(pod: str):
        def read() -> tuple[float, float]:
            out = cl.kubectl("-n", ns, "exec", pod, "--", "python3", "-c", MEMORY).stdout.split()
            return int(out[0]) * 1024 / 1e6, int(out[1]) * 1024 / 1e6
        return read

    s_ip, m_ip = pod_ip(cl, "mesh-origin-s"), pod_ip(cl, "mesh-origin-m")
    targets = [Target(DIRECT, {ROUTES[0][0]: (s_ip, TP), ROUTES[1][0]: (m_ip, TP)})]
    for name, pod in ((ROUTER, f"{SERVICE}-kt-router"), *((n, p) for n, p, *_ in NGINX_PODS)):
        targets.append(Target(name, dict.fromkeys((label for label, _ in ROUTES), (pod_ip(cl, pod), TP)),
                              memory(pod)))
    return cl, targets


def in_pod(ctx: Context, cl: Cluster) -> Load:
    s = sizes(ctx)

    def load(addr: tuple[str, int], mode: str, streams: int, headers: list[str]) -> dict:
        r = cl.kubectl("-n", cl.namespace, "exec", "mesh-client", "--", "python3", "-c", IN_POD, mode, addr[0],
                       str(addr[1]), str(streams), str(s["duration"]), str(s["warmup"]), *headers,
                       check=False, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"in-pod httpload {mode} x{streams} on {addr} failed: {r.stderr.strip()[-400:]}")
        out = json.loads(r.stdout.strip().splitlines()[-1])
        return out if mode == "check" else checked(out, mode, streams, addr)
    return load


@case("cluster-mesh", "Mesh router vs nginx with kt-connect's route.conf, as pods: requests/s, p50/p99, "
      "new connections/s, RSS (client pod -> pod IPs)", group="cluster")
def cluster_mesh(ctx: Context) -> None:
    if ctx.quick:  # the loopback mesh case checks the same measuring code in --quick
        raise Skip("not run in --quick: it sets up seven pods and builds an image on first use")
    cl, targets = setup(ctx)
    load = in_pod(ctx, cl)
    for t in targets:
        for label, headers in ROUTES:
            r = load(t.addrs[label], "check", 1, headers)
            check_body(t.name, label, r["status"], r["body"].encode("latin-1"))
        add_memory(ctx, t, "idle (after start)")
    run_reps(ctx, targets, load)
    verdict(ctx)
    s = sizes(ctx)
    ctx.note(
        f"In the cluster (namespace {cl.namespace}, one node: this machine's CPUs carry the client, the proxy "
        f"and the origins). Origins: pods mesh-origin-s / mesh-origin-m ({NGINX_IMAGE}, 1 worker, a "
        f"{BODY_LEN}-byte body) behind Services {SERVICE}-kt-stuntman and {SERVICE}-kt-mesh-{ROUTE[1]} "
        f"({SP} -> {TP}). `{ROUTER}`: pod {SERVICE}-kt-router ({SHADOW_IMAGE}, `python -m shadow_image.router "
        f"--service {SERVICE} --port {TP}:{SP} ...`, route `{ROUTE[0]}:{ROUTE[1]}` in its annotations, "
        f"upstreams by Service name). nginx pods: the same route.conf as the loopback case, upstreams by "
        f"Service name (resolved once at start), `listen {TP}`. Load: pod mesh-client ({BASE_IMAGE}, python3 "
        f"without uvloop, benchmarks/httpload.py's coroutines via `kubectl exec`) against each pod's IP; "
        f"direct = the origin pods' IPs. {s['duration']:.1f} s after {s['warmup']:.1f} s warm-up per load. "
        f"Memory: VmRSS and PSS summed over the processes of the measured container (read by "
        f"`kubectl exec ... python3`, itself excluded). Each proxy is checked to route before it is measured.")
