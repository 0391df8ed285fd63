"""Results files: latest.md (tables, with the goals of benchmarks/goals.py), latest.json (every sample) and
one chart per case, charts/CASE.png (benchmarks/charts.py).

    python -m benchmarks.report --redraw [--results DIR]   # re-write every DIR/*.md and DIR/charts/*.png
                                                           # from DIR/*.json, without re-running anything
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmarks import charts, goals
from benchmarks.harness import CaseResult, Row


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for mod in ("asyncssh", "uvloop", "cryptography"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = "absent"
    try:
        out = subprocess.run(["ssh", "-V"], capture_output=True, text=True, timeout=5)
        versions["openssh"] = (out.stderr or out.stdout).strip()
    except OSError:
        versions["openssh"] = "absent"
    return {"nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(), "versions": versions}


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def fmt(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def case_table(res: CaseResult) -> list[str]:
    """Metrics down, yardsticks across; each cell `median (min-max)`."""
    yardsticks: list[str] = []
    metrics: list[tuple[str, str, str]] = []
    cells: dict[tuple[str, str], Row] = {}
    for row in res.rows:
        if row.yardstick not in yardsticks:
            yardsticks.append(row.yardstick)
        key = (row.metric, row.unit, row.better)
        if key not in metrics:
            metrics.append(key)
        cells[(row.metric, row.yardstick)] = row
    out = ["| metric | unit | " + " | ".join(yardsticks) + " |",
           "|---|---|" + "---|" * len(yardsticks)]
    for metric, unit, better in metrics:
        line = [metric, f"{unit} ({'↑' if better == 'higher' else '↓'})"]
        for y in yardsticks:
            row = cells.get((metric, y))
            if row is None:
                line.append("-")
            elif len(row.samples) == 1:
                line.append(fmt(row.median))
            else:
                line.append(f"**{fmt(row.median)}** ({fmt(row.min)}-{fmt(row.max)})")
        out.append("| " + " | ".join(line) + " |")
    return out


def goals_table(res: CaseResult) -> list[str]:
    """ktproxy against its yardstick on every compared metric, with issue 15's goal (benchmarks/goals.py)."""
    vs = goals.evaluate(res.name, case_doc(res))
    if not vs:
        return []
    out = [f"**Goals** (benchmarks/goals.py; chart: [charts/{res.name}.png](charts/{res.name}.png); ratio = "
           "ktproxy ÷ yardstick, medians of this run)", "",
           "| metric | ktproxy | yardstick | ratio | goal | met? |", "|---|---|---|---|---|---|"]
    for v in vs:
        ours = f"{v.ours}: {fmt(v.ours_value)} {v.unit}"
        yard = "-" if v.yardstick is None else f"{v.yardstick}: {fmt(v.yard_value or 0.0)} {v.unit}"
        out.append(f"| {v.metric} | {ours} | {yard} | {v.ratio_text()} | {v.goal_text()} | {v.met_text()} |")
    return out


def write_markdown(path: Path, meta: dict[str, Any], results: list[CaseResult]) -> None:
    m = meta["machine"]
    v = m["versions"]
    lines = [
        "# ktproxy benchmarks: latest results",
        "",
        f"- Date: {meta['date']} (run took {meta['seconds']:.0f} s){' — QUICK mode: tiny sizes, figures are not meaningful' if meta['quick'] else ''}",  # noqa: E501
        f"- Command: `{meta['command']}`; {meta['repeat']} repetition(s) per measurement; cells are "
        "**median** (min-max); ↑ higher is better, ↓ lower is better.",
        f"- Machine: {m['nproc']} CPUs, {m['cpu']}, Linux {m['kernel']}; load average {meta['load_before']} "
        f"before, {meta['load_after']} after (the machine is shared: compare yardsticks within one run, and "
        "prefer the CPU-s/GB rows, which do not depend on other load).",
        f"- Software: Python {v['python']}, asyncssh {v['asyncssh']}, uvloop {v['uvloop']}, "
        f"cryptography {v['cryptography']}, {v['openssh']}.",
        *(f"- Yardstick {name} not run: {why}" for name, why in meta.get("yardsticks_not_run", {}).items()),
        "",
    ]
    for res in results:
        lines.append(f"## {res.name}: {res.title}")
        lines.append("")
        if res.status != "ok":
            lines.append(f"**{res.status}**: {res.reason}")
            lines.append("")
            if not res.rows:
                continue
        lines += case_table(res)
        lines.append("")
        if gt := goals_table(res):
            lines += [*gt, ""]
        for title, header, rows in res.tables:
            lines += [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(r) + " |" for r in rows]
            lines.append("")
        for note in res.notes:
            lines.append(f"- {note}")
        if res.notes:
            lines.append("")
    path.write_text("\n".join(lines))


def case_doc(r: CaseResult) -> dict[str, Any]:
    return {"title": r.title, "group": r.group, "status": r.status, "reason": r.reason, "seconds": r.seconds,
            "notes": r.notes, "tables": [{"title": t, "header": h, "rows": rows} for t, h, rows in r.tables],
            "rows": [row.to_json() for row in r.rows]}


def write_json(path: Path, meta: dict[str, Any], results: list[CaseResult]) -> None:
    doc = {"meta": meta, "cases": {r.name: case_doc(r) for r in results}}
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False))


def read_json(path: Path) -> tuple[dict[str, Any], list[CaseResult]]:
    """The inverse of write_json: (meta, results) as the run had them."""
    doc = json.loads(path.read_text())
    results = []
    for name, c in doc["cases"].items():
        rows = [Row(r.get("case", name), r["metric"], r["yardstick"], r["unit"], r["better"], list(r["samples"]))
                for r in c.get("rows", [])]
        results.append(CaseResult(name, c["title"], c["group"], c["status"], c["reason"], c["seconds"], rows,
                                  list(c["notes"]), [(t["title"], t["header"], t["rows"]) for t in c["tables"]]))
    return doc["meta"], results


def write_all(out: Path, meta: dict[str, Any], results: list[CaseResult], stem: str = "latest") -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta, load_after=loadavg())
    md, js = out / f"{stem}.md", out / f"{stem}.json"
    write_markdown(md, meta, results)
    write_json(js, meta, results)
    # Charts from every results file in `out` (per case the newest full run), this run's included.
    return [md, js, *charts.redraw(out)]


def redraw(results: Path) -> list[Path]:
    """Re-write every results/*.md from its .json, and the charts; measures nothing."""
    written = []
    for js in sorted(results.glob("*.json")):
        try:
            meta, res = read_json(js)
        except (OSError, ValueError, KeyError):
            continue  # not a results file of this harness
        md = js.with_suffix(".md")
        write_markdown(md, meta, res)
        written.append(md)
    return written + charts.redraw(results)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n")[0])
    p.add_argument("--redraw", action="store_true", help="re-write the .md files and charts/ from the .json files")
    p.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results",
                   help="results directory (default benchmarks/results)")
    p.add_argument("--check", action="store_true",
                   help="exit 1 when a compared metric has no entry in benchmarks/goals.py")
    args = p.parse_args(argv)
    rc = 0
    for case, (_, doc, src) in sorted(charts.load_results(args.results).items()):
        for m in goals.missing(case, doc):
            print(f"report: no goal in benchmarks/goals.py for {m} ({src.name})", file=sys.stderr)
            rc = 1 if args.check else rc
    if args.redraw:
        for path in redraw(args.results):
            print(f"report: wrote {path}", file=sys.stderr)
    elif not args.check:
        p.print_help()
    return rc


if __name__ == "__main__":
    raise SystemExit(main())


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")
