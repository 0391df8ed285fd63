"""Profiles of the loopback cases: py-spy on both ktproxy processes under load, plus syscall counts.

    python -m benchmarks.profile --case rr100 [conn100 rr1 down1 down64 dns] [--seconds 20] [--strace]
    python -m benchmarks.profile --report          # PROFILE tables from the committed raw stacks

For each case it starts the loopback set-up (benchmarks.target on 127.0.0.2, the shadow server and the
data plane as in the `loopback` case: uvloop, aes128-gcm, the wire patches; for `dns` the data plane's
DNS stub too, with a dnslib DNS-over-TCP server on 127.0.0.3 as the "cluster DNS" behind the tunnel),
runs the load client in its own process, and after a warm-up records both ktproxy processes at once:

    py-spy record --native --rate 200 --duration SECONDS --format raw --pid PID

The raw (collapsed) stacks go to benchmarks/results/profiles/CASE-{dataplane,shadow}.txt.gz, a flame
graph rendered from them to CASE-*.svg (own renderer, below: one recording gives both the graph and the
category table), and `uptime` before and after to CASE.json with the load's result. py-spy drops idle
samples (threads waiting in epoll), so the percentages are of busy samples: read proportions, not times
(the machine's 2 CPUs are shared with the load client and whatever else runs).

`--strace` runs each request case again for a few seconds with `strace -f -yy` attached to both
processes from before the first request to after the last (warm-up 0: every request counted) and
writes syscalls per request, and writes on the SSH socket per request (every SSH packet is one write
unless something coalesces them), to CASE-strace.json. strace slows the processes many times: the
counts per request hold, the rates do not.

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
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from benchmarks.procs import PY, REPO, Procs, make_keys, start_ktproxy, start_target, wait_for

OUT = REPO / "benchmarks" / "results" / "profiles"
PYSPY = str(Path(PY).parent / "py-spy")
HOT = ["svc-a.default.svc.cluster.local", "svc-b.default.svc.cluster.local", "svc-c.team.svc.cluster.local"]

# name -> (load module, its args; "{via}", "{target}", "{dns}" filled in; True when it ends by itself)
CASES: dict[str, tuple[str, list[str], bool]] = {
    "rr100": ("benchmarks.load", ["--mode", "rr", "--streams", "100"], True),
    "conn100": ("benchmarks.load", ["--mode", "conn", "--streams", "100"], True),
    "rr1": ("benchmarks.load", ["--mode", "rr", "--streams", "1"], True),
    "down1": ("benchmarks.load", ["--mode", "down", "--streams", "1", "--bytes", str(64 * 2**30)], False),
    "down64": ("benchmarks.load", ["--mode", "down", "--streams", "64", "--bytes", str(1 * 2**30)], False),
    "dns": ("benchmarks.dnsload", ["--names", "cached", "--clients", "50", "--hot", ",".join(HOT)], True),
}
TITLES = {
    "rr100": "request/response (keep-alive), 100 clients",
    "conn100": "new connection + request, 100 clients",
    "rr1": "request/response (keep-alive), 1 client",
    "down1": "download, 1 stream",
    "down64": "download, 64 streams",
    "dns": "DNS stub, cached names, 50 clients",
}


# -- the set-up ------------------------------------------------------------------------------------

def dns_server(port_file: str) -> None:
    """A tiny authoritative DNS-over-TCP server (dnslib's, threaded): an A record for any name."""
    from dnslib import QTYPE, RR, A
    from dnslib.server import BaseResolver, DNSServer

    class Any(BaseResolver):
        def resolve(self, request, handler):
            reply = request.reply()
            if request.q.qtype in (QTYPE.A, QTYPE.ANY):
                reply.add_answer(RR(request.q.qname, QTYPE.A, ttl=300, rdata=A("10.96.0.10")))
            return reply

    server = DNSServer(Any(), address="127.0.0.3", port=0, tcp=True)
    server.start_thread()
    Path(port_file).write_text(str(server.server.server_address[1]))
    while server.isAlive():
        time.sleep(1)


class Env:
    def __init__(self, dns: bool) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="ktprofile-"))
        self.procs = Procs(self.workdir)
        keys = make_keys(self.workdir)
        _, port = start_target(self.procs)
        self.target = f"127.0.0.2:{port}"
        extra: list[str] = []
        if dns:
            pf = self.workdir / "dns.port"
            proc = self.procs.spawn("dns", [PY, "-m", "benchmarks.profile", "--dns-server", str(pf)])
            wait_for(lambda: pf.exists() and pf.read_text() != "", 15, "DNS server", proc)
            extra = ["--dns-port", "0", "--cluster-dns", f"127.0.0.3:{pf.read_text()}"]
        self.kt = start_ktproxy(self.procs, keys, extra_dataplane=extra)
        self.via = f"socks5:127.0.0.1:{self.kt.proxy_port}"
        ready = next(self.workdir.glob("dataplane*.ready")).read_text().split()
        self.dns = f"127.0.0.1:{ready[1]}"
        self.ssh_port = int(next(self.workdir.glob("shadow*.port")).read_text())
        self.pids = {"dataplane": self.kt.dataplane.pid, "shadow": self.kt.shadow.pid}

    def load_argv(self, name: str, seconds: float, warmup: float) -> tuple[list[str], bool]:
        module, args, ends = CASES[name]
        argv = [PY, "-m", module, *args]
        if module == "benchmarks.dnsload":
            argv += ["--server", self.dns]
        else:
            argv += ["--via", self.via, "--target", self.target]
        if ends:
            argv += ["--duration", str(seconds), "--warmup", str(warmup)]
        return argv, ends

    def close(self) -> None:
        self.procs.stop_all()
        shutil.rmtree(self.workdir, ignore_errors=True)


