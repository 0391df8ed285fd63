"""Helpers the cases share: the loopback set-up and running the load client."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field

from benchmarks.harness import Context
from benchmarks.procs import (
    PY,
    REPO,
    KtProxy,
    OpenSSH,
    Skip,
    Tuning,
    make_keys,
    session_pids,
    start_asyncssh_socks,
    start_ktproxy,
    start_openssh,
    start_target,
)

MB = 1_000_000
DIRECT = "direct"
KT_SOCKS = "ktproxy SOCKS5"
KT_HTTP = "ktproxy HTTP CONNECT"
OPENSSH = "OpenSSH ssh -D"
ASYNCSSH = "asyncssh forward_socks (defaults)"


def run_load(ctx: Context, via: str, target: str, mode: str, *, streams: int = 1, nbytes: int = 0,
             duration: float = 0.0, warmup: float = 0.0, timeout: float = 300) -> dict:
    argv = [PY, "-m", "benchmarks.load", "--via", via, "--target", target, "--mode", mode,
            "--streams", str(streams)]
    if nbytes:
        argv += ["--bytes", str(nbytes)]
    if duration:
        argv += ["--duration", str(duration), "--warmup", str(warmup)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if r.returncode != 0:
        raise RuntimeError(f"load client ({mode} via {via}) failed: {r.stderr.strip()[-600:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def cpu_seconds(pids: list[int]) -> float:
    """user+system CPU time of these processes (not their children), in seconds."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


@dataclass
class Yardstick:
    name: str
    via: str
    pids: list[int] = field(default_factory=list)  # the proxy's processes (CPU cost); none for direct
    side_pids: list[int] = field(default_factory=list)  # processes on the path but not the proxy's own
    side_label: str = ""  # what side_pids are, for the row name
    target: str = ""  # where this yardstick connects, when not the env's target (kubectl port-forward)
    # Cluster yardsticks may fail a measurement (kubectl port-forward under 100 new connections at once):
    # then the cell stays empty and the case notes why, instead of losing the whole case.
    tolerate_errors: bool = False


# A/B of the SSH wire patches inside one loopback run: KTPROXY_BENCH_WITHOUT="coalesce_writes aead_reuse"
# adds one more ktproxy SOCKS5 yardstick per name, both of its processes without that ktwire.sshwire patch,
# measured interleaved with the shipped one (and OpenSSH) so one run gives the before/after ratio.
WITHOUT_ENV = "KTPROXY_BENCH_WITHOUT"


def without_label(patch: str) -> str:
    return f"{KT_SOCKS} without {patch}"


@dataclass
class LoopbackEnv:
    ctx: Context
    target: str
    ktproxy: KtProxy
    openssh: OpenSSH | None
    asyncssh: KtProxy | None = None
    openssh_skip: str = ""
    without: dict[str, KtProxy] = field(default_factory=dict)  # WITHOUT_ENV's variants

    def yardsticks(self, http: bool = True) -> list[Yardstick]:
        kt = [self.ktproxy.dataplane.pid, self.ktproxy.shadow.pid]
        ys = [Yardstick(DIRECT, "direct"),
              Yardstick(KT_SOCKS, f"socks5:127.0.0.1:{self.ktproxy.proxy_port}", kt)]
        for patch, v in self.without.items():
            ys.append(Yardstick(without_label(patch), f"socks5:127.0.0.1:{v.proxy_port}",
                                [v.dataplane.pid, v.shadow.pid]))
        if http:
            ys.append(Yardstick(KT_HTTP, f"http:127.0.0.1:{self.ktproxy.proxy_port}", kt))
        if self.asyncssh is not None:
            ys.append(Yardstick(ASYNCSSH, f"socks5:127.0.0.1:{self.asyncssh.proxy_port}",
                                [self.asyncssh.dataplane.pid, self.asyncssh.shadow.pid]))
        if self.openssh is not None:
            ys.append(Yardstick(OPENSSH, f"socks5:127.0.0.1:{self.openssh.socks_port}",
                                [self.openssh.client.pid, *session_pids(self.openssh)]))
        return ys


def target_fixture(ctx: Context) -> str:
    def start(ctx: Context) -> str:
        _, port = start_target(ctx.procs)
        return f"127.0.0.2:{port}"
    return ctx.fixture("target", start)


def keys_fixture(ctx: Context):
    return ctx.fixture("keys", lambda c: make_keys(c.workdir))


def loopback_env(ctx: Context) -> LoopbackEnv:
    def start(ctx: Context) -> LoopbackEnv:
        target = target_fixture(ctx)
        keys = keys_fixture(ctx)
        kt = start_ktproxy(ctx.procs, keys, Tuning())
        try:
            ossh, why = start_openssh(ctx.procs, keys), ""
        except Skip as exc:
            ossh, why = None, str(exc)
        without = {name: start_ktproxy(ctx.procs, keys, Tuning(asyncssh_default=(name,)))
                   for name in os.environ.get(WITHOUT_ENV, "").split()}
        return LoopbackEnv(ctx, target, kt, ossh, start_asyncssh_socks(ctx.procs, keys), why, without)
    return ctx.fixture("loopback-env", start)
