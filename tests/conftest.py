"""The level gate: `make test` promises three levels (unit, integration, e2e) and must fail when one of
them did not run, instead of passing on a sea of skips.

Off unless KTPROXY_REQUIRE_LEVELS names levels (tests/run-all.sh sets it, e.g. `unit,integration,e2e`):
a developer running plain pytest may still skip what the machine lacks (no cluster, no network
namespaces, no node). With the gate on, a required level fails the run, with one line naming the level
and the reason, when
  - no test of it was collected (a path or -k left it out, or its files failed to import),
  - any of its tests skipped: every skip in this tree says what the machine lacks, and under `make test`
    the machine is meant to have it (install-deps.sh installs it, run-all.sh brings the cluster up),
  - none of its tests passed.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
LEVELS = ("unit", "integration", "e2e")
GATE_PREFIX = "make test: level"


def required_levels() -> list[str]:
    raw = os.environ.get("KTPROXY_REQUIRE_LEVELS", "")
    return [lvl.strip() for lvl in raw.split(",") if lvl.strip()]


def level_of(path: str | os.PathLike[str]) -> str | None:
    try:
        rel = Path(path).resolve().relative_to(TESTS)
    except ValueError:
        return None
    return rel.parts[0] if len(rel.parts) > 1 else None


class LevelGate:
    def __init__(self, required: list[str]) -> None:
        self.required = required
        self.collected: Counter[str] = Counter()
        self.passed: Counter[str] = Counter()
        self.skips: dict[str, list[str]] = {lvl: [] for lvl in required}
        self.problems: list[str] = []

    def collection_finish(self, items: list[pytest.Item]) -> None:
        for item in items:
            lvl = level_of(item.path)
            if lvl:
                self.collected[lvl] += 1

    def logreport(self, report: pytest.TestReport) -> None:
        lvl = level_of(report.fspath) if report.fspath else None
        if lvl not in self.skips:
            return
        if report.when == "call" and report.passed:
            self.passed[lvl] += 1
        elif report.skipped and not hasattr(report, "wasxfail"):
            longrepr = report.longrepr
            reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
            self.skips[lvl].append(reason.removeprefix("Skipped: "))

    def verdict(self) -> list[str]:
        problems = []
        for lvl in self.required:
            n = self.collected[lvl]
            skips = self.skips.get(lvl, [])
            if n == 0:
                why = "no test collected" if lvl in LEVELS else f"unknown level (known: {', '.join(LEVELS)})"
                problems.append(f"{GATE_PREFIX} {lvl} did not run: {why}")
            elif skips:
                reason, count = Counter(skips).most_common(1)[0]
                more = f"; and {len(skips) - count} other skips" if count < len(skips) else ""
                problems.append(f"{GATE_PREFIX} {lvl} skipped {len(skips)} of {n} tests: {reason}{more}")
            elif self.passed[lvl] == 0:
                problems.append(f"{GATE_PREFIX} {lvl} ran no test ({n} collected, none passed)")
        return problems


_GATE: LevelGate | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _GATE
    required = required_levels()
    _GATE = LevelGate(required) if required else None


def pytest_collection_finish(session: pytest.Session) -> None:
    if _GATE:
        _GATE.collection_finish(session.items)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if _GATE:
        _GATE.logreport(report)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _GATE or exitstatus == pytest.ExitCode.INTERRUPTED:
        return
    _GATE.problems = _GATE.verdict()
    if _GATE.problems and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if _GATE and _GATE.problems:
        terminalreporter.section("level gate (KTPROXY_REQUIRE_LEVELS)", red=True)
        for line in _GATE.problems:
            terminalreporter.write_line(line, red=True)
