"""The mesh router (issue 10) against nginx loaded with the equivalent of kt-connect's generated route.conf
(kt-connect v0.3.7 pkg/router/route.conf; its router image is nginx plus that file), on loopback.

Set-up, all our own processes on 127.0.0.0/8, stopped by pid at the end:
- the origins: one nginx (Debian's nginx-light, 1 worker) answering a fixed 128-byte body on
  127.0.0.2:OP (the stuntman: the original pods; body `S...`) and 127.0.0.3:OP (the developer's route
  upstream; body `M...`). Both proxies use the same origins.
- the router: `python -m shadow_image.router --service bench --port TP:OP ... --default-host 127.0.0.2
  --route-host 127.0.0.3`, the route `version:abcde` in its annotations file.
- nginx as the yardstick: route.conf rendered for the same route and upstreams, with upstream keepalive
  so both proxies keep their upstream connections; worker_processes 1 (the like-for-like single-process
  comparison the goal is judged on) and auto (one worker per CPU). And kt-connect's router as it ships
  (no upstream keepalive, its main access log on, auto workers), for reference.

Each proxy is checked to route before it is measured: without the header the body is the stuntman's,
with `Version: abcde` the route's. Loads (benchmarks.httpload, uvloop, one process): keep-alive clients
in a closed loop with 1 and 100 clients, without the header (default route) and with it; new connections
(one request per connection). Added latency: a proxy's p99 minus the direct-to-origin p99 of the same
repetition. RSS after the loads: the router's process; nginx's master plus workers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from benchmarks import yardsticks
from benchmarks.cases.common import cpu_seconds
from benchmarks.harness import Context, Skip, case
from benchmarks.httpload import fetch
from benchmarks.procs import PY, REPO, free_port, port_open, rss_kb, wait_for

NGINX = Path(yardsticks.nginx_bin() or "/usr/sbin/nginx")  # where it is, or where Debian puts it
SERVICE = "bench"
ROUTE = ("version", "abcde")
STUNTMAN_HOST, MESH_HOST, LISTEN_HOST = "127.0.0.2", "127.0.0.3", "127.0.0.1"
BODY_LEN = 128
CONN_CLIENTS = 50
# Idle upstream connections nginx keeps per worker: at least the 100 clients, so that nginx, like the
# router's pool, never closes and reopens upstream connections under the 100-client load (with 32, the
# first run's 1-worker nginx in the cluster churned them and its p99 was ~100 ms).
UPSTREAM_KEEPALIVE = 128

DIRECT = "direct to origin"
ROUTER = "ktproxy router"
NGINX_1 = "nginx 1.22 route.conf, 1 worker"
NGINX_AUTO = "nginx 1.22 route.conf, auto workers"
NGINX_SHIPPED = "nginx as kt-connect ships it"

# (yardstick, worker_processes, upstream keepalive, access log): the goal's yardstick first.
NGINX_VARIANTS = ((NGINX_1, 1, UPSTREAM_KEEPALIVE, False), (NGINX_AUTO, "auto", UPSTREAM_KEEPALIVE, False),
                  (NGINX_SHIPPED, "auto", 0, True))

# The route.conf error pages, verbatim from kt-connect (what a mesh answers when an upstream fails).
ERROR_PAGES = {500: "internal error", 502: "connection error", 503: "temporary error", 504: "connection timeout"}


@dataclass(frozen=True)
class RouteConf:
    """kt-connect's route.conf inputs (router setup <svc> <sp:tp,...> <key:value>) plus where the upstream
    names point here: on loopback the Services' names become addresses."""

    service: str
    ports: tuple[tuple[int, int], ...]  # (service port, target port)
    header: str
    versions: tuple[str, ...]
    listen_host: str
    stuntman: str  # host of the stuntman upstream
    mesh: str  # host of a route upstream; may hold {version}
    keepalive: int = 0  # idle upstream connections kept per worker; 0: none, as kt-connect


