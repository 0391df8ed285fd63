"""`python -m benchmarks --quick` must keep working: it writes the table, the JSON and one chart per case, with rows
for every case that can run here and a reason for every case that cannot. Never asserts a speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # benchmarks/ is a top-level package of the repo, not installed
    sys.path.insert(0, str(REPO))
pytest.importorskip("matplotlib", reason="the bench extra (matplotlib) is not installed")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    return out, proc


def test_quick_run_succeeds(quick_run) -> None:
    out, proc = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("latest.md", "latest.json"):
        assert (out / name).stat().st_size > 0, name
    assert not (out / "latest.png").exists()  # one chart per case now, not one image of every panel
    assert (out / "charts" / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_case_has_rows_or_a_reason(quick_run) -> None:
    out, _ = quick_run
    from benchmarks import cases  # noqa: F401
    from benchmarks.harness import CASES

    doc = json.loads((out / "latest.json").read_text())
    assert set(doc["cases"]) == set(CASES)
    md = (out / "latest.md").read_text()
    for name, res in doc["cases"].items():
        assert f"## {name}:" in md
        if res["status"] == "skipped":
            assert res["reason"], name
            assert res["reason"] in md
            continue
        assert res["status"] == "ok", (name, res["reason"])
        assert res["rows"], name
        for row in res["rows"]:
            assert row["samples"] and row["min"] <= row["median"] <= row["max"], row
            assert row["metric"] in md


def test_loopback_measures_every_yardstick_and_metric(quick_run) -> None:
    out, _ = quick_run
    rows = json.loads((out / "latest.json").read_text())["cases"]["loopback"]["rows"]
    yardsticks = {r["yardstick"] for r in rows}
    assert {"direct", "ktproxy SOCKS5", "ktproxy HTTP CONNECT"} <= yardsticks
    metrics = {r["metric"] for r in rows}
    for m in ("download, 1 stream", "download, 64 streams (aggregate)",
              "request/response (keep-alive), 1 client: p99", "request/response (keep-alive), 100 clients: rate"):
        assert m in metrics
    if "OpenSSH ssh -D" not in yardsticks:  # allowed only where OpenSSH is missing, and then said so
        notes = json.loads((out / "latest.json").read_text())["cases"]["loopback"]["notes"]
        assert any("OpenSSH ssh -D yardstick skipped" in n for n in notes)


def test_cluster_cases_run_or_skip_with_the_right_reason(quick_run) -> None:
    """Asserts with and without a cluster: without .cluster/kubeconfig every cluster case skips saying
    so; with it, none claims the kubeconfig is missing, and under `make test` (which brought the cluster
    up and promises the e2e level) every cluster case that --quick runs at all must have run."""
    out, _ = quick_run
    doc = json.loads((out / "latest.json").read_text())
    cluster = {n: r for n, r in doc["cases"].items() if r["group"] == "cluster"}
    assert cluster
    has_kubeconfig = (REPO / ".cluster" / "kubeconfig").exists()
    cluster_promised = "e2e" in os.environ.get("KTPROXY_REQUIRE_LEVELS", "").split(",")
    for name, res in cluster.items():
        reason = res["reason"] or ""
        if reason.startswith("not run in --quick"):  # left out by --quick, cluster or not
            assert res["status"] == "skipped", name
        elif not has_kubeconfig:
            assert (res["status"], reason) == ("skipped", "cluster not up: .cluster/kubeconfig missing"), name
        elif cluster_promised:
            assert res["status"] == "ok" and res["rows"], (name, res["status"], reason)
        else:
            assert res["status"] == "ok" or reason.startswith("cluster not up: "), (name, res["status"], reason)
            assert reason != "cluster not up: .cluster/kubeconfig missing", name
