"""Results files: latest.md (tables), latest.json (every sample) and latest.png (a chart)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

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
        for title, header, rows in res.tables:
            lines += [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(r) + " |" for r in rows]
            lines.append("")
        for note in res.notes:
            lines.append(f"- {note}")
        if res.notes:
            lines.append("")
    path.write_text("\n".join(lines))


def write_json(path: Path, meta: dict[str, Any], results: list[CaseResult]) -> None:
    doc = {"meta": meta, "cases": {r.name: {
        "title": r.title, "group": r.group, "status": r.status, "reason": r.reason, "seconds": r.seconds,
        "notes": r.notes, "tables": [{"title": t, "header": h, "rows": rows} for t, h, rows in r.tables],
        "rows": [row.to_json() for row in r.rows]} for r in results}}
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False))


def write_png(path: Path, meta: dict[str, Any], results: list[CaseResult]) -> None:
    """One small bar chart per (case, metric): median bars, min-max whiskers, one bar per yardstick."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, list[Row]]] = []
    for res in results:
        by_metric: dict[str, list[Row]] = {}
        for row in res.rows:
            by_metric.setdefault(row.metric, []).append(row)
        panels += [(f"{res.name}: {metric}", rows) for metric, rows in by_metric.items()]
    skipped = [f"{r.name} ({r.status})" for r in results if r.status != "ok"]
    ncols = 4
    nrows = max(1, -(-len(panels) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 3.4 * nrows + 0.8), squeeze=False,
                             layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, rows) in zip(axes.flat, panels, strict=False):
        names = [r.yardstick for r in rows]
        med = [r.median for r in rows]
        err = [[r.median - r.min for r in rows], [r.max - r.median for r in rows]]
        ax.barh(range(len(rows)), med, xerr=err, color=[colors[i % len(colors)] for i in range(len(rows))],
                capsize=3)
        ax.set_yticks(range(len(rows)), names, fontsize=7)
        ax.invert_yaxis()
        unit = rows[0].unit + (" (higher is better)" if rows[0].better == "higher" else " (lower is better)")
        ax.set_xlabel(unit, fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(textwrap.fill(title, 44), fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    m = meta["machine"]
    head = (f"ktproxy benchmarks {meta['date']}{' (QUICK)' if meta['quick'] else ''}: {m['nproc']} CPUs, "
            f"{m['cpu']}, Linux {m['kernel']}; median with min-max of {meta['repeat']}")
    if skipped:
        head += "\nnot measured: " + ", ".join(skipped) + " — reasons in latest.md"
    fig.suptitle(head, fontsize=9)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def write_all(out: Path, meta: dict[str, Any], results: list[CaseResult], stem: str = "latest") -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta, load_after=loadavg())
    md, js, png = out / f"{stem}.md", out / f"{stem}.json", out / f"{stem}.png"
    write_markdown(md, meta, results)
    write_json(js, meta, results)
    write_png(png, meta, results)
    return [md, js, png]


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")
