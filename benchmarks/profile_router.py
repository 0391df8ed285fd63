"""Profile of the mesh router (shadow_image/router) under the mesh case's keep-alive load.

    python -m benchmarks.profile_router [--seconds 15] [--clients 100] [--tag NAME]
    python -m benchmarks.profile_router --report [--tag NAME]   # the tables from the committed raw stacks

The set-up is the `mesh` case's (benchmarks/cases/mesh.py): one nginx origin (127.0.0.2 stuntman,
127.0.0.3 route upstream), the router in front with the route `version:abcde`, all on loopback. For each
route (default: no header; header: `Version: abcde`) benchmarks.httpload runs `--mode rr --streams N` in
its own process and, after a warm-up, the router process is recorded:

    py-spy record --native --rate 200 --duration SECONDS --format raw --pid ROUTER

The raw stacks go to benchmarks/results/profiles/router-{default,header}[-TAG].txt.gz, a flame graph to
router-*.svg (benchmarks.profile's renderer), and `uptime` plus the load's result to router[-TAG].json.
Categories are router-specific (ROUTER_CATEGORIES: the innermost frame that matches decides); epoll
samples (the loop waiting) are left out, so percentages are of busy samples.

Only our own processes, started here and stopped by pid; everything on 127.0.0.0/8.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.cases import mesh
from benchmarks.procs import PY, REPO, Procs, free_port
from benchmarks.profile import (
    COPIES,
    OUT,
    PYSPY,
    SYSCALL_FUNCS,
    UNRESOLVED_LIBC,
    UV_FILES,
    flamegraph,
    frame_parts,
    leaf,
    leaf_py,
    read_raw,
    short,
)

ROUTES = {"default": [], "header": ["Version: abcde"]}

_WRITE_CALLS = re.compile(r"^(__GI_)?_*(libc_)?(write|writev|send|sendto|sendmsg)(64|_nocancel)?$")
_READ_CALLS = re.compile(r"^(__GI_)?_*(libc_)?(read|readv|recv|recvfrom|recvmsg)(64|_nocancel)?$")
EPOLL = "epoll wait (left out)"


def _in(p: str, *names: str) -> bool:
    return any(p.endswith("shadow_image/router/" + n) or p == "shadow_image/router/" + n for n in names)


def _uv_write(f: str, p: str) -> bool:
    return ("uvloop" in p or p in UV_FILES) and any(w in f for w in ("write", "Write", "uv__try_write",
                                                                      "uv_try_write", "uv__write"))


ROUTER_CATEGORIES = [  # checked from the innermost frame outwards; the first frame that matches decides
    (EPOLL, lambda f, p: f.startswith("epoll_") and "wait" in f and (".so" in p or p in UV_FILES)),
    ("syscalls: socket writes", lambda f, p: bool(_WRITE_CALLS.match(f)) and (".so" in p or not p)),
    ("syscalls: socket reads", lambda f, p: bool(_READ_CALLS.match(f)) and (".so" in p or not p)),
    ("syscalls: other", lambda f, p: bool(SYSCALL_FUNCS.match(f)) and (".so" in p or not p)),
    ("gc", lambda f, p: p in ("gc.c",) or f.startswith("gc_collect")),
    ("malloc/free", lambda f, p: f in ("malloc", "free", "realloc", "calloc", "_int_malloc", "_int_free")
     or p == "obmalloc.c"),
    (COPIES, lambda f, p: "memcpy" in f or "memmove" in f),
    ("logging", lambda f, p: p.startswith("logging/")),
    ("httptools parse (llhttp, its C glue)", lambda f, p: "httptools" in p or "llhttp" in f or "llhttp" in p),
    ("head building / header filtering (http1.py)", lambda f, p: _in(p, "http1.py")),
    ("route lookup (table.py)", lambda f, p: _in(p, "table.py")),
    ("our callbacks: downstream.py", lambda f, p: _in(p, "downstream.py")),
    ("our callbacks: upstream.py", lambda f, p: _in(p, "upstream.py")),
    ("router other (sniff, h2, server)", lambda f, p: "shadow_image/" in p),
    ("uvloop transport writes (C, no syscall)", _uv_write),
    ("asyncio/uvloop event loop", lambda f, p: p.startswith("asyncio/") or "uvloop" in p or p in UV_FILES),
]
PY_INTERP = "Python interpreter (no frame attributable)"

INCLUSIVE = [  # samples with such a frame anywhere on the stack
    ("under feed_data (client or upstream parser, callbacks included)", "feed_data ("),
    ("under ClientConnection.data_received", "data_received (shadow_image/router/downstream.py"),
    ("under UpstreamConnection.data_received", "data_received (shadow_image/router/upstream.py"),
    ("under ClientConnection.on_headers_complete", "on_headers_complete (shadow_image/router/downstream.py"),
    ("under prepare_request", "prepare_request ("),
    ("under prepare_response", "prepare_response ("),
    ("under RouteTable.pick", "pick (shadow_image/router/table.py"),
    ("under ClientConnection.flush", "flush (shadow_image/router/downstream.py"),
]


def categorize(stack: str) -> str:
    frames = stack.split(";")
    if UNRESOLVED_LIBC.match(frames[-1]):
        parent = frame_parts(frames[-2])[0] if len(frames) > 1 else ""
        if parent in ("malloc", "free", "realloc", "calloc") or "alloc" in parent:
            return "malloc/free"
        if not UNRESOLVED_LIBC.match(frames[-2] if len(frames) > 1 else ""):
            return COPIES
    for frame in reversed(frames):
        func, path = frame_parts(frame)
        path = short(f"x ({path})")[3:-1] if path else path
        for cat, test in ROUTER_CATEGORIES:
            if test(func, path):
                return cat
    return "other Python" if any(frame_parts(f)[1].endswith(".py") for f in frames) else PY_INTERP


def summary(stacks: dict[str, int]) -> dict:
    epoll = sum(n for st, n in stacks.items() if categorize(st) == EPOLL)
    all_samples = sum(stacks.values()) or 1
    busy = {st: n for st, n in stacks.items() if categorize(st) != EPOLL}
    total = sum(busy.values()) or 1
    cats: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    pyleaves: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    for stack, n in busy.items():
        cats[categorize(stack)] += n
        leaves[leaf(stack)] += n
        pyleaves[leaf_py(stack)] += n
        for label, pat in INCLUSIVE:
            if pat in stack:
                incl[label] += n

    def pct(c: collections.Counter[str], k: int | None = None) -> list[tuple[str, float]]:
        return [(name, round(100 * v / total, 1)) for name, v in c.most_common(k)]

    return {"samples": total, "categories": pct(cats), "leaves": pct(leaves, 12), "py_leaves": pct(pyleaves, 12),
            "inclusive": pct(incl), "epoll_pct": round(100 * epoll / all_samples, 1)}


# -- recording --------------------------------------------------------------------------------------

@dataclass
class _Ctx:  # what mesh.start_nginx / start_router use of the harness's Context
    workdir: Path
    procs: Procs


def cpu_split(pid: int, seconds: float) -> tuple[float, float]:
    """The process's user and system CPU over `seconds`, in % of one CPU (before py-spy attaches)."""
    def times() -> tuple[int, int]:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]), int(fields[12])

    (u0, s0), t0 = times(), time.monotonic()
    time.sleep(seconds)
    (u1, s1), t1 = times(), time.monotonic()
    hz = os.sysconf("SC_CLK_TCK")
    return round(100 * (u1 - u0) / hz / (t1 - t0), 1), round(100 * (s1 - s0) / hz / (t1 - t0), 1)


