"""benchmarks/goals.py and the per-case charts: every compared metric has a goal entry, the verdicts read
the way issue 15 states its goals, and `python -m benchmarks.report --redraw` draws charts/CASE.png from
a results JSON alone."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # benchmarks/ is a top-level package of the repo, not installed
    sys.path.insert(0, str(REPO))

from benchmarks import goals  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def row(metric: str, yardstick: str, unit: str, better: str, *samples: float) -> dict:
    return {"case": "", "metric": metric, "yardstick": yardstick, "unit": unit, "better": better,
            "samples": list(samples), "median": statistics.median(samples), "min": min(samples),
            "max": max(samples), "n": len(samples)}


def fixture_doc(extra_rows: list[dict] | None = None) -> dict:
    loop = [
        row("download, 1 stream", "direct", "MB/s", "higher", 4000, 4100),
        row("download, 1 stream", "ktproxy SOCKS5", "MB/s", "higher", 300, 320),
        row("download, 1 stream", "OpenSSH ssh -D", "MB/s", "higher", 400, 410),
        row("download, 1 stream: proxy CPU", "ktproxy SOCKS5", "CPU-s/GB", "lower", 3.0, 3.2),
        row("download, 1 stream: proxy CPU", "OpenSSH ssh -D", "CPU-s/GB", "lower", 2.6, 2.8),
        row("request/response (keep-alive), 1 client: p99", "ktproxy SOCKS5", "µs", "lower", 300, 320),
        row("request/response (keep-alive), 1 client: p99", "OpenSSH ssh -D", "µs", "lower", 230, 240),
        row("upload, 1 stream", "ktproxy SOCKS5", "MB/s", "higher", 200),
        row("upload, 1 stream", "OpenSSH ssh -D", "MB/s", "higher", 400),
        *(extra_rows or []),
    ]
    mem = [row("client-side process RSS, 1000 connections open", "ktproxy SOCKS5", "MB", "lower", 60, 61),
           row("client-side process RSS, 1000 connections open", "OpenSSH ssh -D", "MB", "lower", 41)]
    case = {"title": "t", "group": "loopback", "status": "ok", "reason": "", "seconds": 1.0, "notes": [],
            "tables": []}
    meta = {"date": "2026-12-01 10:00:00 UTC", "quick": False, "repeat": 2, "seconds": 10.0,
            "command": "python -m benchmarks", "load_before": "0.50 0.40 0.30", "load_after": "0.60 0.50 0.40",
            "machine": {"nproc": 2, "cpu": "Test CPU", "kernel": "6.0",
                        "versions": {"python": "3", "asyncssh": "x", "uvloop": "x", "cryptography": "x",
                                     "openssh": "OpenSSH_9"}}}
    return {"meta": meta, "cases": {"loopback": dict(case, rows=loop), "memory": dict(case, rows=mem)}}


def verdicts(doc: dict, case: str) -> dict[str, goals.Verdict]:
    return {v.metric: v for v in goals.evaluate(case, doc["cases"][case])}


def test_verdicts_read_like_the_issue() -> None:
    doc = fixture_doc()
    v = verdicts(doc, "loopback")
    dl = v["download, 1 stream"]  # 310 vs 405 MB/s, goal >= 1.0x
    assert dl.ratio == pytest.approx(310 / 405) and dl.met is False and dl.goal_text() == "≥ 1x"
    assert (dl.score_lo, dl.score_hi) == (pytest.approx(300 / 410), pytest.approx(320 / 400))
    cpu = v["download, 1 stream: proxy CPU"]  # 3.1 vs 2.7 CPU-s/GB = 1.15x, goal <= 1.3x: met
    assert cpu.met is True and cpu.goal_text() == "≤ 1.3x"
    assert cpu.score == pytest.approx(2.7 / 3.1) and cpu.threshold == pytest.approx(1 / 1.3)
    p99 = v["request/response (keep-alive), 1 client: p99"]  # 310 / 235 = 1.32x <= 1.5x
    assert p99.met is True
    assert v["upload, 1 stream"].goal.limit is None and v["upload, 1 stream"].met_text() == "-"
    assert "direct" not in {x.yardstick for x in v.values()}  # a ceiling, not a yardstick
    mem = verdicts(doc, "memory")["client-side process RSS, 1000 connections open"]
    assert mem.yardstick is None and mem.met is True and mem.goal_text() == "< 150 MB"


def test_goal_table_covers_every_compared_metric_of_the_fixture_and_the_committed_results() -> None:
    doc = fixture_doc()
    for case, c in doc["cases"].items():
        assert goals.missing(case, c) == []
    for path in sorted((REPO / "benchmarks" / "results").glob("*.json")):
        for case, c in json.loads(path.read_text()).get("cases", {}).items():
            assert goals.missing(case, c) == [], path.name


def test_a_metric_with_a_yardstick_and_no_goal_is_reported(tmp_path: Path, monkeypatch, capsys) -> None:
    from benchmarks import report
    new = [row("sideways, 3 streams", "ktproxy SOCKS5", "MB/s", "higher", 1.0),
           row("sideways, 3 streams", "OpenSSH ssh -D", "MB/s", "higher", 1.0)]
    doc = fixture_doc(new)
    # without loopback's catch-all "compared, no goal" entry, only the issue's six goals remain
    monkeypatch.setattr(goals, "GOALS", [g for g in goals.GOALS if (g.case, g.metric) != ("loopback", "*")])
    assert goals.missing("loopback", doc["cases"]["loopback"]) == [
        "loopback: upload, 1 stream (ktproxy SOCKS5 vs OpenSSH ssh -D)",
        "loopback: sideways, 3 streams (ktproxy SOCKS5 vs OpenSSH ssh -D)"]
    (tmp_path / "latest.json").write_text(json.dumps(doc))
    assert report.main(["--check", "--results", str(tmp_path)]) == 1
    assert "no goal in benchmarks/goals.py for loopback: sideways, 3 streams" in capsys.readouterr().err


def test_redraw_draws_one_chart_per_case_from_the_json(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the bench extra (matplotlib) is not installed")
    (tmp_path / "latest.json").write_text(json.dumps(fixture_doc()))
    r = subprocess.run([sys.executable, "-m", "benchmarks.report", "--redraw", "--results", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for case in ("loopback", "memory"):
        png = tmp_path / "charts" / f"{case}.png"
        assert png.exists(), f"{png} not drawn: {r.stderr}"
        assert png.read_bytes()[:8] == PNG
    assert sorted(p.name for p in (tmp_path / "charts").iterdir()) == ["loopback.png", "memory.png"]
    md = (tmp_path / "latest.md").read_text()
    assert "| metric | ktproxy | yardstick | ratio | goal | met? |" in md
    assert "| download, 1 stream | ktproxy SOCKS5: 310 MB/s | OpenSSH ssh -D: 405 MB/s | 0.77x | ≥ 1x | NO |" in md
    assert "(charts/loopback.png)" in md


def test_a_quick_run_does_not_replace_a_full_runs_chart(tmp_path: Path) -> None:
    from benchmarks import charts
    full, quick = fixture_doc(), fixture_doc()
    quick["meta"] = dict(quick["meta"], quick=True, date="2026-12-31 00:00:00 UTC")
    (tmp_path / "latest.json").write_text(json.dumps(full))
    (tmp_path / "partial.json").write_text(json.dumps(quick))
    picked = charts.load_results(tmp_path)
    assert picked["loopback"][2].name == "latest.json"