def render_route_conf(rc: RouteConf) -> str:
    """route.conf as kt-connect's template renders it, upstream addresses substituted, and with keepalive
    the two lines nginx needs to reuse upstream connections (a pool, and no `Connection: close` upstream)."""
    var = rc.header.replace("-", "_")  # the $http_ variable form, as kt-connect stores the header
    pool = (f"  keepalive {rc.keepalive};\n  keepalive_requests 1000000;\n") if rc.keepalive else ""
    out: list[str] = []
    for sp, _ in rc.ports:
        for v in rc.versions:
            out.append(f"upstream {rc.service}-kt-mesh-{v}-{sp} {{\n  server {rc.mesh.format(version=v)}:{sp};\n"
                       f"{pool}}}\n")
        out.append(f"upstream {rc.service}-kt-stuntman-{sp} {{\n  server {rc.stuntman}:{sp};\n{pool}}}\n")
    for sp, tp in rc.ports:
        lines = [
            "server {",
            f"    listen  {rc.listen_host}:{tp};",
            f"    server_name  {rc.service};",
            "    underscores_in_headers  on;",
            "    proxy_intercept_errors  off;",
            *(f"    error_page {code}  /kt_nginx_error_{code};" for code in ERROR_PAGES),
            *(f'    location = /kt_nginx_error_{code} {{ return {code} "{code} - KtConnect mesh {text}"; }}'
              for code, text in ERROR_PAGES.items()),
            "    location / {",
            "        proxy_redirect off;",
            "        proxy_http_version 1.1;",
        ]
        if rc.keepalive:
            lines.append('        proxy_set_header Connection "";')
        for v in rc.versions:
            lines += [f'        if ($http_{var} = "{v}") {{',
                      f"            proxy_pass  http://{rc.service}-kt-mesh-{v}-{sp};", "        }"]
        lines += [f"        proxy_pass  http://{rc.service}-kt-stuntman-{sp};", "    }", "}"]
        out.append("\n".join(lines) + "\n")
    return "\n".join(out)


