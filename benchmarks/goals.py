"""Issue 15's goals in one table: the per-case charts (benchmarks/charts.py) and the results markdown
(benchmarks/report.py) both read it.

A goal compares ktproxy's median (`ours`) with a yardstick's median measured in the same run, on one
metric. `limit` reads in the metric's own direction, the way the issue states it:

- a higher-is-better metric (MB/s, requests/s): ours >= limit x the yardstick's figure;
- a lower-is-better metric (latency, CPU-s/GB, seconds, MB): ours <= limit x the yardstick's figure.

So "at least kt-connect on every metric" is `limit=1.0` for rates and latencies alike. A goal with no
yardstick (`yardstick=None`) is absolute: ours <= limit (lower is better) or >= limit (higher).

The *score* puts every comparison on one scale where higher is better: ours / yardstick for a
higher-is-better metric, yardstick / ours for a lower-is-better one (limit / ours for an absolute goal);
the goal is then score >= threshold. The charts plot scores; the markdown shows the plain ratio
ours / yardstick with the goal as the issue words it.

Every metric that a case measures for both sides of one of its COMPARISONS must match an entry of GOALS
(first match wins; patterns are fnmatch). An entry with `limit=None` says "compared, no goal set": it
is listed in the markdown and left out of the chart. `missing()` lists what matches nothing; the unit
test fails on it, so a new metric cannot slip in without someone deciding its goal.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

# Yardstick names as the cases write them (kept as literals: importing the cases pulls in asyncssh).
KT_SOCKS = "ktproxy SOCKS5"
OPENSSH = "OpenSSH ssh -D"
KT_CONNECT = "ktctl connect (ktproxy) SOCKS5"
KTCONNECT_SOCKS = "kt-connect v0.3.7 SOCKS5"
PORT_FORWARD = "kubectl port-forward"
DNS_STUB = "ktctl connect DNS stub (UDP)"
COREDNS = "cluster DNS * directly"
ROUTER = "ktproxy router"
NGINX_1 = "nginx * route.conf, 1 worker"
EXCHANGE = "ktctl exchange (ktproxy)"
KTCONNECT_EXCHANGE = "kt-connect v0.3.7 exchange"
FORWARD = "ktctl forward (ktproxy)"
PORT_FORWARD_SVC = "kubectl port-forward svc/NAME"

# case -> (ours, yardstick) pairs whose common metrics are compared (yardstick names may be patterns).
# Not here: `direct` / the service's own pod (ceilings, not yardsticks) and the tuning study (knobs
# against the shipped settings, no yardstick).
COMPARISONS: dict[str, list[tuple[str, str]]] = {
    "loopback": [(KT_SOCKS, OPENSSH)],
    "memory": [(KT_SOCKS, OPENSSH)],
    "mesh": [(ROUTER, NGINX_1)],
    "cluster-mesh": [(ROUTER, NGINX_1)],
    "cluster-dataplane": [(KT_CONNECT, KTCONNECT_SOCKS), (KT_CONNECT, PORT_FORWARD)],
    "cluster-dns": [(DNS_STUB, COREDNS)],
    "cluster-startup": [(KT_CONNECT, KTCONNECT_SOCKS)],
    "cluster-reverse": [(EXCHANGE, KTCONNECT_EXCHANGE), (FORWARD, PORT_FORWARD_SVC)],
}


@dataclass(frozen=True)
class Goal:
    case: str
    metric: str  # fnmatch pattern
    ours: str
    yardstick: str | None  # pattern; None: an absolute goal on ours alone
    limit: float | None  # None: compared, no goal set
    short: str = ""  # how the chart's x axis names the yardstick


# Issue 15, "Goals": the order matters only within a case (first match wins).
GOALS: list[Goal] = [
    # Loopback SOCKS5 against OpenSSH ssh -D (same machine, same cipher).
    Goal("loopback", "request/response (keep-alive), 100 clients: rate", KT_SOCKS, OPENSSH, 0.8, "OpenSSH"),
    Goal("loopback", "new connection + request, 100 clients: rate", KT_SOCKS, OPENSSH, 0.8, "OpenSSH"),
    Goal("loopback", "request/response (keep-alive), 1 client: p99", KT_SOCKS, OPENSSH, 1.5, "OpenSSH"),
    Goal("loopback", "download, 1 stream", KT_SOCKS, OPENSSH, 1.0, "OpenSSH"),
    Goal("loopback", "download, 1 stream: proxy CPU", KT_SOCKS, OPENSSH, 1.3, "OpenSSH"),  # both ends
    Goal("loopback", "download, 64 streams (aggregate)", KT_SOCKS, OPENSSH, 1.0, "OpenSSH"),
    Goal("loopback", "*", KT_SOCKS, OPENSSH, None, "OpenSSH"),
    # Memory: absolute.
    Goal("memory", "client-side process RSS, * connections open", KT_SOCKS, None, 150.0, "150 MB"),
    Goal("memory", "*", KT_SOCKS, OPENSSH, None, "OpenSSH"),
    # Cluster: at least kt-connect v0.3.7 on every metric; single-stream download vs kubectl port-forward.
    Goal("cluster-dataplane", "*: API server + kubelet + containerd CPU", KT_CONNECT, "*", None),  # not ours
    Goal("cluster-dataplane", "*", KT_CONNECT, KTCONNECT_SOCKS, 1.0, "kt-connect"),
    Goal("cluster-dataplane", "download, 1 stream", KT_CONNECT, PORT_FORWARD, 1.0, "kubectl pf"),
    Goal("cluster-dataplane", "*", KT_CONNECT, PORT_FORWARD, None, "kubectl pf"),
    Goal("cluster-startup", "*", KT_CONNECT, KTCONNECT_SOCKS, 1.0, "kt-connect"),
    Goal("cluster-reverse", "*", EXCHANGE, KTCONNECT_EXCHANGE, 1.0, "kt-connect"),
    Goal("cluster-reverse", "forward: download, 1 stream", FORWARD, PORT_FORWARD_SVC, 1.0, "kubectl pf"),
    Goal("cluster-reverse", "*", FORWARD, PORT_FORWARD_SVC, None, "kubectl pf"),
    # DNS stub: cached names at least as fast as asking CoreDNS directly.
    Goal("cluster-dns", "repeated names (cacheable), *", DNS_STUB, COREDNS, 1.0, "CoreDNS"),
    Goal("cluster-dns", "*", DNS_STUB, COREDNS, None, "CoreDNS"),
    # Mesh router against nginx with kt-connect's route.conf, 1 worker (loopback and in the cluster).
    *(g for case in ("mesh", "cluster-mesh") for g in (
        Goal(case, "* keep-alive client*: rate", ROUTER, NGINX_1, 0.8, "nginx"),
        Goal(case, "* keep-alive client*: added p99", ROUTER, NGINX_1, 1.5, "nginx"),
        Goal(case, "*", ROUTER, NGINX_1, None, "nginx"))),
]


@dataclass
class Verdict:
    case: str
    metric: str
    unit: str
    better: str  # higher | lower
    ours: str
    ours_value: float
    yardstick: str | None  # the yardstick's name as measured; None for an absolute goal
    yard_value: float | None
    goal: Goal
    score_lo: float | None = None  # the score's range from min/max samples (None: one sample each)
    score_hi: float | None = None

    @property
    def ratio(self) -> float | None:
        """ours / yardstick (None when the yardstick's figure cannot divide, or for an absolute goal)."""
        if self.yard_value is None or self.yard_value <= 0:
            return None
        return self.ours_value / self.yard_value

    @property
    def score(self) -> float | None:
        """Higher is better: see the module docstring."""
        if self.yardstick is None:
            lim = self.goal.limit or 0.0
            if self.better == "lower":
                return lim / self.ours_value if self.ours_value > 0 else None
            return self.ours_value / lim if lim > 0 else None
        r = self.ratio
        if r is None or r <= 0:
            return None
        return r if self.better == "higher" else 1 / r

    @property
    def threshold(self) -> float | None:
        """The goal on the score scale (the chart's dashed line)."""
        lim = self.goal.limit
        if lim is None:
            return None
        if self.yardstick is None:
            return 1.0
        return lim if self.better == "higher" else 1 / lim

    @property
    def met(self) -> bool | None:
        s, t = self.score, self.threshold
        if s is None or t is None:
            return None
        if self.yardstick is None and self.better == "lower":
            return self.ours_value < (self.goal.limit or 0.0)  # "< 150 MB": strictly
        return s >= t - 1e-9

    def goal_text(self) -> str:
        lim = self.goal.limit
        if lim is None:
            return "none"
        op = "≥" if self.better == "higher" else "≤"
        if self.yardstick is None:
            return f"{'<' if self.better == 'lower' else '≥'} {lim:g} {self.unit}"
        return f"{op} {lim:g}x"

    def ratio_text(self) -> str:
        if self.yardstick is None:
            return f"{self.ours_value:.3g} {self.unit}"
        r = self.ratio
        return "n/a" if r is None else f"{r:.2f}x"

    def met_text(self) -> str:
        m = self.met
        return "-" if self.goal.limit is None else ("n/a" if m is None else ("yes" if m else "NO"))


def _rows(case_doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["metric"], r["yardstick"]): r for r in case_doc.get("rows", [])}


