"""Loopback data plane, no Kubernetes: ktproxy (SOCKS5 and HTTP CONNECT -> asyncssh -> shadow server ->
target) against OpenSSH `ssh -D` to our own sshd (same cipher) and against a direct connection.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

from benchmarks import yardsticks
from benchmarks.cases.common import (
    DIRECT,
    KT_SOCKS,
    MB,
    OPENSSH,
    LoopbackEnv,
    Yardstick,
    cpu_seconds,
    loopback_env,
    run_load,
)
from benchmarks.harness import Context, case
from benchmarks.procs import OPENSSH_CIPHER


def sizes(ctx: Context) -> dict[str, float]:
    if ctx.quick:
        s = dict(single=32 * 2**20, per_stream=1 * 2**20, duration=0.3, warmup=0.1)
    else:
        s = dict(single=2**30, per_stream=16 * 2**20, duration=1.5, warmup=0.3)
    # Longer request/response loads with quick bulk sizes (the A/B runs: CPU per request needs seconds of load).
    if seconds := os.environ.get("KTPROXY_BENCH_SECONDS"):
        s["duration"] = float(seconds)
    return s


def measure_all(ctx: Context, env: LoopbackEnv | Any, prefix: str = "", s: dict[str, float] | None = None,
                timeout: float = 300) -> None:
    """One repetition of every metric for every yardstick, interleaved so drift hits all alike.

    `env` is anything with `.target` and `.yardsticks()` (the loopback env, the cluster env); `s` the
    sizes (default: sizes(ctx)).
    """
    s = s or sizes(ctx)
    ys = env.yardsticks()
    failed: set[tuple[str, str]] = set()

    def load(y: Yardstick, what: str, mode: str, **kw: Any) -> dict | None:
        try:
            r = run_load(ctx, y.via, y.target or env.target, mode, timeout=timeout, **kw)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            if not y.tolerate_errors:
                raise
            if (y.name, what) not in failed:  # once per call of measure_all
                failed.add((y.name, what))
                ctx.note(f"{y.name}: {what} failed: {str(exc)[-300:]}")
            return None
        if r.get("errors") and y.tolerate_errors:
            ctx.note(f"{y.name}: {what}: {r['errors']} connection(s) failed and were retried")
        return r

    for y in ys:
        before, side_before = cpu_seconds(y.pids), cpu_seconds(y.side_pids)
        r = load(y, "download, 1 stream", "down", nbytes=int(s["single"]))
        if r is None:
            continue
        ctx.add(f"{prefix}download, 1 stream", y.name, "MB/s", r["mbps"])
        if y.pids:
            cost = (cpu_seconds(y.pids) - before) / (r["bytes"] / 1e9)
            ctx.add(f"{prefix}download, 1 stream: proxy CPU", y.name, "CPU-s/GB", cost, "lower")
        if y.side_pids:
            cost = (cpu_seconds(y.side_pids) - side_before) / (r["bytes"] / 1e9)
            ctx.add(f"{prefix}download, 1 stream: {y.side_label} CPU", y.name, "CPU-s/GB", cost, "lower")
    for y in ys:
        r = load(y, "upload, 1 stream", "up", nbytes=int(s["single"]))
        if r is not None:
            ctx.add(f"{prefix}upload, 1 stream", y.name, "MB/s", r["mbps"])
    for y in ys:
        r = load(y, "download, 64 streams", "down", streams=64, nbytes=int(s["per_stream"]))
        if r is not None:
            ctx.add(f"{prefix}download, 64 streams (aggregate)", y.name, "MB/s", r["mbps"])
    for clients in (1, 100):
        for mode, label, rate in (("rr", "request/response (keep-alive)", "requests/s"),
                                  ("conn", "new connection + request", "connections/s")):
            for y in ys:
                base = f"{prefix}{label}, {clients} client{'s' if clients > 1 else ''}"
                before = cpu_seconds(y.pids)
                r = load(y, base, mode, streams=clients, duration=s["duration"], warmup=s["warmup"])
                if r is None:
                    continue
                if y.pids and r.get("rps"):
                    # CPU over the whole load (set-up and warm-up too) per request at the measured rate:
                    # the same approximation for every yardstick, and robust to a busy machine.
                    served = r["rps"] * (s["duration"] + s["warmup"])
                    ctx.add(f"{base}: proxy CPU", y.name, "µs/request",
                            (cpu_seconds(y.pids) - before) / served * 1e6, "lower")
                ctx.add(f"{base}: p50", y.name, "µs", r["p50_us"], "lower")
                ctx.add(f"{base}: p99", y.name, "µs", r["p99_us"], "lower")
                ctx.add(f"{base}: rate", y.name, rate, r["rps"])


def goals(ctx: Context) -> None:
    """The issue's goals, as ratios against OpenSSH measured in this same run."""

    def med(metric: str, y: str) -> float | None:
        row = ctx.row(metric, y)
        return row.median if row else None

    lines = []
    one, oss = med("download, 1 stream", KT_SOCKS), med("download, 1 stream", OPENSSH)
    many, oss_many = med("download, 64 streams (aggregate)", KT_SOCKS), med("download, 64 streams (aggregate)",
                                                                             OPENSSH)
    if one and oss:
        lines.append(f"single-stream download: ktproxy {one:.0f} MB/s = {one / oss:.2f}x OpenSSH "
                     f"({oss:.0f} MB/s); goal >= 1.0x: {'met' if one >= oss else 'NOT met'}")
    if many and oss_many:
        lines.append(f"64-stream aggregate: {many / oss_many:.2f}x OpenSSH; goal >= 0.8x: "
                     f"{'met' if many >= 0.8 * oss_many else 'NOT met'}")
    for clients in ("1 client", "100 clients"):
        metric = f"request/response (keep-alive), {clients}: p99"
        kt, os_, d = med(metric, KT_SOCKS), med(metric, OPENSSH), med(metric, DIRECT)
        if kt and os_ and d is not None:
            added_kt, added_os = kt - d, os_ - d
            ratio = added_kt / added_os if added_os > 0 else float("inf")
            lines.append(f"p99 added latency, {clients}: ktproxy +{added_kt:.0f} µs vs OpenSSH +{added_os:.0f} µs "
                         f"= {ratio:.2f}x; goal <= 1.5x: {'met' if ratio <= 1.5 else 'NOT met'}")
    for line in lines:
        ctx.note("Goal: " + line)
    ab(ctx)


