"""The reverse path (issue 9): a client pod -> a Service -> this machine, through `ktctl exchange`, against
kt-connect v0.3.7's `ktctl exchange` and against the service's own pod (the ceiling); and `ktctl forward
svc/NAME` against `kubectl port-forward svc/NAME` from this machine's loopback.

Set-up, in the run's namespace (benchmarks.cases.cluster's, deleted by name at the end): the target pod
(benchmarks/target.py) behind Service `bench-svc` (port 80 -> 9000), and a client pod running
benchmarks/load.py's coroutines with the base image's python3 (`kubectl exec`, one process per
measurement). The laptop side is benchmarks/target.py on 127.0.0.1. One yardstick at a time: the service's
own pod, then our exchange, then kt-connect's; each exchange is stopped the way a user stops it (SIGINT for
ours, SIGTERM for kt-connect's) and the selector is checked to be back before the next one starts.
Traffic: loopback, the cluster's pod and service ranges, the API server.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass

from benchmarks import yardsticks
from benchmarks.cases.cluster import (
    BASE_IMAGE,
    KTCTL,
    KUBECTL,
    TARGET_PORT,
    Cluster,
    _clean_env,
    cluster_fixture,
    target_pod,
)
from benchmarks.cases.common import MB, cpu_seconds, run_load
from benchmarks.harness import Context, case
from benchmarks.procs import REPO, free_port, start_target, wait_for

SVC = "bench-svc"
SVC_PORT = 80
SERVICE_RANGE = ipaddress.ip_network("10.96.0.0/12")
ORIGINAL_SELECTOR = {"app": "bench-target"}

POD = "service's own pod (ceiling)"
OURS = "ktctl exchange (ktproxy)"
KTCONNECT = "kt-connect v0.3.7 exchange"
FORWARD = "ktctl forward (ktproxy)"
PORT_FORWARD = "kubectl port-forward svc/NAME"

DOWNLOAD = "download, 1 stream"
RR = "request/response (keep-alive), {n}"

SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: %(name)s}
spec:
  selector: {app: bench-target}
  ports: [{name: http, port: %(port)d, targetPort: %(target)d}]
"""

CLIENT_POD = """\
apiVersion: v1
kind: Pod
metadata: {name: bench-client}
spec:
  terminationGracePeriodSeconds: 0
  containers:
  - name: client
    image: %(image)s
    imagePullPolicy: IfNotPresent
    command: ["python3", "-c", "import time; time.sleep(10**9)"]
    volumeMounts: [{name: bench, mountPath: /bench/benchmarks}]
  volumes:
  - name: bench
    configMap: {name: bench-client}
"""

# Run in the client pod: benchmarks/load.py's own coroutines (plain asyncio: no uvloop in the image),
# aimed only at the Service's ClusterIP (load.py's CLI accepts only loopback and pod IPs).
IN_POD = """\
import asyncio, ipaddress, json, sys
sys.path.insert(0, "/bench")
from benchmarks import load
mode, host, port, a, b, c = sys.argv[1:7]
assert ipaddress.ip_address(host) in ipaddress.ip_network("10.96.0.0/12"), host
via, target = load.Via("direct"), (host, int(port))
if mode == "down":
    coro = load.bulk(via, target, "down", 1, int(a))
else:
    coro = load.rr(via, target, int(a), float(b), float(c))
print(json.dumps(asyncio.run(coro)))
"""


def sizes(ctx: Context) -> dict[str, float]:
    if ctx.quick:
        return dict(single=4 * 2**20, duration=0.3, warmup=0.1)
    return dict(single=128 * 2**20, duration=2.0, warmup=0.3)


