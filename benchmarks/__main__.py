"""`python -m benchmarks [--quick] [--case NAME...] [--repeat N] [--out DIR]` (what `make bench` runs).

Writes DIR/latest.md, latest.json and DIR/charts/CASE.png (DIR defaults to benchmarks/results); a run of some
cases only (--case) writes DIR/partial.* instead. Exit status 1 when a case failed (skips are not
failures).

Before measuring, every yardstick the selected cases need is made ready where it can be
(benchmarks/yardsticks.py: apt-get install of openssh-server/openssh-client and nginx-light as root;
kt-connect v0.3.7 built from its Go module source when a cluster is up); not in --quick, nor with
--no-install. At the end, one line per yardstick that did not run: `bench: yardstick X not run: <why>`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import cases  # noqa: F401  (registers the cases)
from benchmarks.harness import CASES, Context
from benchmarks.report import loadavg, machine, now, write_all

RESULTS = Path(__file__).resolve().parent / "results"


def ordered() -> list[str]:
    return [n for n, c in CASES.items() if c.group != "cluster"] + [n for n, c in CASES.items() if c.group == "cluster"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repetition: checks the harness works")
    p.add_argument("--case", nargs="+", metavar="NAME", help=f"only these cases: {', '.join(ordered())}")
    p.add_argument("--repeat", type=int, help="repetitions per measurement (default 3, --quick 1)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory (default benchmarks/results)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--no-install", action="store_true",
                   help="install and build no yardstick (default: apt-get / build what is missing; --quick never)")
    args = p.parse_args(argv)
    if args.list:
        for name in ordered():
            print(f"{name:20} {CASES[name].title}")
        return 0
    names = args.case or ordered()
    unknown = [n for n in names if n not in CASES]
    if unknown:
        p.error(f"unknown case(s): {', '.join(unknown)} (known: {', '.join(ordered())})")
    repeat = args.repeat or (1 if args.quick else 3)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    start = time.monotonic()
    meta = {"date": now(), "quick": args.quick, "repeat": repeat, "machine": machine(),
            "load_before": loadavg(),
            "command": "python -m benchmarks" + ("" if argv is None and len(sys.argv) == 1 else " ")
            + shlex.join(sys.argv[1:] if argv is None else argv)}
    with tempfile.TemporaryDirectory(prefix="ktproxy-bench-") as tmp:
        ctx = Context(Path(tmp), args.quick, repeat, log)
        ctx.yardsticks.prepare(names, install=not (args.no_install or args.quick), quick=args.quick, log=log)
        try:
            ctx.run([CASES[n] for n in names])
        except KeyboardInterrupt:
            log("[bench] interrupted: writing what was measured")
        meta["seconds"] = time.monotonic() - start
        meta["yardsticks_not_run"] = dict(ctx.yardsticks.missing)
        results = list(ctx.results.values())
        # A run of some cases only must not replace the full table: it goes to partial.*.
        stem = "latest" if set(names) == set(CASES) else "partial"
        for path in write_all(args.out, meta, results, stem):
            log(f"[bench] wrote {path}")
    for line in ctx.yardsticks.lines():  # one line each, after the noise of the run
        log(line)
    failed = [r.name for r in results if r.status == "failed"]
    if failed:
        log(f"[bench] FAILED: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
