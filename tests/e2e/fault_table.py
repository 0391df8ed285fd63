"""The fault suite's results table (tests/e2e/test_faults.py): one row per fault and command, printed at
the end of the pytest run and written to benchmarks/results/faults.md (KTPROXY_FAULTS_MD=PATH writes it
elsewhere, KTPROXY_FAULTS_MD= not at all).

A pytest plugin (test_faults.py names it in pytest_plugins): the session-scoped `fault_table` fixture
collects the rows, its teardown writes the file, and the terminal summary repeats the table so it is in
the test output with or without -s.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PATH = ROOT / "benchmarks" / "results" / "faults.md"


@dataclass
class Row:
    fault: str
    command: str
    recovered: bool
    seconds: float | None  # fault to the first good request (None: never, or not measurable)
    objects_left: int | None  # kt objects beyond what the live session owns (None: not counted)
    note: str = ""

    def cells(self) -> list[str]:
        return [self.fault, self.command, "yes" if self.recovered else "**no**",
                "-" if self.seconds is None else f"{self.seconds:.1f}",
                "-" if self.objects_left is None else str(self.objects_left), self.note or ""]


HEADER = ["fault", "command", "recovered", "seconds", "objects left", "notes"]


class FaultTable:
    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.started = datetime.datetime.now(datetime.UTC)
        self.wall: float | None = None

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        secs = "-" if row.seconds is None else f"{row.seconds:.1f} s"
        left = "-" if row.objects_left is None else row.objects_left
        print(f"\n[faults] {row.command}: {row.fault}: recovered={'yes' if row.recovered else 'NO'} "
              f"in {secs}, objects left {left}{'; ' + row.note if row.note else ''}", flush=True)
        return row

    def markdown(self) -> str:
        def line(cells: list[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

        return "\n".join([line(HEADER), line(["---"] * len(HEADER)), *(line(r.cells()) for r in self.rows)])

    def document(self) -> str:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or "?"
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        wall = "" if self.wall is None else f"; the suite took {self.wall:.0f} s"
        return f"""# Fault suite on the real cluster (issue 18, item 5)

Written by `tests/e2e/test_faults.py` (its `fault_table` collector) at the end of the run that started
{self.started:%Y-%m-%d %H:%M UTC}, at commit {commit}{' with local changes' if dirty else ''}{wall}
(Python {platform.python_version()}, the local single-node cluster of `make cluster-up`).

- **seconds**: from the fault to the first request that works through the feature again (connect: curl
  through its HTTP proxy; exchange and mesh: the Service's cluster IP, fetched from the node as a pod
  would, answered by the laptop's server; forward: its local port). For the freeze it counts from
  SIGCONT (nothing can happen while the process is stopped); for the API server restart, from SIGTERM,
  counting only requests after the old process is gone (the time to /readyz is in the fault's name);
  for the SIGKILL + clean cycles it is the
  longest of the command's cycles, SIGKILL to the namespace being back to its snapshot.
- **recovered**: the feature works again within the fault's budget (freeze: within one heartbeat, 60 s,
  of SIGCONT, with the objects the command owns back in the cluster, or the command exited with one clear
  line), and the process did not hang.
- **objects left**: kt objects (label control-by=kt) in the namespace beyond what a healthy session of the
  command owns, once recovered (after a 20 s settle); for the cycles, after the command's last clean.

{self.markdown()}
"""


@pytest.fixture(scope="session")
def fault_table(request: pytest.FixtureRequest):
    table = FaultTable()
    request.config.stash[_KEY] = table
    yield table
    table.wall = (datetime.datetime.now(datetime.UTC) - table.started).total_seconds()
    path = os.environ.get("KTPROXY_FAULTS_MD", str(DEFAULT_PATH))
    if table.rows and path:
        Path(path).write_text(table.document())


_KEY = pytest.StashKey[FaultTable]()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    table = config.stash.get(_KEY, None)
    if table is None or not table.rows:
        return
    terminalreporter.section("fault suite: recovery")
    for text in table.markdown().splitlines():
        terminalreporter.write_line(text)