@dataclass
class Reverse:
    cl: Cluster
    cluster_ip: str

    def selector(self) -> dict[str, str]:
        out = self.cl.kubectl("-n", self.cl.namespace, "get", "service", SVC, "-o", "jsonpath={.spec.selector}")
        return json.loads(out.stdout or "{}")

    def endpoints(self) -> list[str]:
        out = self.cl.kubectl("-n", self.cl.namespace, "get", "endpoints", SVC, "-o",
                              "jsonpath={.subsets[*].addresses[*].ip}", check=False)
        return out.stdout.split()

    def in_pod(self, mode: str, a: float, b: float = 0, c: float = 0, timeout: float = 120) -> dict:
        r = self.cl.kubectl("-n", self.cl.namespace, "exec", "bench-client", "--", "python3", "-c", IN_POD, mode,
                            self.cluster_ip, str(SVC_PORT), str(a), str(b), str(c), check=False, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"in-pod load client ({mode}) failed: {r.stderr.strip()[-400:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])


def reverse_fixture(ctx: Context) -> Reverse:
    def start(ctx: Context) -> Reverse:
        target_pod(ctx)
        cl = cluster_fixture(ctx)
        ns = cl.namespace
        cl.kubectl("-n", ns, "apply", "-f", "-", input=SERVICE % {"name": SVC, "port": SVC_PORT,
                                                                  "target": TARGET_PORT})
        bench = REPO / "benchmarks"
        init = ctx.workdir / "empty__init__.py"
        init.write_text("")
        cl.kubectl("-n", ns, "create", "configmap", "bench-client", f"--from-file=__init__.py={init}",
                   f"--from-file=load.py={bench / 'load.py'}", f"--from-file=target.py={bench / 'target.py'}")
        cl.kubectl("-n", ns, "apply", "-f", "-", input=CLIENT_POD % {"image": BASE_IMAGE})
        cl.kubectl("-n", ns, "wait", "--for=condition=Ready", "pod/bench-client", "--timeout=90s", timeout=120)
        ip = cl.kubectl("-n", ns, "get", "service", SVC, "-o", "jsonpath={.spec.clusterIP}").stdout.strip()
        if ipaddress.ip_address(ip) not in SERVICE_RANGE:
            raise RuntimeError(f"{SVC} ClusterIP {ip} is not in the service range {SERVICE_RANGE}")
        return Reverse(cl, ip)
    return ctx.fixture("cluster-reverse", start)


def add_cpu(ctx: Context, metric: str, name: str, pids: list[int], before: float, nbytes: int) -> None:
    if pids:
        ctx.add(f"{metric}: laptop-side CPU", name, "CPU-s/GB", (cpu_seconds(pids) - before) / (nbytes / 1e9),
                "lower")


def measure_in_pod(ctx: Context, rv: Reverse, name: str, pids: list[int]) -> None:
    s = sizes(ctx)
    before = cpu_seconds(pids)
    r = rv.in_pod("down", int(s["single"]))
    ctx.add(DOWNLOAD, name, "MB/s", r["mbps"])
    add_cpu(ctx, DOWNLOAD, name, pids, before, r["bytes"])
    for n in (1, 100):
        r = rv.in_pod("rr", n, s["duration"], s["warmup"])
        metric = RR.format(n=f"{n} client{'s' if n > 1 else ''}")
        ctx.add(f"{metric}: rate", name, "requests/s", r["rps"])
        ctx.add(f"{metric}: p99", name, "µs", r["p99_us"], "lower")


def measure_local(ctx: Context, port: int, name: str, pids: list[int]) -> None:
    s = sizes(ctx)
    target = f"127.0.0.1:{port}"
    before = cpu_seconds(pids)
    r = run_load(ctx, "direct", target, "down", nbytes=int(s["single"]), timeout=180)
    ctx.add(f"forward: {DOWNLOAD}", name, "MB/s", r["mbps"])
    add_cpu(ctx, f"forward: {DOWNLOAD}", name, pids, before, r["bytes"])
    for n in (1, 100):
        r = run_load(ctx, "direct", target, "rr", streams=n, duration=s["duration"], warmup=s["warmup"],
                     timeout=120)
        metric = "forward: " + RR.format(n=f"{n} client{'s' if n > 1 else ''}")
        ctx.add(f"{metric}: rate", name, "requests/s", r["rps"])
        ctx.add(f"{metric}: p99", name, "µs", r["p99_us"], "lower")


def until_served(rv: Reverse, by_laptop: bool, what: str, timeout: float = 60) -> None:
    """The service's endpoints no longer (or again) are the target pod, and a request through it answers."""
    deadline = time.monotonic() + timeout
    pod_ip = rv.cl.target_ip
    while True:
        eps = rv.endpoints()
        if eps and (pod_ip not in eps) == by_laptop:
            try:
                rv.in_pod("rr", 1, 0.2, 0.0, timeout=30)
                return
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: {SVC} not served {'by the laptop' if by_laptop else 'by its pod'} "
                               f"after {timeout:.0f} s (endpoints {eps})")
        time.sleep(0.5)


