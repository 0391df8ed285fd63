"""tests/cluster/up.sh's start + wait_for (T3): the recorded pid is setsid's and becomes the component's
binary only after setsid, nohup and env have exec'd. On a busy machine that takes a while, and wait_for
used to die at once with "<component> exited while waiting". Here a slow `setsid` stand-in (it sleeps,
then execs the real one) starts a copy of sleep(1) as a fake etcd; up.sh's own start and wait_for run
against a state and cache directory under tmp_path: nothing of the real cluster is touched."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "tests" / "cluster"

SCRIPT = r"""
set -euo pipefail
source "$CLUSTER/lib.sh"
# up.sh's process helpers (start, wait_for), without running up.sh itself.
eval "$(sed -n '/^NO_NETWORK_ENV=/,/^api_get()/p' "$CLUSTER/up.sh")"
declare -F start wait_for >/dev/null || { echo "start/wait_for not found in up.sh" >&2; exit 3; }
declare -A RESTART=()
mkdir -p "$RUN" "$LOGS" "$BIN"
cp "$(command -v sleep)" "$BIN/etcd"
trap 'p=$(cat "$RUN/etcd.pid" 2>/dev/null) && kill "$p" 2>/dev/null; true' EXIT
PATH="$FAKE:$PATH"
start etcd "$RUN_FOR"
ready() { [[ -e $STATE/ready ]]; }
( sleep 2; touch "$STATE/ready" ) &
wait_for "fake etcd" 15 etcd ready
echo "running as pid $(pid_of etcd)"
"""


def run(tmp_path: Path, setsid_delay: float, run_for: str = "30") -> subprocess.CompletedProcess[str]:
    fake = tmp_path / "fake"
    fake.mkdir()
    setsid = shutil.which("setsid")
    assert setsid
    (fake / "setsid").write_text(f'#!/bin/bash\nsleep {setsid_delay}\nexec {setsid} "$@"\n')
    (fake / "setsid").chmod(0o755)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "CLUSTER": str(CLUSTER), "FAKE": str(fake), "RUN_FOR": run_for,
           "KTPROXY_CLUSTER_DIR": str(tmp_path / "state"), "KTPROXY_CLUSTER_CACHE": str(tmp_path / "cache")}
    return subprocess.run(["bash", "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("setsid") is None, reason="util-linux setsid missing")
def test_a_slow_exec_chain_is_waited_for(tmp_path):
    res = run(tmp_path, setsid_delay=1.0)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "exited while waiting" not in res.stderr
    assert "running as pid" in res.stdout and "fake etcd: ok" in res.stdout


@pytest.mark.skipif(shutil.which("setsid") is None, reason="util-linux setsid missing")
def test_a_component_that_dies_is_still_reported_at_once(tmp_path):
    res = run(tmp_path, setsid_delay=0.2, run_for="not-a-number")  # sleep(1) refuses it and exits
    assert res.returncode == 1
    assert "etcd exited while waiting for fake etcd" in res.stderr, res.stderr
    assert "invalid time interval" in res.stderr  # the component's log tail comes with it