AB_METRICS = [
    ("request/response (keep-alive), 100 clients: proxy CPU", "lower"),
    ("new connection + request, 100 clients: proxy CPU", "lower"),
    ("request/response (keep-alive), 100 clients: rate", "higher"),
    ("new connection + request, 100 clients: rate", "higher"),
    ("request/response (keep-alive), 1 client: p99", "lower"),
    ("download, 1 stream", "higher"),
    ("download, 1 stream: proxy CPU", "lower"),
]


def ab(ctx: Context) -> None:
    """KTPROXY_BENCH_WITHOUT's variants: each metric as a ratio to OpenSSH, shipped vs without the patch."""
    assert ctx.current is not None
    for y in sorted({r.yardstick for r in ctx.current.rows if r.yardstick.startswith(KT_SOCKS + " without ")}):
        cells = []
        for metric, _better in AB_METRICS:
            kt, without, oss = ctx.row(metric, KT_SOCKS), ctx.row(metric, y), ctx.row(metric, OPENSSH)
            if kt and without and oss and oss.median:
                cells.append(f"{metric}: {without.median / oss.median:.2f}x -> {kt.median / oss.median:.2f}x "
                             f"OpenSSH ({(kt.median / without.median - 1) * 100:+.0f}%)")
        if cells:
            ctx.note(f"A/B, '{y}' -> shipped (median, each as a ratio to OpenSSH in this run): " + "; ".join(cells))


@case("loopback", "Loopback data plane: ktproxy vs OpenSSH ssh -D vs direct (no Kubernetes)")
def loopback(ctx: Context) -> None:
    env = loopback_env(ctx)
    if env.openssh is None:
        ctx.yardstick_missing(yardsticks.OPENSSH, env.openssh_skip)
    for _ in ctx.reps():
        measure_all(ctx, env)
    s = sizes(ctx)
    ctx.note(f"Target: Python/uvloop server on 127.0.0.2; load client: a separate Python/uvloop process "
             f"(the `direct` rows are its ceiling). Cipher {OPENSSH_CIPHER} on both SSH yardsticks. "
             f"Bulk: {s['single'] / MB:.0f} MB per single stream, 64 x {s['per_stream'] / MB:.1f} MB aggregate. "
             f"Request/response: HTTP/1.1 GET with a 128-byte body, closed loop, {s['duration']:.1f} s "
             f"after {s['warmup']:.1f} s warm-up. 'proxy CPU' = user+system CPU of the proxy's own processes "
             f"(ktproxy: data plane + shadow server; OpenSSH: ssh + its sshd session) per GB moved: it does "
             f"not depend on what else the machine is doing.")
    goals(ctx)
