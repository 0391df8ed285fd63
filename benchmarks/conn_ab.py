"""New connections through the loopback data plane: source trees against each other and OpenSSH, one run.

    PYTHONPATH=$PWD python -m benchmarks.conn_ab --tree before=/tmp/old --tree after=. \\
        [--rounds 3] [--seconds 5] [--streams 100] [--strace-seconds 6]

Each tree's data plane and shadow server (as the loopback case starts them: uvloop, aes128-gcm, the wire
patches, one target on 127.0.0.2) stay up for the whole run, and so does OpenSSH's `ssh -D` (root and
sshd needed; left out otherwise). The load, `benchmarks.load --mode conn` (a new SOCKS5 connection per
request, --streams at once), goes to each in turn, round after round, so ratios compare figures taken
under the same machine load; CPU per connection is the data plane's and shadow's (OpenSSH: ssh -D and
its sshd session) utime+stime over the run. Then, per tree, `strace -f -c` on its data plane for one more load run:
syscalls per accepted connection (accept4 counts them), getpid apart. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.procs import PY, Procs, Skip, make_keys, session_pids, start_openssh, start_target

TICK = os.sysconf("SC_CLK_TCK")

_SERVE = """
import json, sys
from benchmarks.profile import Env
env = Env(dns=False)
try:
    print(json.dumps({"via": env.via, "target": env.target, "pid": env.pids["dataplane"],
                      "pids": list(env.pids.values())}), flush=True)
    sys.stdin.read()
finally:
    env.close()
"""


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
    return total


def run_load(via: str, target: str, streams: int, seconds: float, warmup: float,
             pids: list[int] | None = None) -> dict:
    pids = pids or []
    argv = [PY, "-m", "benchmarks.load", "--via", via, "--target", target, "--mode", "conn",
            "--streams", str(streams), "--duration", str(seconds), "--warmup", str(warmup)]
    cpu0, t0 = cpu_seconds(pids), time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + warmup + 120)
    cpu, wall = cpu_seconds(pids) - cpu0, time.monotonic() - t0
    if r.returncode != 0 or not r.stdout.strip():
        raise RuntimeError(f"load failed: {r.stderr[-400:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if pids and out.get("rps"):
        # CPU over the whole load run (warm-up and start-up included), per connection at the window's rate.
        out["cpu_us_per_conn"] = round(cpu / (out["rps"] * wall) * 1e6, 1)
    out["loadavg"] = loadavg()
    return out


_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")


def strace_counts(pid: int, via: str, target: str, streams: int, seconds: float, workdir: Path) -> dict:
    out = workdir / f"strace-{pid}.txt"
    tracer = subprocess.Popen(["strace", "-f", "-c", "-o", str(out), "-p", str(pid)], stderr=subprocess.DEVNULL)
    time.sleep(1.5)  # attached
    result = run_load(via, target, streams, seconds, 0.0)
    time.sleep(0.5)
    tracer.send_signal(signal.SIGINT)
    tracer.wait(30)
    calls = {}
    for line in out.read_text().splitlines():
        m = _ROW.match(line)
        if m and m.group(2) != "total":
            calls[m.group(2)] = int(m.group(1))
    conns = calls.get("accept4", 0) or calls.get("accept", 0)
    total = sum(calls.values())
    top = sorted(calls.items(), key=lambda kv: -kv[1])[:8]
    return {"connections": conns, "syscalls_per_connection": round(total / conns, 2) if conns else None,
            "getpid_per_connection": round(calls.get("getpid", 0) / conns, 2) if conns else None,
            "top_per_connection": {k: round(v / conns, 2) for k, v in top} if conns else {},
            "load": result}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.conn_ab")
    p.add_argument("--tree", action="append", default=[], help="NAME=PATH of a source tree (repeatable)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--streams", type=int, default=100)
    p.add_argument("--strace-seconds", type=float, default=6, help="0: no strace")
    args = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="conn-ab-"))
    helpers: list[subprocess.Popen] = []
    procs = Procs(workdir)
    out: dict = {"streams": args.streams, "seconds": args.seconds}
    try:
        servers: dict[str, tuple[str, str, int | None]] = {}
        cpu_pids: dict[str, list[int]] = {}
        for spec in args.tree:
            name, _, path = spec.partition("=")
            tree = str(Path(path).resolve())
            helper = subprocess.Popen([PY, "-c", _SERVE], cwd=tree, env={**os.environ, "PYTHONPATH": tree},
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            helpers.append(helper)
            line = helper.stdout.readline() if helper.stdout else ""
            if not line:
                raise SystemExit(f"tree {name}: the data plane did not start")
            info = json.loads(line)
            servers[name] = (info["via"], info["target"], info["pid"])
            cpu_pids[name] = info["pids"]  # data plane and shadow server
        try:
            keys = make_keys(workdir)
            _, port = start_target(procs)
            openssh = start_openssh(procs, keys)
            servers["openssh"] = (f"socks5:127.0.0.1:{openssh.socks_port}", f"127.0.0.2:{port}", None)
            cpu_pids["openssh"] = [openssh.client.pid, *session_pids(openssh)]
        except Skip as exc:
            out["openssh_skipped"] = str(exc)
        runs: dict[str, list[dict]] = {name: [] for name in servers}
        for _ in range(args.rounds):
            for name, (via, target, _pid) in servers.items():
                runs[name].append(run_load(via, target, args.streams, args.seconds, 1.0, cpu_pids[name]))
        summary: dict = {name: {"conn_per_s": [round(r["rps"], 1) for r in rs], "p99_us": [r["p99_us"] for r in rs],
                                "cpu_us_per_conn": [r.get("cpu_us_per_conn") for r in rs],
                                "loadavg": [r["loadavg"] for r in rs]} for name, rs in runs.items()}
        if "openssh" in runs:
            for name in runs:
                if name != "openssh":
                    summary[name]["vs_openssh"] = [round(a["rps"] / b["rps"], 3)
                                                   for a, b in zip(runs[name], runs["openssh"], strict=True)]
        out["rounds"] = summary
        if args.strace_seconds > 0 and shutil.which("strace"):
            out["strace"] = {name: strace_counts(pid, via, target, args.streams, args.strace_seconds, workdir)
                             for name, (via, target, pid) in servers.items() if pid is not None}
            out["strace_loadavg"] = loadavg()
        print(json.dumps(out, indent=1))
    finally:
        for helper in helpers:
            if helper.stdin:
                helper.stdin.close()
        for helper in helpers:
            try:
                helper.wait(20)
            except subprocess.TimeoutExpired:
                helper.kill()
                helper.wait()
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