def find_goal(case: str, metric: str, ours: str, yardstick: str | None) -> Goal | None:
    for g in GOALS:
        if g.case != case or g.ours != ours or not fnmatchcase(metric, g.metric):
            continue
        if (g.yardstick is None) != (yardstick is None):
            continue
        if yardstick is not None and not fnmatchcase(yardstick, g.yardstick or ""):
            continue
        return g
    return None


def _pairs(case: str, case_doc: dict[str, Any]):
    """(metric, ours row, yardstick row) for every compared metric, in the order the case measured them."""
    rows = case_doc.get("rows", [])
    names = list(dict.fromkeys(r["yardstick"] for r in rows))
    by = _rows(case_doc)
    for ours, ypat in COMPARISONS.get(case, []):
        for yname in (n for n in names if fnmatchcase(n, ypat) and n != ours):
            for r in rows:
                if r["yardstick"] == ours and (r["metric"], yname) in by:
                    yield r["metric"], r, by[(r["metric"], yname)]


def _score_range(better: str, o: dict[str, Any], y: dict[str, Any]) -> tuple[float | None, float | None]:
    if o.get("n", len(o.get("samples", []))) < 2 and y.get("n", len(y.get("samples", []))) < 2:
        return None, None
    if min(o["min"], y["min"]) <= 0:
        return None, None
    if better == "higher":
        return o["min"] / y["max"], o["max"] / y["min"]
    return y["min"] / o["max"], y["max"] / o["min"]