def uptime() -> str:
    return Path("/proc/loadavg").read_text().strip()


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def finish_load(load: subprocess.Popen, ends: bool) -> dict:
    if ends:
        out, err = load.communicate(timeout=120)
    else:
        stop(load)
        out, err = load.communicate()
        return {"stopped": "by the profiler, after the recording"}
    lines = (out or "").strip().splitlines()
    if load.returncode != 0 or not lines:
        return {"error": (err or "")[-400:]}
    return json.loads(lines[-1])


# -- recording -------------------------------------------------------------------------------------

def record(name: str, seconds: float) -> None:
    env = Env(dns=name == "dns")
    try:
        warm = 3.0
        argv, ends = env.load_argv(name, seconds + warm + 2, warm)
        load = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        time.sleep(warm)
        before = uptime()
        spies = {}
        for proc, pid in env.pids.items():
            raw = OUT / f"{name}-{proc}.txt"
            spies[proc] = (raw, subprocess.Popen(
                [PYSPY, "record", "--native", "--rate", "200", "--duration", str(int(seconds)), "--format", "raw",
                 "-o", str(raw), "--pid", str(pid)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        logs = {proc: p.communicate(timeout=seconds + 120)[0] for proc, (_, p) in spies.items()}
        after = uptime()
        result = finish_load(load, ends)
        meta = {"case": name, "title": TITLES[name], "load": " ".join(argv[1:]).replace(str(REPO) + "/", ""),
                "loadavg_before": before, "loadavg_after": after, "result": result, "seconds": seconds,
                "py_spy": {proc: log.strip().splitlines()[-2:] for proc, log in logs.items()}}
        for proc, (raw, _) in spies.items():
            stacks = read_raw(raw.read_text())
            raw.with_suffix(".txt.gz").write_bytes(gzip.compress(raw.read_bytes(), 9, mtime=0))
            raw.unlink()
            (OUT / f"{name}-{proc}.svg").write_text(flamegraph(
                stacks, f"{TITLES[name]}: {proc} (py-spy --native, 200 Hz, {seconds:.0f} s; loadavg {before})"))
            meta[f"samples_{proc}"] = sum(stacks.values())
        (OUT / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
        print(json.dumps(meta, indent=1))
    finally:
        env.close()


def strace(name: str, seconds: float) -> None:
    if not shutil.which("strace"):
        raise SystemExit("strace not installed (Debian: strace)")
    env = Env(dns=name == "dns")
    try:
        traces, tracers = {}, {}
        for proc, pid in env.pids.items():
            traces[proc] = env.workdir / f"{proc}.strace"
            tracers[proc] = subprocess.Popen(["strace", "-f", "-qq", "-yy", "-s", "0", "-o", str(traces[proc]),
                                              "-p", str(pid)], stderr=subprocess.DEVNULL)
        time.sleep(1.5)  # attached (strace has no "ready" signal; idle processes make no syscalls)
        argv, _ = env.load_argv(name, seconds, 0.0)
        load = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=seconds + 120)
        time.sleep(0.5)
        for p in tracers.values():
            stop(p, signal.SIGINT)
        result = json.loads(load.stdout.strip().splitlines()[-1])
        n = result.get("requests") or result.get("queries")
        lines = {proc: path.read_text(errors="replace").splitlines() for proc, path in traces.items()}
        if CASES[name][1][1] == "conn":
            # connections opened but not finished inside the window would count against too few requests:
            # per accepted connection instead (every one of them carries one request)
            n = sum(1 for line in lines["dataplane"] if _CALL.match(line) and _CALL.match(line).group(2) == "accept4"
                    and "= -1" not in line)
        out = {"case": name, "title": TITLES[name], "requests": n, "result": result, "ssh_port": env.ssh_port}
        for proc in traces:
            out[proc] = count_syscalls(lines[proc], env.ssh_port, n)
        (OUT / f"{name}-strace.json").write_text(json.dumps(out, indent=1) + "\n")
        print(json.dumps(out, indent=1))
    finally:
        env.close()


_CALL = re.compile(r"^(\d+\s+)?(?:<\.\.\. )?([a-z_0-9]+)\(")
_WRITES = {"write", "writev", "sendto", "sendmsg"}
_READS = {"read", "readv", "recvfrom", "recvmsg"}


def count_syscalls(lines: Iterable[str], ssh_port: int, n: int) -> dict:
    calls: collections.Counter[str] = collections.Counter()
    ssh_w = ssh_r = 0
    ssh = re.compile(rf"TCP:\[[^\]]*:{ssh_port}[-\]]")
    ssh2 = re.compile(rf"->[0-9.]+:{ssh_port}\]")
    for line in lines:
        if "resumed>" in line:
            continue
        m = _CALL.match(line)
        if not m:
            continue
        call = m.group(2)
        calls[call] += 1
        if call in _WRITES or call in _READS:
            fd = line.split("(", 1)[1].split(",", 1)[0]
            if ssh.search(fd) or ssh2.search(fd):
                if call in _WRITES:
                    ssh_w += 1
                else:
                    ssh_r += 1
    total = sum(calls.values())
    return {"syscalls_per_request": round(total / n, 2),
            "ssh_socket_writes_per_request": round(ssh_w / n, 2),
            "ssh_socket_reads_per_request": round(ssh_r / n, 2),
            "per_request": {k: round(v / n, 2) for k, v in calls.most_common(14)}}


# -- collapsed stacks: categories and flame graphs ---------------------------------------------------

def read_raw(text: str) -> dict[str, int]:
    stacks: dict[str, int] = collections.Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[stack] += int(count)
    return stacks


def frame_parts(frame: str) -> tuple[str, str]:
    """'func (path:line)' -> (func, path); native frames 'func (libfoo.so)' -> (func, libfoo.so)."""
    m = re.match(r"^(.*) \(([^()]*)\)$", frame)
    if not m:
        return frame, ""
    path = m.group(2)
    path = re.sub(r":\d+$", "", path)
    return m.group(1), path


def short(frame: str) -> str:
    func, path = frame_parts(frame)
    for cut in ("site-packages/", "lib/python3", str(REPO) + "/"):
        if cut in path:
            path = path.split(cut, 1)[1]
            break
    path = re.sub(r"^\.\d+/", "", path)
    return f"{func} ({path})" if path else func


SYSCALL_FUNCS = re.compile(
    r"^(__GI_)?_*(libc_)?(write|writev|read|readv|send|sendto|sendmsg|recv|recvfrom|recvmsg|epoll_wait|epoll_ctl|"
    r"epoll_pwait|close|shutdown|connect|accept4?|socket|setsockopt|getsockopt|getsockname|getpeername|getpid|"
    r"getrandom|clock_gettime|futex|ioctl|fcntl|syscall|poll|select|pipe2?|eventfd|mmap|munmap|madvise|brk|"
    r"new_sock_fd|__internal_syscall_cancel|internal_syscall_cancel)(64|_nocancel)?$")
UV_FILES = {"loop.c", "core.c", "stream.c", "linux.c", "loop-watcher.c", "queue.h", "uv-common.c", "tcp.c",
            "timer.c", "heap-inl.h", "async.c", "signal.c", "udp.c", "poll.c", "handle.c", "process.c", "pipe.c",
            "_asynciomodule.c", "_asynciomodule.c.h"}
UNRESOLVED_LIBC = re.compile(r"^0x[0-9a-f]+ \(libc\.so")
COPIES = "libc, unresolved leaf under Python/uvloop/crypto (copies: memcpy/memmove)"


EPOLL = "epoll_pwait: the loop polling (partly idle waiting)"
CATEGORIES = [  # checked from the innermost frame outwards; the first frame that matches decides
    (EPOLL, lambda f, p: f.startswith("epoll_") and "wait" in f and (".so" in p or p in UV_FILES)),
    ("kernel syscalls (libc wrappers)", lambda f, p: bool(SYSCALL_FUNCS.match(f)) and (".so" in p or not p)),
    ("cipher/MAC (cryptography, OpenSSL)", lambda f, p: "libcrypto" in p or "libssl" in p or "cryptography" in p
     or "_rust.abi3" in p or ("crypto/" in p and "asyncssh" in p)),
    ("gc", lambda f, p: p in ("gc.c", "gc_free_threading.c") or f.startswith("gc_collect")),
    (COPIES, lambda f, p: "memcpy" in f or "memmove" in f),
    ("malloc/free", lambda f, p: f in ("malloc", "free", "realloc", "calloc", "_int_malloc", "_int_free")
     or p == "obmalloc.c"),
    ("logging", lambda f, p: p.startswith("logging/") or p.endswith("asyncssh/logging.py")),
    ("SSH packet layer (asyncssh connection.py, packet.py)",
     lambda f, p: p.endswith(("asyncssh/connection.py", "asyncssh/packet.py"))),
    ("channel/window (asyncssh channel.py, stream.py)",
     lambda f, p: p.endswith(("asyncssh/channel.py", "asyncssh/stream.py"))),
    ("shadow's relay (asyncssh forward.py)", lambda f, p: p.endswith("asyncssh/forward.py")),
    ("asyncssh other", lambda f, p: p.startswith("asyncssh/") or "/asyncssh/" in p),
    ("our SSH wire patches (ktwire)", lambda f, p: p.startswith("ktwire/")),
    ("DNS: dnslib", lambda f, p: "dnslib/" in p),
    ("DNS: ktproxy/dns", lambda f, p: "ktproxy/dns/" in p),
    ("our relay (ktproxy/proxy, ktproxy/tunnel, shadow_image)",
     lambda f, p: p.startswith(("ktproxy/", "shadow_image/", "benchmarks/fastpath"))),
    ("asyncio/uvloop event loop and streams", lambda f, p: p.startswith("asyncio/") or "uvloop" in p
     or p in UV_FILES),
]
PY_INTERP = "Python interpreter (no Python frame attributable)"


def is_idle_thread(stack: str) -> bool:
    """A thread-pool worker blocked on its queue (py-spy --native does not see it as idle)."""
    return "_worker (concurrent/futures/thread.py" in stack and leaf_py(stack).startswith("_worker ")


def categorize(stack: str) -> str:
    frames = stack.split(";")
    if UNRESOLVED_LIBC.match(frames[-1]):
        # py-spy leaves libc's internal (non-exported) symbols unnamed: in these profiles they sit under
        # bytes slicing/joining and buffer appends (memcpy/memmove) or under malloc/free
        parent = frame_parts(frames[-2])[0] if len(frames) > 1 else ""
        if parent in ("malloc", "free", "realloc", "calloc") or "alloc" in parent:
            return "malloc/free"
        if not UNRESOLVED_LIBC.match(frames[-2] if len(frames) > 1 else ""):
            return COPIES
    for frame in reversed(frames):
        func, path = frame_parts(frame)
        for cat, test in CATEGORIES:
            if test(func, path):
                return cat
    return "other" if any(frame_parts(f)[1].endswith(".py") for f in frames) else PY_INTERP


INCLUSIVE = [  # samples with such a frame anywhere on the stack (time under it, callees included)
    ("under asyncssh (any)", "asyncssh/"),
    ("under asyncssh connection.py", "asyncssh/connection.py"),
    ("under asyncssh channel.py/stream.py", ("asyncssh/channel.py", "asyncssh/stream.py")),
    ("under ktproxy/proxy, dns, tunnel code", ("ktproxy/proxy/", "ktproxy/dns/", "ktproxy/tunnel/")),
    ("under asyncio streams.py", "asyncio/streams.py"),
    ("under SSHConnection._send (SSH socket write)", "SSHConnection._send (asyncssh/connection.py"),
    ("under gc", ("(gc.c", "gc_collect")),
    ("under dnslib", "dnslib/"),
]


def leaf(stack: str) -> str:
    return short(stack.rsplit(";", 1)[-1])


def leaf_py(stack: str) -> str:
    for frame in reversed(stack.split(";")):
        if frame_parts(frame)[1].endswith(".py"):
            return short(frame)
    return "(no Python frame)"


def summary(stacks: dict[str, int]) -> dict:
    idle = sum(n for st, n in stacks.items() if is_idle_thread(st))
    stacks = {st: n for st, n in stacks.items() if not is_idle_thread(st)}
    epoll = sum(n for st, n in stacks.items() if categorize(st) == EPOLL)
    all_samples = sum(stacks.values()) or 1
    stacks = {st: n for st, n in stacks.items() if categorize(st) != EPOLL}
    total = sum(stacks.values()) or 1
    sys_callers: collections.Counter[str] = collections.Counter()
    cats: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    pyleaves: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    for stack, n in stacks.items():
        cat = categorize(stack)
        cats[cat] += n
        if cat.startswith("kernel"):
            sys_callers[f"{frame_parts(stack.rsplit(';', 1)[-1])[0]} <- {leaf_py(stack)}"] += n
        leaves[leaf(stack)] += n
        pyleaves[leaf_py(stack)] += n
        for label, pat in INCLUSIVE:
            pats = pat if isinstance(pat, tuple) else (pat,)
            if any(p in stack for p in pats):
                incl[label] += n

    def pct(c: collections.Counter[str], k: int | None = None) -> list[tuple[str, float]]:
        return [(name, round(100 * v / total, 1)) for name, v in c.most_common(k)]

    return {"samples": total, "categories": pct(cats), "leaves": pct(leaves, 10), "py_leaves": pct(pyleaves, 10),
            "inclusive": pct(incl),
            "syscall_callers": pct(sys_callers, 6), "idle_thread_samples_dropped": idle,
            "epoll_pct_of_thread_samples": round(100 * epoll / all_samples, 1)}


def flamegraph(stacks: dict[str, int], title: str, width: int = 1200, min_frac: float = 0.001) -> str:
    """A static SVG flame graph (root at the bottom, widths = samples; hover shows the counts)."""
    tree: dict = {"n": 0, "c": {}}
    for stack, n in stacks.items():
        node = tree
        node["n"] += n
        for frame in stack.split(";"):
            node = node["c"].setdefault(short(frame), {"n": 0, "c": {}})
            node["n"] += n
    total = tree["n"] or 1
    rows: list[tuple[int, float, float, str, int]] = []

    def walk(node: dict, depth: int, x: float) -> int:
        deepest = depth
        for name, child in sorted(node["c"].items()):
            w = child["n"] / total
            if w >= min_frac:
                rows.append((depth, x, w, name, child["n"]))
                deepest = max(deepest, walk(child, depth + 1, x))
            x += w
        return deepest

    depth = walk(tree, 0, 0.0) + 1
    h = 16
    top = 40
    height = top + depth * h + 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" '
           f'font-size="11"><rect width="100%" height="100%" fill="#f8f8f0"/>'
           f'<text x="8" y="18" font-size="14">{esc(title)}</text>'
           f'<text x="8" y="34">{total} samples; frames under {min_frac:.1%} hidden; hover for counts</text>']
    for d, x, w, name, n in rows:
        y = height - 10 - (d + 1) * h
        px, pw = x * (width - 20) + 10, max(w * (width - 20) - 0.5, 0.5)
        out.append(f'<g><title>{esc(name)}: {n} ({100 * n / total:.2f}%)</title><rect x="{px:.1f}" y="{y}" '
                   f'width="{pw:.1f}" height="{h - 1}" fill="{color(name)}"/>')
        chars = int(pw / 6.6)
        if chars >= 3:
            label = name if len(name) <= chars else name[:chars - 2] + ".."
            out.append(f'<text x="{px + 2:.1f}" y="{y + 11}">{esc(label)}</text>')
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def color(name: str) -> str:
    _, path = frame_parts(name)
    if "asyncssh" in path:
        base = (230, 150, 60)
    elif "ktproxy" in path or "shadow_image" in path or "ktwire" in path:
        base = (90, 170, 90)
    elif "asyncio" in path or "uvloop" in path:
        base = (100, 150, 220)
    elif ".py" in path:
        base = (200, 200, 90)
    else:
        base = (220, 90, 80)
    j = hash(name) % 30
    return "rgb({},{},{})".format(*(min(255, c + j) for c in base))


# -- the report ---------------------------------------------------------------------------------------

def report(names: Iterable[str]) -> str:
    parts = []
    for name in names:
        meta_path = OUT / f"{name}.json"
        if not meta_path.exists():
            continue
        meta = json.loads(meta_path.read_text())
        parts.append(f"### {name}: {meta['title']}\n")
        parts.append(f"loadavg before/after: {meta['loadavg_before']} / {meta['loadavg_after']}; "
                     f"load: `{meta['load']}`; result: `{json.dumps(meta['result'])}`\n")
        sums = {}
        for proc in ("dataplane", "shadow"):
            raw = OUT / f"{name}-{proc}.txt.gz"
            if raw.exists():
                sums[proc] = summary(read_raw(gzip.decompress(raw.read_bytes()).decode()))
        procs = list(sums)
        cats = sorted({c for s in sums.values() for c, _ in s["categories"]},
                      key=lambda c: -sum(dict(s["categories"]).get(c, 0) for s in sums.values()))
        parts.append("| category (innermost matching frame) | " + " | ".join(
            f"{p} % of {sums[p]['samples']} busy samples" for p in procs) + " |")
        parts.append("|---|" + "---:|" * len(procs))
        for c in cats:
            parts.append(f"| {c} | " + " | ".join(f"{dict(sums[p]['categories']).get(c, 0):.1f}" for p in procs) + " |")
        parts.append("| *(left out: main thread in epoll_pwait, % of its samples)* | " + " | ".join(
            f"*{sums[p]['epoll_pct_of_thread_samples']:.1f}*" for p in procs) + " |")
        parts.append("| *(left out: idle thread-pool worker samples)* | " + " | ".join(
            f"*{sums[p]['idle_thread_samples_dropped']}*" for p in procs) + " |")
        for label, _ in INCLUSIVE:
            parts.append(f"| *{label}* (inclusive) | " + " | ".join(
                f"*{dict(sums[p]['inclusive']).get(label, 0):.1f}*" for p in procs) + " |")
        parts.append("")
        for p in procs:
            parts.append(f"Syscall samples by caller, {p}: " + "; ".join(
                f"`{n}` {v}%" for n, v in sums[p]["syscall_callers"]))
            parts.append("")
            parts.append(f"Top 10 leaf frames, {p}: " + "; ".join(f"`{n}` {v}%" for n, v in sums[p]["leaves"]))
            parts.append("")
            parts.append(f"Top 10 innermost Python frames, {p}: " + "; ".join(
                f"`{n}` {v}%" for n, v in sums[p]["py_leaves"]))
            parts.append("")
        st = OUT / f"{name}-strace.json"
        if st.exists():
            s = json.loads(st.read_text())
            for p in ("dataplane", "shadow"):
                d = s[p]
                parts.append(f"strace, {p}: {d['syscalls_per_request']} syscalls per request, SSH-socket writes "
                             f"{d['ssh_socket_writes_per_request']} / reads {d['ssh_socket_reads_per_request']} per "
                             f"request ({s['requests']} requests); " + ", ".join(
                                 f"{k} {v}" for k, v in d["per_request"].items()))
                parts.append("")
    return "\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile")
    p.add_argument("--case", nargs="+", default=[], choices=[*CASES, "all"])
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--strace", action="store_true", help="syscall counts instead of py-spy (request cases)")
    p.add_argument("--strace-seconds", type=float, default=4)
    p.add_argument("--report", action="store_true", help="print the PROFILE.md tables")
    p.add_argument("--dns-server", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.dns_server:
        dns_server(args.dns_server)
        return
    names = list(CASES) if "all" in args.case else args.case
    if args.report:
        print(report(names or CASES))
        return
    if not Path(PYSPY).exists() and not args.strace:
        raise SystemExit(f"{PYSPY} missing: pip install py-spy")
    OUT.mkdir(parents=True, exist_ok=True)
    for name in names:
        if args.strace:
            if CASES[name][2]:
                strace(name, args.strace_seconds)
        else:
            record(name, args.seconds)


if __name__ == "__main__":
    sys.exit(main())
