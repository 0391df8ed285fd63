"""Single-stream download through `ktctl connect` (SSH over one port-forward WebSocket) against
`kubectl port-forward` to the same pod, alternating, in one run (issue 15, port-forward levers).

    PYTHONPATH=$PWD python -m benchmarks.pf_ab [--rounds 3] [--mb 256] [--profile SECONDS] [--ktctl CMD]

Set-up as benchmarks.cases.cluster's (its own namespace `ktproxy-pfab-<hex>`, deleted by name at the
end; the target pod benchmarks/target.py on 9000). Per round: one download through each, alternating;
MB/s and CPU-s/GB of the client-side process (ktctl / kubectl) and of the API server + kubelet +
containerd. `--profile S` runs py-spy (--native, 200 Hz, raw) on ktctl during one more download and
prints benchmarks.profile's category summary. Prints `uptime` before and after, and one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.cases.cluster import (
    BANNER,
    BASE_IMAGE,
    KUBECTL,
    TARGET_POD,
    TARGET_PORT,
    _clean_env,
    _component_pids,
)
from benchmarks.cases.common import cpu_seconds
from benchmarks.procs import PY, REPO, free_port, wait_for

KUBECONFIG = REPO / ".cluster" / "kubeconfig"
DEFAULT_KTCTL = f"{PY} -c 'import sys; from ktproxy.cli import main; sys.argv[0]=\"ktctl\"; sys.exit(main())'"


def kubectl(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(KUBECTL), "--kubeconfig", str(KUBECONFIG), *args], input=input, capture_output=True,
                       text=True, timeout=150, env=_clean_env())
    if check and r.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {r.stderr.strip()[-400:]}")
    return r


def pod_pids(ns: str) -> list[int]:
    """Host PIDs of the containers of the pods in namespace ns whose name starts with kt-connect-shadow."""
    out = kubectl("-n", ns, "get", "pods", "-o", "json").stdout
    uids = [p["metadata"]["uid"] for p in json.loads(out)["items"]
            if p["metadata"]["name"].startswith("kt-connect-shadow")]
    keys = [u for uid in uids for u in (uid, uid.replace("-", "_"))]
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cg = (d / "cgroup").read_text()
            except OSError:
                continue
            if any(k in cg for k in keys):
                pids.append(int(d.name))
    return pids


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def download(via: str, target: str, nbytes: int, pids: list[int], shadow: list[int] | None = None) -> dict:
    side = _component_pids()
    h0 = cpu_seconds(shadow or [])
    c0, s0 = cpu_seconds(pids), cpu_seconds(side)
    each0 = [cpu_seconds([x]) for x in side]
    r = subprocess.run([PY, "-m", "benchmarks.load", "--via", via, "--target", target, "--mode", "down",
                        "--bytes", str(nbytes)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    if r.returncode != 0:
        raise RuntimeError(f"load: {r.stderr.strip()[-400:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    gb = out["bytes"] / 1e9
    return {"mbps": round(out["mbps"], 1), "cpu_gb": round((cpu_seconds(pids) - c0) / gb, 2),
            "side_cpu_gb": round((cpu_seconds(side) - s0) / gb, 2),
            "shadow_cpu_gb": round((cpu_seconds(shadow or []) - h0) / gb, 2),
            "each_side_cpu_gb": [round((cpu_seconds([x]) - c) / gb, 2) for x, c in zip(side, each0, strict=True)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--mb", type=int, default=256)
    p.add_argument("--profile", type=float, default=0.0, help="py-spy seconds on ktctl (0: none)")
    p.add_argument("--profile-out", default="")
    p.add_argument("--spdy", action="store_true",
                   help="also kubectl port-forward over plain SPDY (KUBECTL_PORT_FORWARD_WEBSOCKETS=false)")
    p.add_argument("--ws", action="store_true",
                   help="also a second ktctl connect with KTPROXY_PORTFORWARD_PROTOCOL=websocket")
    p.add_argument("--ktctl", default=DEFAULT_KTCTL, help="command line of ktctl (default: this tree's)")
    a = p.parse_args()
    ns = "ktproxy-pfab-" + os.urandom(3).hex()
    work = Path(tempfile.mkdtemp(prefix="pf_ab-"))
    procs: list[subprocess.Popen] = []
    result: dict = {"uptime_before": uptime(), "namespace": ns}
    try:
        kubectl("create", "namespace", ns)
        kubectl("-n", ns, "create", "configmap", "bench-target",
                f"--from-file=target.py={REPO / 'benchmarks' / 'target.py'}")
        kubectl("-n", ns, "apply", "-f", "-", input=TARGET_POD % {"image": BASE_IMAGE, "port": TARGET_PORT})
        kubectl("-n", ns, "wait", "--for=condition=Ready", "pod/bench-target", "--timeout=90s")
        ip = kubectl("-n", ns, "get", "pod", "bench-target", "-o", "jsonpath={.status.podIP}").stdout.strip()
        env = {**_clean_env(), "PYTHONPATH": str(REPO)}
        proxy_port, dns_port, pf_port = free_port(), free_port(), free_port()
        klog = work / "ktctl.log"
        with open(klog, "w") as f:
            kt = subprocess.Popen([*shlex.split(a.ktctl), "--kubeconfig", str(KUBECONFIG), "-n", ns, "connect",
                                   "--proxy-port", str(proxy_port), "--dns-port", str(dns_port)],
                                  stdout=f, stderr=subprocess.STDOUT, env=env)
        procs.append(kt)
        wait_for(lambda: BANNER in klog.read_text(errors="replace"), 120, "ktctl connect", kt)
        kw = None
        if a.ws:
            wport = free_port()
            wlog = work / "ktctl-ws.log"
            with open(wlog, "w") as f:
                kw = subprocess.Popen([*shlex.split(a.ktctl), "--kubeconfig", str(KUBECONFIG), "-n", ns, "connect",
                                       "--proxy-port", str(wport), "--dns-port", str(free_port())],
                                      stdout=f, stderr=subprocess.STDOUT,
                                      env={**env, "KTPROXY_PORTFORWARD_PROTOCOL": "websocket"})
            procs.append(kw)
            wait_for(lambda: BANNER in wlog.read_text(errors="replace"), 120, "ktctl connect (ws)", kw)
        plog = work / "pf.log"
        with open(plog, "w") as f:
            pf = subprocess.Popen([str(KUBECTL), "--kubeconfig", str(KUBECONFIG), "-n", ns, "port-forward",
                                   "--address", "127.0.0.1", "pod/bench-target", f"{pf_port}:{TARGET_PORT}"],
                                  stdout=f, stderr=subprocess.STDOUT, env=_clean_env())
        procs.append(pf)
        wait_for(lambda: "Forwarding from" in plog.read_text(errors="replace"), 30, "kubectl port-forward", pf)
        sp = None
        if a.spdy:
            sport = free_port()
            slog = work / "spdy.log"
            with open(slog, "w") as f:
                sp = subprocess.Popen([str(KUBECTL), "--kubeconfig", str(KUBECONFIG), "-n", ns, "port-forward",
                                       "--address", "127.0.0.1", "pod/bench-target", f"{sport}:{TARGET_PORT}"],
                                      stdout=f, stderr=subprocess.STDOUT,
                                      env={**_clean_env(), "KUBECTL_PORT_FORWARD_WEBSOCKETS": "false"})
            procs.append(sp)
            wait_for(lambda: "Forwarding from" in slog.read_text(errors="replace"), 30, "kubectl (SPDY)", sp)
        shadows = pod_pids(ns)  # both ktctl connects' shadows when --ws: CPU of the one in use counts
        result["shadow_pids"] = shadows
        n = a.mb * 2**20
        rounds = []
        for _ in range(a.rounds):
            k = download(f"socks5:127.0.0.1:{proxy_port}", f"{ip}:{TARGET_PORT}", n, [kt.pid], shadows)
            q = download("direct", f"127.0.0.1:{pf_port}", n, [pf.pid])
            rounds.append({"ktctl": k, "kubectl": q, "ratio": round(k["mbps"] / q["mbps"], 2)})
            if kw is not None:
                rounds[-1]["ktctl_ws"] = download(f"socks5:127.0.0.1:{wport}", f"{ip}:{TARGET_PORT}", n, [kw.pid],
                                                  shadows)
                rounds[-1]["ratio_ws"] = round(rounds[-1]["ktctl_ws"]["mbps"] / q["mbps"], 2)
            if sp is not None:
                rounds[-1]["kubectl_spdy"] = download("direct", f"127.0.0.1:{sport}", n, [sp.pid])
            print(json.dumps(rounds[-1]), file=sys.stderr, flush=True)
        result["rounds"] = rounds
        ratios = sorted(r["ratio"] for r in rounds)
        result["median_ratio"] = ratios[len(ratios) // 2]
        for key in ("ktctl", "kubectl"):
            for m in ("mbps", "cpu_gb", "side_cpu_gb"):
                vals = sorted(r[key][m] for r in rounds)
                result[f"median_{key}_{m}"] = vals[len(vals) // 2]
        if a.profile:
            raw = a.profile_out or str(work / "ktctl.raw")
            spy = subprocess.Popen([str(Path(PY).parent / "py-spy"), "record", "--native", "--rate", "200",
                                    "--duration", str(int(a.profile)), "--format", "raw", "--pid", str(kt.pid),
                                    "-o", raw], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            download(f"socks5:127.0.0.1:{proxy_port}", f"{ip}:{TARGET_PORT}", 4 * n, [kt.pid])
            spy.wait(120)
            from benchmarks import profile
            stacks = profile.read_raw(Path(raw).read_text())
            result["profile"] = profile.summary(stacks)
            result["profile_raw"] = raw
    finally:
        for pr in reversed(procs):
            if pr.poll() is None:
                pr.send_signal(2)  # SIGINT: ktctl deletes its shadow pod
                try:
                    pr.wait(60)
                except subprocess.TimeoutExpired:
                    pr.kill()
        kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)
        result["uptime_after"] = uptime()
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