def evaluate(case: str, case_doc: dict[str, Any]) -> list[Verdict]:
    """Every compared metric of one case (as stored in a results JSON) with its goal, in measuring order;
    absolute goals after the comparisons."""
    out: list[Verdict] = []
    for metric, o, y in _pairs(case, case_doc):
        g = find_goal(case, metric, o["yardstick"], y["yardstick"])
        if g is None:
            continue  # missing(): the test's business
        lo, hi = _score_range(o["better"], o, y)
        out.append(Verdict(case, metric, o["unit"], o["better"], o["yardstick"], o["median"], y["yardstick"],
                           y["median"], g, lo, hi))
    for r in case_doc.get("rows", []):
        g = find_goal(case, r["metric"], r["yardstick"], None)
        if g is not None:
            out.append(Verdict(case, r["metric"], r["unit"], r["better"], r["yardstick"], r["median"], None, None, g))
    return out


def missing(case: str, case_doc: dict[str, Any]) -> list[str]:
    """Compared metrics that no entry of GOALS covers: `case: metric (ours vs yardstick)`."""
    return [f"{case}: {metric} ({o['yardstick']} vs {y['yardstick']})" for metric, o, y in _pairs(case, case_doc)
            if find_goal(case, metric, o["yardstick"], y["yardstick"]) is None]
