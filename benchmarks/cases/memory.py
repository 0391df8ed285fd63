"""Memory: RSS of the ktproxy data plane idle and with 1,000 proxied connections open (OpenSSH's ssh -D
and the shadow server alongside, for scale).
"""

from __future__ import annotations

import json
import subprocess
import time

from benchmarks import yardsticks
from benchmarks.cases.common import KT_SOCKS, OPENSSH, keys_fixture, target_fixture
from benchmarks.harness import Context, case
from benchmarks.procs import PY, REPO, Skip, Tuning, rss_kb, session_pids, start_ktproxy, start_openssh


def hold(ctx: Context, via: str, target: str, n: int, measure) -> dict:
    """Open n echo connections through `via`, call measure() while they are open, close them."""
    proc = subprocess.Popen([PY, "-m", "benchmarks.load", "--via", via, "--target", target, "--mode", "hold",
                             "--streams", str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"hold client failed: {proc.stderr.read()[-600:]}")
        info = json.loads(line)
        time.sleep(0.3)  # let the proxy settle (buffers allocated, tasks parked)
        measure()
        proc.stdin.close()
        proc.wait(60)
        return info
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@case("memory", "Memory: data plane RSS idle and with 1,000 proxied connections open")
def memory(ctx: Context) -> None:
    n = 100 if ctx.quick else 1000
    target = target_fixture(ctx)
    keys = keys_fixture(ctx)
    mb = 1024.0
    for _ in ctx.reps():
        # Fresh processes each time: "idle" means just connected, not after earlier connections grew heaps.
        kt = start_ktproxy(ctx.procs, keys, Tuning())
        try:
            ossh = start_openssh(ctx.procs, keys)
        except Skip as exc:
            ossh = None
            if not ctx.current.notes:
                ctx.yardstick_missing(yardsticks.OPENSSH, str(exc))
        time.sleep(0.5)
        sides = [(KT_SOCKS, f"socks5:127.0.0.1:{kt.proxy_port}", lambda kt=kt: [kt.dataplane.pid])]
        if ossh is not None:
            sides.append((OPENSSH, f"socks5:127.0.0.1:{ossh.socks_port}", lambda o=ossh: [o.client.pid]))
        for name, via, pids in sides:
            ctx.add("client-side process RSS, idle", name, "MB", sum(rss_kb(p) for p in pids()) / mb, "lower")
            if name == KT_SOCKS:
                ctx.add("shadow server RSS, idle", name, "MB", rss_kb(kt.shadow.pid) / mb, "lower")

            def measure(name=name, pids=pids, kt=kt, ossh=ossh) -> None:
                ctx.add(f"client-side process RSS, {n} connections open", name, "MB",
                        sum(rss_kb(p) for p in pids()) / mb, "lower")
                if name == KT_SOCKS:
                    ctx.add(f"shadow server RSS, {n} connections open", name, "MB",
                            rss_kb(kt.shadow.pid) / mb, "lower")
                elif ossh is not None:
                    ctx.add(f"sshd session RSS, {n} connections open", name, "MB",
                            sum(rss_kb(p) for p in session_pids(ossh)) / mb, "lower")

            info = hold(ctx, via, target, n, measure)
            ctx.add(f"time to open {n} connections", name, "s", info["open_seconds"], "lower")
            time.sleep(0.3)
            ctx.add("client-side process RSS, after they closed", name, "MB",
                    sum(rss_kb(p) for p in pids()) / mb, "lower")
        for proc in (kt.dataplane, kt.shadow, *((ossh.client, ossh.sshd) if ossh else ())):
            ctx.procs.stop(proc)
    row = ctx.row(f"client-side process RSS, {n} connections open", KT_SOCKS)
    if row and not ctx.quick:
        ctx.note(f"Goal: {n} open connections under 150 MB RSS: ktproxy data plane {row.median:.1f} MB: "
                 f"{'met' if row.median < 150 else 'NOT met'}")
    ctx.note("RSS from /proc/PID/status VmRSS. 'client-side process' is the ktproxy data plane (what ktctl "
             "connect runs) or OpenSSH's ssh -D client. Each connection is a SOCKS5 stream to an echo "
             "target, checked with one round trip before measuring.")