def restored(ctx: Context, rv: Reverse, who: str) -> None:
    """After an exchange: the original selector back (put back by hand, and said so, if it is not)."""
    sel = rv.selector()
    if sel != ORIGINAL_SELECTOR:
        ctx.note(f"{who} left the selector {sel} after it stopped; put back by hand before going on")
        rv.cl.kubectl("-n", rv.cl.namespace, "patch", "service", SVC, "--type=json", "-p",
                      json.dumps([{"op": "replace", "path": "/spec/selector", "value": ORIGINAL_SELECTOR}]))
    until_served(rv, False, f"after {who}")


_serial = itertools.count()


def spawn_ktctl(ctx: Context, name: str, cl: Cluster, args: list[str], banner: str) -> tuple[subprocess.Popen, float]:
    name = f"{name}{next(_serial)}"  # a log of its own: Procs appends, an old banner must not count
    log = ctx.workdir / f"{name}.log"
    t0 = time.monotonic()
    proc = ctx.procs.spawn(name, [str(KTCTL), "--kubeconfig", str(cl.kubeconfig), "-n", cl.namespace, *args],
                           env=_clean_env())
    try:
        wait_for(lambda: log.exists() and banner in log.read_text(errors="replace"), 120, name, proc)
    except RuntimeError as exc:
        tail = ctx.procs.tail(name)
        sigint(ctx, proc)
        raise RuntimeError(f"{exc}\n{tail}") from None
    return proc, time.monotonic() - t0