def record(seconds: float, clients: int, tag: str) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="ktprofile-router-"))
    ctx = _Ctx(workdir, Procs(workdir))
    suffix = f"-{tag}" if tag else ""
    meta: dict = {"seconds": seconds, "clients": clients, "runs": {}}
    try:
        op = free_port(mesh.STUNTMAN_HOST)
        mesh.start_nginx(ctx, "origin", 1, mesh.render_origin(
            op, {mesh.STUNTMAN_HOST: b"S" * mesh.BODY_LEN, mesh.MESH_HOST: b"M" * mesh.BODY_LEN}),
            (mesh.MESH_HOST, op))
        router = mesh.start_router(ctx, free_port(), op)
        warm = 3.0
        for route, headers in ROUTES.items():
            argv = [PY, "-m", "benchmarks.httpload", "--target", f"127.0.0.1:{router.port}", "--mode", "rr",
                    "--streams", str(clients), "--duration", str(seconds + warm + 6), "--warmup", str(warm)]
            for h in headers:
                argv += ["--header", h]
            load = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
            time.sleep(warm)
            before = Path("/proc/loadavg").read_text().strip()
            split = cpu_split(router.proc.pid, 3.0)
            raw = OUT / f"router-{route}{suffix}.txt"
            spy = subprocess.run([PYSPY, "record", "--native", "--rate", "200", "--duration", str(int(seconds)),
                                  "--format", "raw", "-o", str(raw), "--pid", str(router.proc.pid)],
                                 capture_output=True, text=True, timeout=seconds + 120)
            out, err = load.communicate(timeout=120)
            result = json.loads(out.strip().splitlines()[-1]) if load.returncode == 0 else {"error": err[-400:]}
            stacks = read_raw(raw.read_text())
            raw.with_suffix(".txt.gz").write_bytes(gzip.compress(raw.read_bytes(), 9, mtime=0))
            raw.unlink()
            title = (f"mesh router, {route} route, {clients} keep-alive clients (py-spy --native, 200 Hz, "
                     f"{seconds:.0f} s; loadavg {before})")
            (OUT / f"router-{route}{suffix}.svg").write_text(flamegraph(stacks, title))
            meta["runs"][route] = {"loadavg_before": before, "load": " ".join(argv[1:]), "result": result,
                                   "cpu_user_system_pct_unprofiled_3s": split,
                                   "samples": sum(stacks.values()),
                                   "py_spy": (spy.stdout + spy.stderr).strip().splitlines()[-2:]}
        (OUT / f"router{suffix}.json").write_text(json.dumps(meta, indent=1) + "\n")
        return meta
    finally:
        ctx.procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