def render_nginx_conf(prefix: Path, workers: int | str, body: str, access_log: bool = False) -> str:
    """A whole nginx.conf for a process of ours: foreground, pid, logs and temp files under prefix.
    The http block follows kt-connect's router nginx.conf (1024 worker connections, keepalive 65, sendfile)
    except keepalive_requests: nginx's default of 1000 would close a benchmark's keep-alive client
    connection mid-run."""
    log = f"access_log  {prefix}/access.log  main;" if access_log else "access_log  off;"
    temps = "\n".join(f"    {kind}_temp_path  {prefix}/tmp-{kind};"
                      for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""\
daemon  off;
worker_processes  {workers};
pid  {prefix}/nginx.pid;
error_log  {prefix}/error.log  notice;
events {{
    worker_connections  1024;
}}
http {{
    default_type  application/octet-stream;
    log_format  main  '$remote_addr - $remote_user [$time_local] "$request" '
                      '$status $body_bytes_sent "$http_referer" '
                      '"$http_user_agent" "$http_x_forwarded_for"';
    {log}
    sendfile  on;
    keepalive_timeout  65;
    keepalive_requests  1000000;
{temps}
{body}
}}
"""


def render_origin(port: int, bodies: Mapping[str, bytes]) -> str:
    """The origins' server blocks: per host a fixed body, as cheap an upstream as nginx can be."""
    out = []
    for host, body in bodies.items():
        out.append(f'server {{\n    listen  {host}:{port};\n    default_type  text/plain;\n'
                   f'    location / {{ return 200 "{body.decode()}"; }}\n}}\n')
    return "\n".join(out)


# -- processes ------------------------------------------------------------------------------------

@dataclass
class Proxy:
    name: str
    proc: subprocess.Popen
    port: int

    def pids(self) -> list[int]:
        """The process and its children (nginx's workers)."""
        kids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    kids.append(int(entry))
        return [self.proc.pid, *kids]

    def rss_mb(self) -> float:
        return sum(rss_kb(p) for p in self.pids()) * 1024 / 1e6

    def pss_mb(self) -> float:
        """Proportional set size: shared pages split among the processes mapping them, so nginx's master
        and workers are not charged the same library pages twice."""
        return sum(pss_kb(p) for p in self.pids()) * 1024 / 1e6


def pss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise RuntimeError(f"no Pss for pid {pid}")


def start_nginx(ctx: Context, name: str, workers: int | str, body: str, wait: tuple[str, int],
                access_log: bool = False) -> Proxy:
    prefix = ctx.workdir / name.replace(" ", "-").replace(",", "")
    prefix.mkdir(exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(render_nginx_conf(prefix, workers, body, access_log))
    proc = ctx.procs.spawn(prefix.name, [str(NGINX), "-p", str(prefix), "-c", str(conf),
                                         "-e", str(prefix / "error.log")])
    try:
        wait_for(lambda: port_open(*wait), 15, name, proc)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\n{(prefix / 'error.log').read_text(errors='replace')[-600:]}") from None
    return Proxy(name, proc, wait[1])


def start_router(ctx: Context, tp: int, op: int) -> Proxy:
    annotations = ctx.workdir / "router-annotations"
    annotations.write_text(f'kt-config="service={SERVICE}"\nkt-mesh-routes="{ROUTE[0]}:{ROUTE[1]}"\n')
    health = free_port()
    proc = ctx.procs.spawn("router", [
        PY, "-m", "shadow_image.router", "--service", SERVICE, "--port", f"{tp}:{op}", "--health-port", str(health),
        "--annotations", str(annotations), "--default-host", STUNTMAN_HOST, "--route-host", MESH_HOST])

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{health}/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        wait_for(ready, 20, "router", proc)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\n{ctx.procs.tail('router')}") from None
    return Proxy(ROUTER, proc, tp)


@dataclass
class MeshEnv:
    origin_port: int
    proxies: list[Proxy]


def require_router() -> None:
    if importlib.util.find_spec("shadow_image.router.__main__") is None:
        raise Skip("shadow_image/router has no __main__ yet (the router is not in this tree)")


def mesh_env(ctx: Context) -> MeshEnv:
    if (why := yardsticks.check_nginx()) is not None:
        raise Skip(why)
    require_router()
    op = free_port(STUNTMAN_HOST)
    start_nginx(ctx, "origin", 1, render_origin(op, {STUNTMAN_HOST: b"S" * BODY_LEN, MESH_HOST: b"M" * BODY_LEN}),
                (MESH_HOST, op))
    proxies = [start_router(ctx, free_port(), op)]
    for name, workers, keepalive, log in NGINX_VARIANTS:
        tp = free_port()
        rc = RouteConf(SERVICE, ((op, tp),), ROUTE[0], (ROUTE[1],), LISTEN_HOST, STUNTMAN_HOST, MESH_HOST, keepalive)
        proxies.append(start_nginx(ctx, name, workers, render_route_conf(rc), (LISTEN_HOST, tp), log))
    return MeshEnv(op, proxies)


# -- measuring ------------------------------------------------------------------------------------

ROUTES = (("default route", []), ("header route", [f"{ROUTE[0].capitalize()}: {ROUTE[1]}"]))
CLIENTS = (1, 100)


def rr_metric(route: str, n: int, what: str) -> str:
    return f"{route}, {n} keep-alive client{'s' if n > 1 else ''}: {what}"


CONN_METRIC = f"new connections, {CONN_CLIENTS} at once"


def sizes(ctx: Context) -> dict[str, float]:
    return dict(duration=0.3, warmup=0.1) if ctx.quick else dict(duration=2.0, warmup=0.3)


Load = Callable[[tuple[str, int], str, int, list[str]], dict]  # (addr, mode, clients, headers) -> result


@dataclass(frozen=True)
class Target:
    """Where one yardstick is measured: per route label the address, and the RSS/PSS of its processes."""

    name: str
    addrs: dict[str, tuple[str, int]]
    memory: Callable[[], tuple[float, float]] | None = None  # (RSS MB, PSS MB); None: the origin itself
    pids: Callable[[], list[int]] | None = None  # the proxy's processes, where this machine can see them


def check_body(name: str, label: str, status: int, body: bytes) -> None:
    """The default route reaches the stuntman's origin and the header the route's, before any figure counts."""
    want = b"S" if label == ROUTES[0][0] else b"M"
    if status != 200 or body != want * BODY_LEN:
        raise RuntimeError(f"{name}: {label} answered {status} {body[:60]!r}, not the "
                           f"{'stuntman' if want == b'S' else 'route'}'s body")


def check_routes(t: Target) -> None:
    for label, headers in ROUTES:
        check_body(t.name, label, *fetch(t.addrs[label], headers))


def run_http(ctx: Context, addr: tuple[str, int], mode: str, streams: int, headers: list[str]) -> dict:
    s = sizes(ctx)
    argv = [PY, "-m", "benchmarks.httpload", "--target", f"{addr[0]}:{addr[1]}", "--mode", mode,
            "--streams", str(streams), "--duration", str(s["duration"]), "--warmup", str(s["warmup"])]
    for h in headers:
        argv += ["--header", h]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO)
    if r.returncode != 0:
        raise RuntimeError(f"httpload {mode} x{streams} on {addr} failed: {r.stderr.strip()[-600:]}")
    return checked(json.loads(r.stdout.strip().splitlines()[-1]), mode, streams, addr)


def checked(out: dict, mode: str, streams: int, addr: tuple[str, int]) -> dict:
    if out.get("bad"):
        raise RuntimeError(f"httpload {mode} x{streams} on {addr}: {out['bad']} responses were not 200")
    return out


def rr_rows(ctx: Context, t: Target, load: Load, label: str, headers: list[str], n: int) -> dict:
    """One keep-alive load on one yardstick, its rows; the load's result."""
    r = load(t.addrs[label], "rr", n, headers)
    ctx.add(rr_metric(label, n, "rate"), t.name, "requests/s", r["rps"])
    ctx.add(rr_metric(label, n, "p50"), t.name, "µs", r["p50_us"], "lower")
    ctx.add(rr_metric(label, n, "p99"), t.name, "µs", r["p99_us"], "lower")
    return r


def conn_rows(ctx: Context, t: Target, load: Load) -> None:
    r = load(t.addrs[ROUTES[0][0]], "conn", CONN_CLIENTS, [])
    ctx.add(f"{CONN_METRIC}: rate", t.name, "connections/s", r["rps"])
    ctx.add(f"{CONN_METRIC}: p99", t.name, "µs", r["p99_us"], "lower")


def measure(ctx: Context, t: Target, load: Load, direct: Target) -> None:
    """One repetition of every load on one proxy. Each keep-alive load is paired with the same load straight
    to the origin just before it (a row of the direct yardstick too): the added p99 is their difference,
    taken seconds apart rather than a whole repetition apart, as the shared machine's load drifts."""
    for label, headers in ROUTES:
        for n in CLIENTS:
            base = rr_rows(ctx, direct, load, label, headers, n)
            pids = t.pids() if t.pids is not None else []
            cpu = cpu_seconds(pids)
            r = rr_rows(ctx, t, load, label, headers, n)
            ctx.add(rr_metric(label, n, "added p99"), t.name, "µs", r["p99_us"] - base["p99_us"], "lower")
            if pids:
                # The proxy's CPU over the whole load (warm-up included) per request: what other tenants of
                # the machine cannot skew as much as they skew a p99. Requests in the warm-up are estimated
                # at the measured rate.
                z = sizes(ctx)
                total = r["requests"] * (z["duration"] + z["warmup"]) / z["duration"]
                ctx.add(rr_metric(label, n, "proxy CPU per request"), t.name, "µs",
                        (cpu_seconds(pids) - cpu) / total * 1e6, "lower")
    conn_rows(ctx, t, load)
    add_memory(ctx, t, "after the loads")


def add_memory(ctx: Context, t: Target, when: str) -> None:
    if t.memory is not None:
        rss, pss = t.memory()
        ctx.add(f"RSS {when}", t.name, "MB", rss, "lower")
        ctx.add(f"PSS {when}", t.name, "MB", pss, "lower")


def run_reps(ctx: Context, targets: list[Target], load: Load) -> None:
    """Every proxy measured once per repetition, the router and nginx 1-worker swapping order every other
    repetition, then the other nginx variants; new connections straight to the origin once per repetition."""
    direct, router, nginx1, *rest = targets
    if ctx.quick:  # --quick checks the harness works; the other nginx variants add nothing to that
        rest = []
    for i in ctx.reps():
        conn_rows(ctx, direct, load)
        for t in ([router, nginx1] if i % 2 == 0 else [nginx1, router]) + rest:
            ctx.log(f"  yardstick: {t.name}")
            measure(ctx, t, load, direct)


# -- the verdict (pure) ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Goal:
    text: str
    ratio: float | None  # ours / yardstick; None when the yardstick's figure cannot divide
    met: bool | None


def goals(medians: Mapping[tuple[str, str], float], ours: str, yardstick: str) -> list[Goal]:
    """Issue 10's goals: at least 0.5x the yardstick's requests/s at 100 clients, and at most 2x its added
    p99 latency; each per route (default and header)."""
    out: list[Goal] = []

    def one(metric: str, text: str, ok: Callable[[float], bool]) -> None:
        a, b = medians.get((metric, ours)), medians.get((metric, yardstick))
        ratio = a / b if a is not None and b is not None and b > 0 else None
        out.append(Goal(text, ratio, None if ratio is None else ok(ratio)))

    for label, _ in ROUTES:
        one(rr_metric(label, 100, "rate"), f"{label}, 100 clients: requests/s >= 0.5x", lambda r: r >= 0.5)
    for label, _ in ROUTES:
        for n in CLIENTS:
            one(rr_metric(label, n, "added p99"), f"{label}, {n} client{'s' if n > 1 else ''}: added p99 <= 2x",
                lambda r: r <= 2.0)
    return out


def ratio_rows(medians: Mapping[tuple[str, str], float], metrics: Iterable[str], ours: str,
               others: list[str]) -> list[list[str]]:
    rows = []
    for metric in metrics:
        a = medians.get((metric, ours))
        if a is None:
            continue
        cells = [metric]
        for other in others:
            b = medians.get((metric, other))
            # a ratio to a negative or zero figure (an added latency lost in the noise) means nothing
            cells.append(f"{a / b:.2f}x" if b is not None and b > 0 else "n/a")
        rows.append(cells)
    return rows


def goal_rows(gs: list[Goal]) -> list[list[str]]:
    return [[g.text, "n/a" if g.ratio is None else f"{g.ratio:.2f}x",
             "n/a" if g.met is None else ("met" if g.met else "NOT met")] for g in gs]


def verdict(ctx: Context) -> None:
    """The ratio table (router / each nginx) and issue 10's goals against the 1-worker nginx."""
    assert ctx.current is not None
    medians = {(r.metric, r.yardstick): r.median for r in ctx.current.rows}
    metrics = list(dict.fromkeys(r.metric for r in ctx.current.rows))
    others = [o for o in (NGINX_1, NGINX_AUTO, NGINX_SHIPPED) if any(y == o for _, y in medians)]
    ctx.table("Router / nginx (medians of this run; >1 better for rates, <1 better for latency and memory)",
              ["metric", *(f"{ROUTER} / {o}" for o in others)], ratio_rows(medians, metrics, ROUTER, others))
    gs = goals(medians, ROUTER, NGINX_1)
    ctx.table(f"Issue 10 goals against {NGINX_1}", ["goal", "router / nginx", "verdict"], goal_rows(gs))
    judged = [g for g in gs if g.met is not None]
    ctx.note(f"Goals met: {sum(bool(g.met) for g in judged)} of {len(judged)}"
             + (f" ({len(gs) - len(judged)} not judged: the yardstick's figure was not positive)"
                if len(judged) < len(gs) else ""))


def summarize(ctx: Context, op: int) -> None:
    verdict(ctx)
    s = sizes(ctx)
    ctx.note(
        f"Loopback, all processes ours. Origins: one nginx-light 1.22 process (1 worker) answering a "
        f"{BODY_LEN}-byte body on {STUNTMAN_HOST}:{op} (the stuntman) and {MESH_HOST}:{op} (the route "
        f"`{ROUTE[0]}:{ROUTE[1]}`'s upstream). `{ROUTER}`: `python -m shadow_image.router --service {SERVICE} "
        f"--port TP:{op} --default-host {STUNTMAN_HOST} --route-host {MESH_HOST}` (one process). nginx: "
        f"kt-connect v0.3.7's route.conf rendered for the same route and upstreams (benchmarks/cases/mesh.py "
        f"render_route_conf), in kt-connect's nginx.conf http block with access_log off and keepalive_requests "
        f"1000000; `{NGINX_1}` and `{NGINX_AUTO}` add upstream keepalive {UPSTREAM_KEEPALIVE} (and "
        f"`proxy_set_header Connection \"\"`), so both proxies reuse upstream connections, never closing one "
        f"under the 100-client load; the goal is judged against the 1-worker one (the router is one process; "
        f"auto is one worker per CPU, {os.cpu_count()} here). `{NGINX_SHIPPED}`: no "
        f"upstream keepalive, access log on, auto workers, as kt-connect's router image runs (bar "
        f"keepalive_requests). Load: benchmarks/httpload.py (uvloop, one process, on the same "
        f"{os.cpu_count()} CPUs as the proxy and the origin), HTTP/1.1 GET, closed loop, {s['duration']:.1f} s "
        f"after {s['warmup']:.1f} s warm-up; 'header route' requests carry `{ROUTES[1][1][0]}`; new "
        f"connections: {CONN_CLIENTS} workers each opening a connection per request (`Connection: close`). "
        f"'added p99' = the proxy's p99 minus the p99 of the same load straight to the origin, run just before "
        f"it (so the direct column has one sample per proxy and repetition). "
        f"'proxy CPU per request': user+system CPU of the proxy's processes (nginx: master and workers) over "
        f"the load, warm-up included, per request (warm-up requests estimated at the measured rate): the "
        f"figure other load on the machine skews least. RSS: VmRSS, nginx's master plus its workers (shared "
        f"pages counted in each); PSS: the same with shared pages split among the processes that map them "
        f"(smaps_rollup). Each proxy "
        f"is checked to route (the body says which origin answered) before it is measured; the router and "
        f"nginx 1-worker swap order every other repetition.")


def loopback_targets(env: MeshEnv) -> list[Target]:
    op = env.origin_port
    direct = Target(DIRECT, {ROUTES[0][0]: (STUNTMAN_HOST, op), ROUTES[1][0]: (MESH_HOST, op)})
    return [direct, *(Target(p.name, dict.fromkeys((label for label, _ in ROUTES), (LISTEN_HOST, p.port)),
                             lambda p=p: (p.rss_mb(), p.pss_mb()), p.pids) for p in env.proxies)]


@case("mesh", "Mesh router vs nginx with kt-connect's route.conf (loopback): requests/s, p50/p99, "
      "new connections/s, RSS")
def mesh(ctx: Context) -> None:
    env = ctx.fixture("mesh-env", mesh_env)
    targets = loopback_targets(env)
    for t in targets:
        check_routes(t)
        add_memory(ctx, t, "idle (after start)")
    run_reps(ctx, targets, lambda addr, mode, n, headers: run_http(ctx, addr, mode, n, headers))
    summarize(ctx, env.origin_port)
