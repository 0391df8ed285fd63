"""Cluster cases: the loopback measurements through `ktctl connect` against `kubectl port-forward` to the
same pod and against kt-connect's own ktctl (`connect --disableTunDevice`, SOCKS mode); the DNS stub
against the cluster DNS; start-up time. They need the local cluster (make cluster-up) and skip with the
reason when it is not there.

Everything lives in a namespace of the run's own (`ktproxy-bench-<hex>`), deleted by name at the end:
the target pod (benchmarks/target.py from a ConfigMap, run by the base image's python3), ktctl
connect's shadow pod and kt-connect's. Traffic goes only to loopback, the pod and service ranges and
the API server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import yardsticks
from benchmarks.cases.common import MB, Yardstick
from benchmarks.cases.loopback import measure_all
from benchmarks.harness import Context, Skip, case
from benchmarks.procs import PY, REPO, free_port, wait_for
from benchmarks.socksclient import socks5

KUBECTL = REPO / ".cluster" / "bin" / "kubectl"
KTCTL = REPO / ".venv" / "bin" / "ktctl"
BASE_IMAGE = "docker.io/ktproxy/base:0.1.0"
TARGET_PORT = 9000
BANNER = "All looks good"
CLUSTER_DNS = "10.96.0.10"
DOMAIN = "cluster.local"
HOT_NAMES = ["kubernetes.default.svc.cluster.local", "kube-dns.kube-system.svc.cluster.local"]
API_SERVICE = ("10.96.0.1", 443)  # the `kubernetes` ClusterIP: a proxied CONNECT that needs no pod of ours

DIRECT_POD = "direct (host -> pod IP)"
KT_CONNECT = "ktctl connect (ktproxy) SOCKS5"
PORT_FORWARD = "kubectl port-forward"
KTCONNECT = "kt-connect v0.3.7 SOCKS5"

# What the cluster runs as host processes and every proxied byte crosses on its way to a pod
# (API server -> kubelet -> containerd's port-forward), for the cluster-side CPU row.
PATH_COMPONENTS = ("kube-apiserver", "kubelet", "containerd")
SIDE_LABEL = "API server + kubelet + containerd"


def _clean_env() -> dict[str, str]:
    """No proxy variables: kubectl and ktctl talk to the API server directly, never through a proxy."""
    return {k: v for k, v in os.environ.items()
            if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}


def _component_pids() -> list[int]:
    pids = []
    for name in PATH_COMPONENTS:
        try:
            pids.append(int((REPO / ".cluster" / "run" / f"{name}.pid").read_text().split()[0]))
        except (OSError, ValueError, IndexError):
            pass
    return pids


@dataclass
class Cluster:
    """The run's namespace (created here, deleted by name in stop())."""

    ctx: Context
    kubeconfig: Path
    namespace: str
    target_ip: str = ""

    def kubectl(self, *args: str, input: str | None = None, timeout: float = 120,
                check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([str(KUBECTL), "--kubeconfig", str(self.kubeconfig), *args], input=input,
                           capture_output=True, text=True, timeout=timeout, env=_clean_env())
        if check and r.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {r.stderr.strip()[-400:]}")
        return r

    def stop(self) -> None:
        self.ctx.log(f"  deleting namespace {self.namespace}")
        r = self.kubectl("delete", "namespace", self.namespace, "--wait=true", "--timeout=120s",
                         "--ignore-not-found", check=False, timeout=150)
        if r.returncode != 0:
            self.ctx.log(f"  namespace {self.namespace} not deleted: {r.stderr.strip()[-300:]}")


def cluster_fixture(ctx: Context) -> Cluster:
    def start(ctx: Context) -> Cluster:
        kubeconfig = ctx.require_cluster()
        if not KUBECTL.exists():
            raise Skip(f"cluster not up: {KUBECTL.relative_to(REPO)} missing")
        cl = Cluster(ctx, kubeconfig, "ktproxy-bench-" + os.urandom(3).hex())
        r = cl.kubectl("get", "--raw", "/readyz", check=False, timeout=15)
        if r.returncode != 0:
            raise Skip(f"cluster not up: API server not ready ({r.stderr.strip()[-200:]})")
        cl.kubectl("create", "namespace", cl.namespace)
        return cl
    return ctx.fixture("cluster", start)


TARGET_POD = """\
apiVersion: v1
kind: Pod
metadata:
  name: bench-target
  labels: {app: bench-target}
spec:
  terminationGracePeriodSeconds: 2
  containers:
  - name: target
    image: %(image)s
    imagePullPolicy: IfNotPresent
    command: ["python3", "-c", "import asyncio, sys; sys.path.insert(0, '/bench'); import target; \
asyncio.run(target.serve('0.0.0.0', %(port)d, None))"]
    ports: [{containerPort: %(port)d}]
    readinessProbe: {tcpSocket: {port: %(port)d}, periodSeconds: 1}
    volumeMounts: [{name: bench, mountPath: /bench}]
  volumes:
  - name: bench
    configMap: {name: bench-target}
"""


def target_pod(ctx: Context) -> str:
    """benchmarks/target.py (same protocols as the loopback target) in a pod, listening on 9000; its IP.
    (Deleted with the namespace.)"""
    def start(ctx: Context) -> str:
        cl = cluster_fixture(ctx)
        src = REPO / "benchmarks" / "target.py"
        cl.kubectl("-n", cl.namespace, "create", "configmap", "bench-target", f"--from-file=target.py={src}")
        cl.kubectl("-n", cl.namespace, "apply", "-f", "-",
                   input=TARGET_POD % {"image": BASE_IMAGE, "port": TARGET_PORT})
        cl.kubectl("-n", cl.namespace, "wait", "--for=condition=Ready", "pod/bench-target", "--timeout=90s",
                   timeout=120)
        cl.target_ip = cl.kubectl("-n", cl.namespace, "get", "pod", "bench-target", "-o",
                                  "jsonpath={.status.podIP}").stdout.strip()
        if not cl.target_ip.startswith("10.244."):
            raise RuntimeError(f"target pod IP {cl.target_ip!r} is not in the pod range 10.244.0.0/16")
        return cl.target_ip
    return ctx.fixture("cluster-target", start)


# -- ktctl connect ------------------------------------------------------------------------------------

@dataclass
class Connect:
    ctx: Context
    proc: subprocess.Popen
    name: str
    proxy_port: int
    dns_port: int
    startup_seconds: float
    cleanup_seconds: float = 0.0

    def stop(self) -> None:
        """SIGINT, as a user's Ctrl-C: ktctl deletes its shadow pod and exits."""
        if self.proc.poll() is None:
            t0 = time.monotonic()
            os.kill(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(60)
                self.cleanup_seconds = time.monotonic() - t0
            except subprocess.TimeoutExpired:
                self.ctx.log(f"  {self.name} did not exit 60 s after SIGINT")
        self.ctx.procs.stop(self.proc)


_serial = iter(range(1_000_000))


def start_connect(ctx: Context, cl: Cluster) -> Connect:
    name = f"ktctl-connect{next(_serial)}"
    port, dns = free_port(), free_port()
    log = ctx.workdir / f"{name}.log"
    t0 = time.monotonic()
    proc = ctx.procs.spawn(name, [str(KTCTL), "--kubeconfig", str(cl.kubeconfig), "-n", cl.namespace, "connect",
                                  "--proxy-port", str(port), "--dns-port", str(dns)], env=_clean_env())

    def ready() -> bool:
        return log.exists() and BANNER in log.read_text(errors="replace")
    try:
        wait_for(ready, 120, "ktctl connect", proc)
    except RuntimeError as exc:
        tail = ctx.procs.tail(name)
        Connect(ctx, proc, name, port, dns, 0.0).stop()
        raise RuntimeError(f"{exc}\n{tail}") from None
    return Connect(ctx, proc, name, port, dns, time.monotonic() - t0)


def connect_fixture(ctx: Context) -> Connect:
    return ctx.fixture("cluster-connect", lambda c: start_connect(c, cluster_fixture(c)))


def socks_connect(port: int, host: str, dport: int, timeout: float = 10) -> None:
    """One SOCKS5 CONNECT through 127.0.0.1:port; returns when the proxy reports success."""
    socks5(port, host, dport, timeout).close()


# -- kubectl port-forward -----------------------------------------------------------------------------

@dataclass
class PortForward:
    ctx: Context
    proc: subprocess.Popen
    local_port: int

    def stop(self) -> None:
        self.ctx.procs.stop(self.proc)


def start_port_forward(ctx: Context, cl: Cluster) -> PortForward:
    port = free_port()
    name = f"port-forward{next(_serial)}"
    log = ctx.workdir / f"{name}.log"
    proc = ctx.procs.spawn(name, [str(KUBECTL), "--kubeconfig", str(cl.kubeconfig), "-n", cl.namespace,
                                  "port-forward", "--address", "127.0.0.1", "pod/bench-target",
                                  f"{port}:{TARGET_PORT}"], env=_clean_env())
    wait_for(lambda: log.exists() and "Forwarding from" in log.read_text(errors="replace"), 30,
             "kubectl port-forward", proc)
    return PortForward(ctx, proc, port)


# -- the data plane case ------------------------------------------------------------------------------

@dataclass
class ClusterEnv:
    """What measure_all needs: a target and the yardsticks."""

    target: str
    ys: list[Yardstick] = field(default_factory=list)

    def yardsticks(self) -> list[Yardstick]:
        return self.ys


def sizes(ctx: Context) -> dict[str, float]:
    if ctx.quick:
        return dict(single=4 * 2**20, per_stream=2**18, duration=0.3, warmup=0.1)
    return dict(single=256 * 2**20, per_stream=4 * 2**20, duration=1.5, warmup=0.3)


@case("cluster-dataplane", "Cluster data plane: ktctl connect vs kubectl port-forward vs kt-connect",
      group="cluster")
def cluster_dataplane(ctx: Context) -> None:
    target_pod(ctx)
    cl = cluster_fixture(ctx)
    kt = connect_fixture(ctx)
    pf = start_port_forward(ctx, cl)
    side = dict(side_pids=_component_pids(), side_label=SIDE_LABEL, tolerate_errors=True)
    env = ClusterEnv(f"{cl.target_ip}:{TARGET_PORT}", [
        Yardstick(DIRECT_POD, "direct"),
        Yardstick(KT_CONNECT, f"socks5:127.0.0.1:{kt.proxy_port}", [kt.proc.pid], **side),
        Yardstick(PORT_FORWARD, "direct", [pf.proc.pid], target=f"127.0.0.1:{pf.local_port}", **side),
    ])
    handle = None
    try:
        from benchmarks import ktconnect
        # Not even checked in --quick: available() would build kt-connect (~5 min) on a fresh machine.
        ok, why = ((False, "not started in --quick (its start-up alone takes ~15 s)") if ctx.quick
                   else ktconnect.available())
        if ok:
            handle = ktconnect.start_socks(str(cl.kubeconfig), cl.namespace, port=free_port())
            env.ys.append(Yardstick(KTCONNECT, f"socks5:127.0.0.1:{handle.socks_port}", [handle.pid], **side))
        else:
            ctx.yardstick_missing(yardsticks.KTCONNECT, why)
        for _ in ctx.reps():
            measure_all(ctx, env, s=sizes(ctx), timeout=180)
    finally:
        if handle is not None:
            handle.stop()
        pf.stop()
    goal_vs_ktconnect(ctx)
    s = sizes(ctx)
    ctx.note(f"Target: benchmarks/target.py (the loopback target, plain asyncio: no uvloop in the pod) in pod "
             f"bench-target ({BASE_IMAGE}) at {cl.target_ip}:{TARGET_PORT}; load client on the host (uvloop). "
             f"`{DIRECT_POD}` is the host reaching the pod over the node's bridge, no Kubernetes API in the "
             f"path: the ceiling. ktctl connect and kt-connect tunnel every stream over ONE SSH connection "
             f"carried by ONE Kubernetes port-forward (API server -> kubelet -> containerd); `{PORT_FORWARD}` "
             f"opens one port-forward stream per TCP connection (how users use it). "
             f"Bulk: {s['single'] / MB:.0f} MB per single stream, 64 x {s['per_stream'] / MB:.1f} MB aggregate; "
             f"request/response {s['duration']:.1f} s after {s['warmup']:.1f} s warm-up. "
             f"'proxy CPU' = CPU of the client-side process only (ktctl connect's single process, kubectl, "
             f"kt-connect's ktctl) per GB; '{SIDE_LABEL} CPU' = what those cluster processes spent meanwhile "
             f"per GB (anything else using the cluster at the time counts too). Neither includes the pods' own "
             f"processes (our shadow, kt-connect's sshd). Ciphers: ktproxy aes128-gcm; kt-connect "
             f"aes128-ctr + hmac-sha2-256 (its sshd_config allows only CTR modes).")


def goal_vs_ktconnect(ctx: Context) -> None:
    """The issue's goal: at least kt-connect's figure on every cluster metric (medians of this run)."""
    assert ctx.current is not None
    met, missed = 0, []
    for row in ctx.current.rows:
        if row.yardstick != KT_CONNECT or "CPU" in row.metric:
            continue
        other = ctx.row(row.metric, KTCONNECT)
        if other is None:
            continue
        ok = row.median >= other.median if row.better == "higher" else row.median <= other.median
        if ok:
            met += 1
        else:
            missed.append(f"{row.metric} ({row.median:,.0f} vs {other.median:,.0f} {row.unit})")
    if met or missed:
        ctx.note(f"Goal: at least kt-connect's figure on every metric: met on {met} of {met + len(missed)}"
                 + (f"; not met: {'; '.join(missed)}" if missed else ""))


# -- DNS --------------------------------------------------------------------------------------------

def run_dns(server: str, names: str, clients: int, duration: float, warmup: float, namespace: str) -> dict:
    argv = [PY, "-m", "benchmarks.dnsload", "--server", server, "--names", names, "--hot", ",".join(HOT_NAMES),
            "--namespace", namespace, "--domain", DOMAIN, "--clients", str(clients),
            "--duration", str(duration), "--warmup", str(warmup)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO)
    if r.returncode != 0:
        raise RuntimeError(f"DNS load client ({names} via {server}) failed: {r.stderr.strip()[-600:]}")
    import json
    return json.loads(r.stdout.strip().splitlines()[-1])


NAME_SETS = (("cached", "repeated names (cacheable)"), ("uncached", "unique names (never cached)"),
             ("mix", "50/50 mix"))


@case("cluster-dns", "DNS stub: queries/s and p99 vs asking the cluster DNS directly", group="cluster")
def cluster_dns(ctx: Context) -> None:
    cl = cluster_fixture(ctx)
    kt = connect_fixture(ctx)
    duration, warmup = (0.3, 0.1) if ctx.quick else (2.0, 0.3)
    servers = [("ktctl connect DNS stub (UDP)", f"127.0.0.1:{kt.dns_port}"),
               (f"cluster DNS {CLUSTER_DNS} directly", f"{CLUSTER_DNS}:53")]
    bad: dict[str, int] = {}
    for _ in ctx.reps():
        for clients in (1, 50):
            for names, label in NAME_SETS[-1:] if ctx.quick else NAME_SETS:
                for yardstick, server in servers:
                    r = run_dns(server, names, clients, duration, warmup, cl.namespace)
                    base = f"{label}, {clients} client{'s' if clients > 1 else ''}"
                    ctx.add(f"{base}: p50", yardstick, "µs", r["p50_us"], "lower")
                    ctx.add(f"{base}: p99", yardstick, "µs", r["p99_us"], "lower")
                    ctx.add(f"{base}: rate", yardstick, "queries/s", r["qps"])
                    for key in ("errors", "bad"):
                        if r[key]:
                            bad[f"{yardstick}: {base}: {key}"] = bad.get(f"{yardstick}: {base}: {key}", 0) + r[key]
    ctx.note(f"UDP A queries, closed loop (one query in flight per client), {duration:g} s after {warmup:g} s "
             f"warm-up; load client benchmarks/dnsload.py on the host. Repeated names: {', '.join(HOT_NAMES)} "
             f"(the stub answers them from its cache; CoreDNS from its own `cache 5`). Unique names: "
             f"`10-x-y-z.{cl.namespace}.pod.{DOMAIN}`, a new one per query (CoreDNS `pods insecure` answers "
             f"each; neither cache has seen it), so each goes stub -> SSH tunnel -> cluster DNS. Only "
             f"*.{DOMAIN} names are ever asked.")
    if bad:
        ctx.note("Timeouts (>1 s, 'errors') or answers without a record ('bad'): "
                 + "; ".join(f"{k} {v}" for k, v in bad.items()))
    else:
        ctx.note("Every query was answered with NOERROR and at least one record.")


# -- start-up -----------------------------------------------------------------------------------------

@case("cluster-startup", "ktctl connect start-up time to the banner (image present)", group="cluster")
def cluster_startup(ctx: Context) -> None:
    cl = cluster_fixture(ctx)
    if ctx.quick:
        # One start is enough to check the harness; reuse the shared one rather than start another.
        kt = connect_fixture(ctx)
        ctx.add("start to banner", KT_CONNECT, "s", kt.startup_seconds, "lower")
        ctx.note("--quick: the start-up of the connect the other cluster cases use; kt-connect not started.")
        return
    for _ in ctx.reps():
        kt = start_connect(ctx, cl)
        ctx.add("start to banner", KT_CONNECT, "s", kt.startup_seconds, "lower")
        t0 = time.monotonic()
        socks_connect(kt.proxy_port, *API_SERVICE)
        ctx.add("start to first proxied CONNECT", KT_CONNECT, "s", kt.startup_seconds + time.monotonic() - t0,
                "lower")
        kt.stop()
        if kt.cleanup_seconds:
            ctx.add("Ctrl-C to exit (shadow pod deleted)", KT_CONNECT, "s", kt.cleanup_seconds, "lower")
    from benchmarks import ktconnect
    ok, why = ktconnect.available()
    if not ok:
        ctx.yardstick_missing(yardsticks.KTCONNECT, why)
    else:
        for _ in ctx.reps():
            h = ktconnect.start_socks(str(cl.kubeconfig), cl.namespace, port=free_port())
            h.stop()
            ctx.add("start to first proxied CONNECT", KTCONNECT, "s", h.startup_seconds, "lower")
    ctx.note("Shadow images already imported; each start creates its shadow pod afresh in the run's namespace. "
             "ktctl connect: from spawning `ktctl connect` to the banner on stderr, then one SOCKS5 CONNECT to "
             f"the `kubernetes` service ({API_SERVICE[0]}:{API_SERVICE[1]}) through it; Ctrl-C is SIGINT until "
             "the process exits (it deletes its shadow pod first). kt-connect: Handle.startup_seconds (from "
             "launch until a SOCKS5 CONNECT through it reaches the shadow's sshd; includes its clock-probe "
             "`kt-rectifier` pod). No kt-connect stop time: benchmarks.ktconnect stops it its own way (SIGTERM, "
             "then deleting its pods by name with grace period 0), which says nothing about kt-connect.")
