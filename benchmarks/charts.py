"""One chart per case, drawn from the results JSON files alone (no re-run): results/charts/CASE.png.

Each bar is one goal of benchmarks/goals.py: ktproxy's median against its yardstick's median in the same
run, as a score where higher is better everywhere (ours / yardstick for rates, yardstick / ours for
latency, CPU, time and memory: those bars are marked "inverted"). The goal is a dashed line over its
bar; the bar is green when met, red when not. Whiskers span the worst and best pairing of the samples.

    python -m benchmarks.report --redraw        # every results/*.json -> results/charts/*.png and *.md
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Any

from benchmarks import goals

MET, MISSED, UNJUDGED = "#2e8b57", "#d1495b", "#9a9a9a"


def load_results(results: Path) -> dict[str, tuple[dict[str, Any], dict[str, Any], Path]]:
    """case -> (meta, case doc, file) from every *.json in `results`: per case the newest full-size run
    that measured it (a --quick run only when there is nothing else)."""
    best: dict[str, tuple[tuple[bool, str], dict[str, Any], dict[str, Any], Path]] = {}
    for path in sorted(results.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict) or "cases" not in doc or "meta" not in doc:
            continue
        meta = doc["meta"]
        for name, case_doc in doc["cases"].items():
            if not case_doc.get("rows"):
                continue
            key = (not meta.get("quick", False), str(meta.get("date", "")))
            if name not in best or key > best[name][0]:
                best[name] = (key, meta, case_doc, path)
    return {n: (m, c, p) for n, (_, m, c, p) in best.items()}


def _label(v: goals.Verdict, several: bool) -> str:
    text = "\n".join(textwrap.wrap(v.metric, 16))
    if v.yardstick is None:
        text += f"\n({v.goal.short} ÷ ours: {v.ours_value:.3g} {v.unit})"
    else:
        if several:
            text += f"\nvs {v.goal.short or v.yardstick}"
        if v.better == "lower":
            text += "\n(inverted)"
    return text + f"\ngoal {v.goal_text()}"


def _fmt(x: float) -> str:
    return f"{x:.2f}x" if x < 10 else f"{x:.0f}x"


def subtitle(meta: dict[str, Any], source: Path | None) -> str:
    m = meta.get("machine", {})
    load = f"load average {meta.get('load_before', '?')} before, {meta.get('load_after', '?')} after"
    quick = " — QUICK run: sizes too small to mean anything" if meta.get("quick") else ""
    src = f" ({source.name})" if source else ""
    return (f"{meta.get('date', '?')}{src}: {m.get('nproc', '?')} CPUs, {m.get('cpu', '?')}, "
            f"Linux {m.get('kernel', '?')}; {load}{quick}")


def draw_case(path: Path, case: str, case_doc: dict[str, Any], meta: dict[str, Any],
              source: Path | None = None) -> bool:
    """Draw `case`'s chart to `path`; False (nothing written) when the case has no goal to draw."""
    vs = [v for v in goals.evaluate(case, case_doc) if v.goal.limit is not None and v.score is not None]
    if not vs:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    several = len({v.goal.short for v in vs}) > 1
    n = len(vs)
    width = max(8.0, 1.15 * n + 2.0)
    wrap = int(width * 100 / 8.5)  # characters of a 10-point title line, with room to spare
    fig, ax = plt.subplots(figsize=(width, 6.4), layout="constrained")
    xs = list(range(n))
    scores = [v.score or 0.0 for v in vs]
    colors = [UNJUDGED if v.met is None else (MET if v.met else MISSED) for v in vs]
    ax.bar(xs, scores, width=0.62, color=colors, zorder=2)
    for x, v in zip(xs, vs, strict=True):
        if v.score_lo is not None and v.score_hi is not None:
            ax.plot([x, x], [v.score_lo, v.score_hi], color="#333333", lw=1, zorder=3)
        t = v.threshold or 1.0
        ax.plot([x - 0.42, x + 0.42], [t, t], color="black", ls="--", lw=1.6, zorder=4)
        ax.annotate(_fmt(v.score or 0.0), (x, v.score or 0.0), xytext=(0, 3), textcoords="offset points",
                    ha="center", va="bottom", fontsize=9, fontweight="bold", zorder=5,
                    bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.85))
    ax.axhline(1.0, color="#555555", lw=0.8, zorder=1)
    ax.set_yscale("log")
    lo = min([*scores, *(v.threshold or 1 for v in vs), *(v.score_lo or 1 for v in vs)])
    hi = max([*scores, *(v.threshold or 1 for v in vs), *(v.score_hi or 1 for v in vs)])
    ax.set_ylim(2 ** math.floor(math.log2(lo) - 0.3), 2 ** math.ceil(math.log2(hi) + 0.3))
    ticks = [t for t in (0.0625, 0.125, 0.25, 0.5, 0.67, 0.8, 1, 1.25, 1.5, 2, 4, 8, 16, 32)
             if ax.get_ylim()[0] <= t <= ax.get_ylim()[1]]
    ax.set_yticks(ticks, [f"{t:g}x" for t in ticks], fontsize=9)
    ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.grid(axis="y", color="#dddddd", zorder=0)
    ax.set_xticks(xs, [_label(v, several) for v in vs], fontsize=8)
    ax.set_xlim(-0.6, n - 0.4)
    yards = ", ".join(dict.fromkeys(v.yardstick for v in vs if v.yardstick))
    ours = ", ".join(dict.fromkeys(v.ours for v in vs))
    ax.set_ylabel("ktproxy vs yardstick, higher is better\n(ours ÷ yardstick; inverted: yardstick ÷ ours)",
                  fontsize=9)
    met = sum(1 for v in vs if v.met)
    title = (f"{case}: {met} of {n} goals met — {ours} vs {yards}" if yards
             else f"{case}: {met} of {n} goals met — {ours}")
    ax.set_title("\n".join([*textwrap.wrap(title, wrap), *textwrap.wrap(subtitle(meta, source), wrap)]), fontsize=10)
    ax.legend(handles=[Patch(color=MET, label="goal met"), Patch(color=MISSED, label="goal missed"),
                       Line2D([], [], color="black", ls="--", label="goal"),
                       Line2D([], [], color="#333333", lw=1, label="range over samples")],
              fontsize=8, loc="upper right", framealpha=0.9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def redraw(results: Path, charts: Path | None = None) -> list[Path]:
    """Every case with goals in `results`/*.json -> `charts`/CASE.png (default results/charts)."""
    charts = charts or results / "charts"
    written = []
    for case, (meta, case_doc, src) in sorted(load_results(results).items()):
        out = charts / f"{case}.png"
        if draw_case(out, case, case_doc, meta, src):
            written.append(out)
    return written