def report(tags: list[str]) -> str:
    """One table: categories (rows) by route and tag (columns), then inclusive shares and top leaves."""
    cols: list[tuple[str, dict]] = []
    for tag in tags:
        suffix = f"-{tag}" if tag else ""
        for route in ROUTES:
            raw = OUT / f"router-{route}{suffix}.txt.gz"
            if raw.exists():
                cols.append((f"{route}{' ' + tag if tag else ''}",
                             summary(read_raw(gzip.decompress(raw.read_bytes()).decode()))))
    if not cols:
        return "(no recordings)"
    cats = sorted({c for _, s in cols for c, _ in s["categories"]},
                  key=lambda c: -sum(dict(s["categories"]).get(c, 0) for _, s in cols))
    lines = ["| category (innermost matching frame) | " + " | ".join(
        f"{name}: % of {s['samples']} busy samples" for name, s in cols) + " |", "|---|" + "---:|" * len(cols)]
    for c in cats:
        lines.append(f"| {c} | " + " | ".join(f"{dict(s['categories']).get(c, 0):.1f}" for _, s in cols) + " |")
    lines.append("| *(left out: epoll wait, % of all samples)* | " + " | ".join(
        f"*{s['epoll_pct']:.1f}*" for _, s in cols) + " |")
    for label, _ in INCLUSIVE:
        lines.append(f"| *{label}* (inclusive) | " + " | ".join(
            f"*{dict(s['inclusive']).get(label, 0):.1f}*" for _, s in cols) + " |")
    lines.append("")
    for name, s in cols:
        lines.append(f"Top innermost Python frames, {name}: " + "; ".join(
            f"`{n}` {v}%" for n, v in s["py_leaves"]))
        lines.append("")
        lines.append(f"Top leaf frames, {name}: " + "; ".join(f"`{n}` {v}%" for n, v in s["leaves"]))
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_router")
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--tag", action="append", default=[],
                   help="suffix of the recording's files (before, after, ...); several with --report")
    p.add_argument("--report", action="store_true")
    args = p.parse_args()
    if args.report:
        print(report(args.tag or [""]))
        return
    if not Path(PYSPY).exists():
        raise SystemExit(f"{PYSPY} missing: pip install py-spy")
    tag = args.tag[0] if args.tag else ""
    OUT.mkdir(parents=True, exist_ok=True)
    print(json.dumps(record(args.seconds, args.clients, tag), indent=1))
    print(report([tag]))


if __name__ == "__main__":
    sys.exit(main())
