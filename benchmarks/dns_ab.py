"""Cached-name DNS on loopback: the data plane's stub from one or more source trees, and CoreDNS, in one run.

    PYTHONPATH=$PWD python -m benchmarks.dns_ab --tree before=/tmp/old --tree after=. \\
        [--coredns /path/to/coredns] [--rounds 3] [--seconds 5] [--clients 50]

Each tree's data plane (with its DNS stub, as `benchmarks.profile --case dns` sets it up: a dnslib
"cluster DNS" behind the SSH tunnel) stays up for the whole run; the load (`benchmarks.dnsload --names
cached`, 50 clients, the same three names) goes to each in turn, round after round, so that the ratios
compare figures taken under the same machine load. CoreDNS, when given, answers the same names from its
`hosts` plugin behind `cache` on 127.0.0.4 (the yardstick of the cluster-dns case: CoreDNS answering a
cached name). Per run: queries/s, p99, bad answers, and the server's CPU per query (utime+stime from
/proc, so a busy machine shows less in it than in queries/s). Prints one JSON object; loadavg with each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.procs import PY, free_port, wait_for
from benchmarks.profile import HOT

TICK = os.sysconf("SC_CLK_TCK")

# Run inside a tree (its benchmarks package and ktproxy): set the stub up, say where, wait for EOF.
_SERVE = """
import json, sys
from benchmarks.profile import Env
env = Env(dns=True)
try:
    print(json.dumps({"dns": env.dns, "pid": env.pids["dataplane"]}), flush=True)
    sys.stdin.read()
finally:
    env.close()
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def measure(server: str, pid: int, clients: int, seconds: float) -> dict:
    argv = [PY, "-m", "benchmarks.dnsload", "--server", server, "--names", "cached", "--hot", ",".join(HOT),
            "--clients", str(clients), "--duration", str(seconds), "--warmup", "1"]
    before_cpu, started = cpu_seconds(pid), time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    cpu, wall = cpu_seconds(pid) - before_cpu, time.monotonic() - started
    if r.returncode != 0:
        raise RuntimeError(f"dnsload failed: {r.stderr[-400:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    # The CPU is counted over the whole load run (warm-up included), so per query over all of it.
    answered = out["qps"] * wall
    out["cpu_us_per_query"] = round(cpu / answered * 1e6, 2) if answered else None
    out["loadavg"] = loadavg()
    return out


def start_coredns(binary: str, workdir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port("127.0.0.4")
    hosts = "\n".join(f"        10.96.0.10 {name}" for name in HOT)
    corefile = workdir / "Corefile"
    corefile.write_text(f".:{port} {{\n    bind 127.0.0.4\n    hosts {{\n{hosts}\n        ttl 300\n    }}\n"
                        f"    cache 5\n}}\n")
    proc = subprocess.Popen([binary, "-conf", str(corefile), "-quiet"], cwd=workdir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    server = f"127.0.0.4:{port}"
    time.sleep(0.5)
    wait_for(lambda: proc.poll() is None, 5, "CoreDNS", proc)
    return proc, server


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dns_ab")
    p.add_argument("--tree", action="append", default=[], help="NAME=PATH of a source tree (repeatable)")
    p.add_argument("--coredns", help="a CoreDNS binary, run on 127.0.0.4 as the yardstick")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--clients", type=int, default=50)
    args = p.parse_args()
    servers: dict[str, tuple[str, int]] = {}
    procs: list[subprocess.Popen] = []
    workdir = Path(tempfile.mkdtemp(prefix="dns-ab-"))
    try:
        for spec in args.tree:
            name, _, path = spec.partition("=")
            tree = str(Path(path).resolve())
            proc = subprocess.Popen([PY, "-c", _SERVE], cwd=tree, env={**os.environ, "PYTHONPATH": tree},
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            procs.append(proc)
            line = proc.stdout.readline() if proc.stdout else ""
            if not line:
                raise SystemExit(f"tree {name}: the data plane did not start")
            info = json.loads(line)
            servers[name] = (info["dns"], info["pid"])
        if args.coredns:
            proc, server = start_coredns(args.coredns, workdir)
            procs.append(proc)
            servers["coredns"] = (server, proc.pid)
        runs: dict[str, list[dict]] = {name: [] for name in servers}
        for _ in range(args.rounds):
            for name, (server, pid) in servers.items():
                runs[name].append(measure(server, pid, args.clients, args.seconds))
        summary = {}
        for name, rs in runs.items():
            summary[name] = {"qps": [r["qps"] for r in rs], "p99_us": [r["p99_us"] for r in rs],
                             "cpu_us_per_query": [r["cpu_us_per_query"] for r in rs],
                             "bad": sum(r["bad"] for r in rs), "errors": sum(r["errors"] for r in rs),
                             "loadavg": [r["loadavg"] for r in rs]}
        if "coredns" in runs:
            for name in runs:
                if name != "coredns":
                    summary[name]["qps_vs_coredns"] = [round(a["qps"] / b["qps"], 2)
                                                       for a, b in zip(runs[name], runs["coredns"], strict=True)]
        print(json.dumps({"clients": args.clients, "seconds": args.seconds, "rounds": summary}, indent=1))
    finally:
        for proc in procs:
            if proc.stdin:
                proc.stdin.close()
            if proc.poll() is None and proc.args[0] != PY:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    sys.exit(main())
