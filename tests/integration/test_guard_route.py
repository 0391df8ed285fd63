"""The shared guard routes (T4): an integration run adds `unreachable` routes for the tests' ranges, or
finds them there from a run that started earlier. A run must not delete them when it ends: the run that
found them relies on them. Checked with the real conftest in a network namespace of its own (a sandbox),
so the routes this machine's other runs use are never touched."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from itlib import CLUSTER_CIDR6, GUARD_ROUTE, HERE, REPO, sh

INNER_TEST = '''
from itlib import sh


def test_uses_the_namespace(netns):
    assert sh(*netns.exec("ip", "addr", "show", "lo")).returncode == 0
'''


def test_a_run_leaves_the_guard_routes_for_the_others(netns, tmp_path: Path) -> None:
    # netns: this run's namespace exists, so "another run relies on the guard" is true for the inner run.
    sandbox = f"ktp-guard-{os.getpid()}"
    inner = tmp_path / "inner"
    inner.mkdir()
    for f in ("conftest.py", "itlib.py", "ns_services.py"):
        shutil.copy(HERE / f, inner / f)
    (inner / "test_inner.py").write_text(INNER_TEST)
    sh("ip", "netns", "add", sandbox)
    try:
        sh("ip", "-n", sandbox, "link", "set", "lo", "up")
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "KTPROXY_REQUIRE_LEVELS"}
        env["PYTHONPATH"] = str(REPO)
        # The inner run starts with no guard in the sandbox, so it is the run that adds it.
        res = subprocess.run(["ip", "netns", "exec", sandbox, sys.executable, "-m", "pytest", "-q",
                              "-p", "no:cacheprovider", "--rootdir", str(inner), str(inner)],
                             cwd=inner, env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
        routes = sh("ip", "-n", sandbox, "route", "show").stdout
        routes6 = sh("ip", "-n", sandbox, "-6", "route", "show").stdout
        assert f"unreachable {GUARD_ROUTE}" in routes, routes
        assert f"unreachable {CLUSTER_CIDR6}" in routes6, routes6
    finally:
        sh("ip", "netns", "del", sandbox, check=False)
