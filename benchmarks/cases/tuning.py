"""Tuning study: the ktproxy SOCKS5 path with one knob changed at a time, each against the shipped
baseline measured in the same run (fresh shadow + data plane per step, interleaved per repetition).
"""

from __future__ import annotations

from benchmarks.cases.common import cpu_seconds, keys_fixture, run_load, target_fixture
from benchmarks.harness import Context, case
from benchmarks.procs import Tuning, start_ktproxy
from ktproxy.proxy import relay
from ktproxy.tunnel import session

KB = 1024


def steps(ctx: Context) -> list[tuple[str, Tuning]]:
    s: list[tuple[str, Tuning]] = [
        ("baseline (shipped)", Tuning()),
        ("uvloop off", Tuning(uvloop=False)),
    ]
    if ctx.quick:
        return s
    s += [
        ("cipher chacha20-poly1305", Tuning(cipher="chacha20-poly1305@openssh.com")),
        ("window 2 MB", Tuning(window=2 * 2**20)),
        ("window 32 MB", Tuning(window=32 * 2**20)),
        ("packet 32 KB", Tuning(pktsize=32 * KB)),
        ("packet 256 KB", Tuning(pktsize=256 * KB)),
        ("read chunk 64 KB", Tuning(chunk=64 * KB)),
        ("read chunk 1 MB", Tuning(chunk=2**20)),
        ("TCP_NODELAY off (proxy sockets)", Tuning(nodelay=False)),
        ("Protocol-level relay (benchmarks/fastpath.py)", Tuning(fastpath=True)),
        ("asyncssh default: empty SSH_MSG_IGNORE before every packet", Tuning(asyncssh_ignore=True)),
        ("asyncssh default: receive buffer re-sliced after every packet", Tuning(asyncssh_recv=True)),
    ]
    return s


METRICS = [
    ("download, 1 stream", "MB/s", "higher"),
    ("download, 1 stream: proxy CPU", "CPU-s/GB", "lower"),
    ("download, 64 streams", "MB/s", "higher"),
    ("request/response, 1 client: p99", "µs", "lower"),
    ("request/response, 100 clients: rate", "requests/s", "higher"),
]


@case("tuning", "Tuning study: one knob at a time against the shipped settings (ktproxy SOCKS5)")
def tuning(ctx: Context) -> None:
    target = target_fixture(ctx)
    keys = keys_fixture(ctx)
    if ctx.quick:
        single, per, dur, warm = 16 * 2**20, 2**19, 0.3, 0.1
    else:
        single, per, dur, warm = 256 * 2**20, 2 * 2**20, 1.0, 0.3
    plan = steps(ctx)
    for rep in ctx.reps():
        # Rotate the order each repetition so no step always runs first (or right after another case).
        shift = rep * max(1, len(plan) // ctx.repeat)
        for label, t in plan[shift % len(plan):] + plan[:shift % len(plan)]:
            kt = start_ktproxy(ctx.procs, keys, t)
            try:
                via = f"socks5:127.0.0.1:{kt.proxy_port}"
                pids = [kt.dataplane.pid, kt.shadow.pid]
                before = cpu_seconds(pids)
                r = run_load(ctx, via, target, "down", nbytes=single)
                ctx.add(METRICS[0][0], label, "MB/s", r["mbps"])
                ctx.add(METRICS[1][0], label, "CPU-s/GB", (cpu_seconds(pids) - before) / (r["bytes"] / 1e9), "lower")
                r = run_load(ctx, via, target, "down", streams=64, nbytes=per)
                ctx.add(METRICS[2][0], label, "MB/s", r["mbps"])
                r = run_load(ctx, via, target, "rr", streams=1, duration=dur, warmup=warm)
                ctx.add(METRICS[3][0], label, "µs", r["p99_us"], "lower")
                r = run_load(ctx, via, target, "rr", streams=100, duration=dur, warmup=warm)
                ctx.add(METRICS[4][0], label, "requests/s", r["rps"])
            finally:
                ctx.procs.stop(kt.dataplane)
                ctx.procs.stop(kt.shadow)
    base = plan[0][0]
    rows = []
    for label, _ in plan:
        cells = [label]
        for metric, _unit, _better in METRICS:
            row, ref = ctx.row(metric, label), ctx.row(metric, base)
            if row is None or ref is None:
                cells.append("-")
                continue
            cell = f"{row.median:,.0f}" if row.median >= 10 else f"{row.median:.2f}"
            if label != base and ref.median:
                cell += f" ({(row.median / ref.median - 1) * 100:+.0f}%)"
            cells.append(cell)
        rows.append(cells)
    ctx.table("Before/after (median; change against the baseline measured in the same run)",
              ["step", *[f"{m} ({u})" for m, u, _ in METRICS]], rows)
    ctx.note(f"Shipped: WINDOW {session.WINDOW // 2**20} MB, MAX_PKTSIZE {session.MAX_PKTSIZE // KB} KB, "
             f"relay CHUNK {relay.CHUNK // KB} KB, ciphers {', '.join(session.CIPHERS[:2])}, uvloop on, "
             f"TCP_NODELAY on the proxy's sockets, asyncssh's empty SSH_MSG_IGNORE before every packet dropped for "
             f"non-CBC ciphers (ktwire/sshwire.py; the 'asyncssh default' step keeps it, on both ends: "
             f"its change against the baseline is what dropping it gains, reversed), asyncssh's packet parser fed one "
             f"packet at a time (the 'receive buffer' step is asyncssh's own path, on both ends). "
             f"Single stream {single // 2**20} MiB, 64 x {per / 2**20:g} MiB; "
             f"request/response {dur:g} s. Window and packet sizes apply to both SSH ends; uvloop off applies to "
             f"both ktproxy processes (the load client and target keep uvloop). The step order rotates between "
             f"repetitions. A step whose min-max range overlaps the baseline's is not a measured change.")