def sigint(ctx: Context, proc: subprocess.Popen) -> None:
    """Ctrl-C, as a user stops it (ktctl restores what it changed), then make sure it is gone."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            ctx.log("  ktctl did not exit 60 s after SIGINT")
    ctx.procs.stop(proc)


def ratios(ctx: Context, title: str, ours: str, others: list[str], prefix: str = "") -> list[str]:
    """A table of ours / yardstick per metric (>1 better for rates, <1 better for p99); the missed goals."""
    assert ctx.current is not None
    rows, missed, met = [], [], 0
    for row in ctx.current.rows:
        if row.yardstick != ours or not row.metric.startswith(prefix):
            continue
        cells = [row.metric]
        for other in others:
            o = ctx.row(row.metric, other)
            cells.append(f"{row.median / o.median:.2f}x" if o and o.median else "n/a")
            if o and other == others[0] and "CPU" not in row.metric:
                ok = row.median >= o.median if row.better == "higher" else row.median <= o.median
                met += ok
                if not ok:
                    missed.append(f"{row.metric} ({row.median:,.0f} vs {o.median:,.0f} {row.unit})")
        rows.append(cells)
    if rows:
        ctx.table(title, ["metric", *(f"{ours} / {o}" for o in others)], rows)
    if met or missed:
        ctx.note(f"Goal: {ours} at least {others[0]}'s figure on every metric: met on {met} of {met + len(missed)}"
                 + (f"; not met: {'; '.join(missed)}" if missed else ""))
    return missed


@case("cluster-reverse", "Reverse path: client pod -> Service -> laptop via ktctl exchange vs kt-connect exchange "
      "vs the pod; ktctl forward vs kubectl port-forward", group="cluster")
def cluster_reverse(ctx: Context) -> None:
    from benchmarks import ktconnect

    rv = reverse_fixture(ctx)
    cl = rv.cl
    ok, why = ktconnect.available() if not ctx.quick else (False, "not started in --quick (its start-up alone "
                                                                  "takes ~15 s)")
    if not ok:
        ctx.yardstick_missing(yardsticks.KTCONNECT, why)
    local_proc, local_port = start_target(ctx.procs, host="127.0.0.1")

    def pod() -> None:
        until_served(rv, False, POD)
        measure_in_pod(ctx, rv, POD, [])

    def ours() -> None:
        proc, startup = spawn_ktctl(ctx, "ktctl-exchange", cl, ["exchange", SVC, "--expose",
                                                               f"{local_port}:{SVC_PORT}"],
                                    f"Now all request to service '{SVC}' will be redirected to local")
        try:
            until_served(rv, True, OURS)
            ctx.add("start to banner", OURS, "s", startup, "lower")
            measure_in_pod(ctx, rv, OURS, [proc.pid])
        finally:
            sigint(ctx, proc)
        restored(ctx, rv, OURS)

    def theirs() -> None:
        # kt-connect accepts only the target port as REMOTE (its #367, #315).
        h = ktconnect.start_exchange(str(cl.kubeconfig), cl.namespace, SVC, f"{local_port}:{TARGET_PORT}")
        try:
            until_served(rv, True, KTCONNECT)
            ctx.add("start to banner", KTCONNECT, "s", h.startup_seconds, "lower")
            measure_in_pod(ctx, rv, KTCONNECT, [h.pid])
        finally:
            h.stop()
        restored(ctx, rv, KTCONNECT)

    def forward(name: str) -> None:
        port = free_port()
        if name == FORWARD:
            proc = spawn_ktctl(ctx, "ktctl-forward", cl, ["forward", f"svc/{SVC}", f"{port}:{SVC_PORT}"],
                               "Now you can access port")[0]
        else:
            proc = start_kubectl_forward(ctx, cl, port)
        try:
            measure_local(ctx, port, name, [proc.pid])
        finally:
            sigint(ctx, proc)

    exchanges = [(OURS, ours)] + ([(KTCONNECT, theirs)] if ok else [])
    forwards = [(n, lambda n=n: forward(n)) for n in (FORWARD, PORT_FORWARD)]
    try:
        for i in ctx.reps():
            # Every yardstick starts afresh each repetition, and the two compared ones swap order every
            # other repetition, so a change in the machine's load does not always fall on the same one.
            flip = (lambda xs: xs[::-1]) if i % 2 else (lambda xs: xs)
            for name, fn in [(POD, pod), *flip(exchanges), *flip(forwards)]:
                ctx.log(f"  yardstick: {name}")
                fn()
    finally:
        ctx.procs.stop(local_proc)
    summarize(ctx, cl)


def start_kubectl_forward(ctx: Context, cl: Cluster, port: int) -> subprocess.Popen:
    name = f"kubectl-pf-svc-{port}"
    log = ctx.workdir / f"{name}.log"
    proc = ctx.procs.spawn(name, [str(KUBECTL), "--kubeconfig", str(cl.kubeconfig), "-n", cl.namespace,
                                  "port-forward", "--address", "127.0.0.1", f"svc/{SVC}", f"{port}:{SVC_PORT}"],
                           env=_clean_env())
    wait_for(lambda: log.exists() and "Forwarding from" in log.read_text(errors="replace"), 30,
             "kubectl port-forward", proc)
    return proc


def summarize(ctx: Context, cl: Cluster) -> None:
    ratios(ctx, "Exchange ratios (medians of this run)", OURS, [KTCONNECT, POD])
    ratios(ctx, "Forward ratios (medians of this run)", FORWARD, [PORT_FORWARD], prefix="forward:")
    s = sizes(ctx)
    ctx.note(f"Exchange rows: the load client runs in pod bench-client ({BASE_IMAGE}, python3 without uvloop, "
             f"benchmarks/load.py's coroutines via `kubectl exec`) against Service {SVC}'s ClusterIP, port "
             f"{SVC_PORT} -> target port {TARGET_PORT}. `{POD}`: the selector picks the pod running "
             f"benchmarks/target.py (the ceiling). `{OURS}`: `ktctl exchange {SVC} --expose LOCAL:{SVC_PORT}`; "
             f"`{KTCONNECT}`: kt-connect's `ktctl exchange {SVC} --expose LOCAL:{TARGET_PORT} --mode selector` "
             f"(it accepts only the target port); both forward to benchmarks/target.py on 127.0.0.1:LOCAL here "
             f"(uvloop), through their shadow pod and one Kubernetes port-forward (API server -> kubelet -> "
             f"containerd). Each yardstick is checked to be the one answering (the service's endpoints) "
             f"before it is measured. Forward rows: the load client on this machine (uvloop) against "
             f"127.0.0.1:LOCAL of `ktctl forward svc/{SVC} LOCAL:{SVC_PORT}` or `kubectl port-forward "
             f"svc/{SVC} LOCAL:{SVC_PORT}`. Download {s['single'] / MB:.0f} MB per stream; request/response "
             f"HTTP/1.1 GET with a 128-byte body, closed loop, {s['duration']:.1f} s after {s['warmup']:.1f} s "
             f"warm-up. 'start to banner' is from spawning the command to its banner (kt-connect: to its "
             f"banner and reverse tunnel line, including its kt-rectifier clock probe). 'laptop-side CPU': user+system "
             f"CPU of the one process on this machine that carries the traffic (our ktctl; kt-connect's ktctl; "
             f"kubectl) per GB downloaded, not counted in the goal. Every repetition starts each yardstick afresh "
             f"and the compared pairs swap order every other repetition (load drift). Namespace "
             f"{cl.namespace} (deleted at the end).")

