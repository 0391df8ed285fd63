"""The level gate (tests/conftest.py, T2): with KTPROXY_REQUIRE_LEVELS set, as `make test` sets it, a level
that skipped for want of its environment or ran no test fails the run with one line naming the level and
the reason; without it, plain pytest still skips. Each case runs pytest in a subprocess on the real
tests with the environment taken away."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_pytest(*args: str, gate: str | None, **env: str) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if k != "KTPROXY_REQUIRE_LEVELS"}
    if gate is not None:
        e["KTPROXY_REQUIRE_LEVELS"] = gate
    e.update(env)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          cwd=REPO, env=e, capture_output=True, text=True, timeout=120)


def gate_lines(res: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in res.stdout.splitlines() if line.startswith("make test: level ")]


@pytest.fixture
def no_cluster(tmp_path: Path) -> dict[str, str]:
    return {"KTPROXY_CLUSTER_DIR": str(tmp_path / "no-cluster"), "KTPROXY_E2E_API_WAIT": "0"}


def test_e2e_without_a_cluster_fails_under_the_gate(no_cluster):
    res = run_pytest("tests/e2e/test_cluster_ready.py", gate="unit,integration,e2e", **no_cluster)
    assert res.returncode == 1, res.stdout[-2000:]
    lines = gate_lines(res)
    e2e = [line for line in lines if line.startswith("make test: level e2e ")]
    assert len(e2e) == 1, res.stdout[-2000:]
    assert "skipped" in e2e[0] and "kubeconfig missing" in e2e[0], e2e
    # unit and integration were promised too and not collected at all
    assert any("level unit did not run: no test collected" in line for line in lines), lines
    assert any("level integration did not run: no test collected" in line for line in lines), lines


def test_e2e_without_a_cluster_still_skips_without_the_gate(no_cluster):
    res = run_pytest("tests/e2e/test_cluster_ready.py", gate=None, **no_cluster)
    assert res.returncode == 0, res.stdout[-2000:]
    assert " skipped" in res.stdout and not gate_lines(res)


def test_pac_parity_without_node_fails_under_the_gate(tmp_path):
    # A PATH without node (python runs by its absolute path).
    res = run_pytest("tests/unit/test_pac.py", gate="unit", PATH=str(tmp_path))
    assert res.returncode == 1, res.stdout[-2000:]
    assert gate_lines(res) and "level unit skipped" in gate_lines(res)[0], res.stdout[-2000:]
    assert "node (Node.js) is not on PATH" in gate_lines(res)[0]


def test_a_level_that_passes_is_fine_and_an_unknown_level_is_not():
    res = run_pytest("tests/unit/test_test_layout.py", gate="unit")
    assert res.returncode == 0 and not gate_lines(res), res.stdout[-2000:]
    res = run_pytest("tests/unit/test_test_layout.py", gate="unit,e2d")
    assert res.returncode == 1
    assert gate_lines(res) == ["make test: level e2d did not run: unknown level (known: unit, integration, e2e)"]


def load_e2e_conftest(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    spec = importlib.util.spec_from_file_location("e2e_conftest_under_test", REPO / "tests/e2e/conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    (tmp_path / "bin").mkdir()
    (tmp_path / "kubeconfig").write_text("{}")
    (tmp_path / "bin" / "kubectl").write_text("")
    monkeypatch.setattr(mod, "KUBECONFIG", tmp_path / "kubeconfig")
    monkeypatch.setattr(mod, "KUBECTL_DIR", tmp_path / "bin")
    monkeypatch.setattr(mod.time, "sleep", lambda s: None)
    return mod


def test_e2e_readyz_is_asked_again_before_the_cluster_counts_as_absent(monkeypatch, tmp_path):
    mod = load_e2e_conftest(monkeypatch, tmp_path)
    answers = iter([(1, "connection refused"), (1, "etcd not ready"), (0, "")])
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        rc, err = next(answers)
        return subprocess.CompletedProcess(cmd, rc, "", err)

    monkeypatch.setattr(mod.subprocess, "run", fake_run)
    assert mod._api_problem() is None
    assert len(calls) == 3 and all("/readyz" in c for c in calls)


def test_e2e_readyz_gives_up_after_its_deadline(monkeypatch, tmp_path):
    mod = load_e2e_conftest(monkeypatch, tmp_path)
    clock = [0.0]
    monkeypatch.setattr(mod.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(mod.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    monkeypatch.setattr(mod.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "connection refused"))
    problem = mod._api_problem()
    assert problem and "cluster API not ready (connection refused)" in problem
    assert 0 < clock[0] <= mod.API_WAIT
