"""The benchmark harness: a registry of cases, repeated measurements, and the results files.

A case is one function registered with `@case`; it measures through the `Context` it is given:

    @case("loopback", "Loopback data plane: ktproxy vs OpenSSH ssh -D vs direct")
    def loopback(ctx: Context) -> None:
        env = ctx.fixture("loopback-env", start_env)    # shared by cases, torn down at the end
        for _ in ctx.reps():                            # N repetitions (1 in --quick)
            ctx.add("single-stream download", "ktproxy SOCKS5", "MB/s", measure(...))
        ctx.note("...")                                 # free text under the case's table

`raise Skip("why")` (or `ctx.require_cluster()`) marks the case skipped with that reason; any other
exception marks it failed (traceback in the log) and the run goes on. Every sample is kept; the
table shows median, min and max per (metric, yardstick).
"""

from __future__ import annotations

import contextlib
import statistics
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.procs import REPO, Procs, Skip
from benchmarks.yardsticks import BY_CASE, Yardsticks

__all__ = ["CASES", "Case", "Context", "Row", "Skip", "case"]


@dataclass
class Case:
    name: str
    title: str
    fn: Callable[[Context], None]
    group: str


CASES: dict[str, Case] = {}


def case(name: str, title: str, group: str = "loopback") -> Callable[[Callable[[Context], None]],
                                                                    Callable[[Context], None]]:
    def register(fn: Callable[[Context], None]) -> Callable[[Context], None]:
        if name in CASES:
            raise ValueError(f"benchmark case {name} registered twice")
        CASES[name] = Case(name, title, fn, group)
        return fn
    return register


@dataclass
class Row:
    case: str
    metric: str
    yardstick: str
    unit: str
    better: str  # "higher" or "lower"
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(median=self.median, min=self.min, max=self.max, n=len(self.samples))
        return d


@dataclass
class CaseResult:
    name: str
    title: str
    group: str
    status: str = "ok"  # ok | skipped | failed
    reason: str = ""
    seconds: float = 0.0
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tables: list[tuple[str, list[str], list[list[str]]]] = field(default_factory=list)


class Context:
    def __init__(self, workdir: Path, quick: bool, repeat: int, log: Callable[[str], None]) -> None:
        self.workdir = workdir
        self.quick = quick
        self.repeat = repeat
        self.log = log
        self.procs = Procs(workdir)
        self.results: dict[str, CaseResult] = {}
        self.current: CaseResult | None = None
        self._fixtures: dict[str, Any] = {}
        self._teardown = contextlib.ExitStack()
        self.yardsticks = Yardsticks()  # why a yardstick was not run: one line each at the end

    # -- what cases call ------------------------------------------------------------------------
    def reps(self) -> Iterator[int]:
        for i in range(self.repeat):
            self.log(f"  repetition {i + 1}/{self.repeat}")
            yield i

    def add(self, metric: str, yardstick: str, unit: str, value: float, better: str = "higher") -> None:
        """One sample; samples of the same (metric, yardstick) accumulate into one row."""
        assert self.current is not None
        for row in self.current.rows:
            if row.metric == metric and row.yardstick == yardstick:
                row.samples.append(value)
                return
        self.current.rows.append(Row(self.current.name, metric, yardstick, unit, better, [value]))

    def yardstick_missing(self, name: str, why: str) -> None:
        """A yardstick (benchmarks.yardsticks names: OPENSSH, NGINX, ...) could not run: noted under the
        case and reported once, in one line, at the end of the run (the first reason wins)."""
        self.yardsticks.add(name, why)
        if self.current is not None:
            self.note(f"{name} yardstick skipped: {why}")

    def note(self, text: str) -> None:
        assert self.current is not None
        self.current.notes.append(text)

    def table(self, title: str, header: list[str], rows: list[list[str]]) -> None:
        """An extra free-form table under the case (the tuning study's before/after)."""
        assert self.current is not None
        self.current.tables.append((title, header, rows))

    def row(self, metric: str, yardstick: str) -> Row | None:
        assert self.current is not None
        for row in self.current.rows:
            if row.metric == metric and row.yardstick == yardstick:
                return row
        return None

    def fixture(self, name: str, factory: Callable[[Context], Any]) -> Any:
        """A shared set-up (processes), created once per run and torn down at its end."""
        if name not in self._fixtures:
            value = factory(self)
            self._fixtures[name] = value
            stop = getattr(value, "stop", None)
            if stop is not None:
                self._teardown.callback(stop)
        return self._fixtures[name]

    def require_cluster(self) -> Path:
        kubeconfig = REPO / ".cluster" / "kubeconfig"
        if not kubeconfig.exists():
            raise Skip("cluster not up: .cluster/kubeconfig missing")
        return kubeconfig

    # -- the runner ------------------------------------------------------------------------------
    def run(self, selected: list[Case]) -> None:
        import time
        try:
            for c in selected:
                res = CaseResult(c.name, c.title, c.group)
                self.results[c.name] = res
                self.current = res
                self.log(f"[bench] {c.name}: {c.title}")
                start = time.monotonic()
                try:
                    c.fn(self)
                except Skip as exc:
                    res.status, res.reason = "skipped", str(exc)
                    self.log(f"[bench] {c.name}: skipped: {exc}")
                    for y in BY_CASE.get(c.name, ()):
                        self.yardsticks.add(y, f"case {c.name} skipped: {exc}")
                except Exception as exc:  # one broken case must not lose the others' results
                    res.status, res.reason = "failed", f"{type(exc).__name__}: {exc}"
                    self.log(f"[bench] {c.name}: FAILED\n{traceback.format_exc()}")
                    if not res.rows:
                        for y in BY_CASE.get(c.name, ()):
                            self.yardsticks.add(y, f"case {c.name} failed: {res.reason}")
                res.seconds = time.monotonic() - start
                self.current = None
        finally:
            self._teardown.close()
            self.procs.stop_all()
