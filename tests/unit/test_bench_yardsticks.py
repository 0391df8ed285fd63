"""benchmarks/yardsticks.py: each yardstick that cannot run is reported in exactly one line,
`bench: yardstick X not run: <why>`, whether it was missing before the run or failed in a case."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # benchmarks/ is a top-level package of the repo, not installed
    sys.path.insert(0, str(REPO))

from benchmarks import yardsticks  # noqa: E402
from benchmarks.yardsticks import Yardsticks  # noqa: E402


def quiet(_: str) -> None:
    pass


def test_nginx_missing_on_path_is_one_line_without_install(tmp_path: Path) -> None:
    y = Yardsticks()
    y.prepare(["mesh", "cluster-mesh"], install=False, path=str(tmp_path), log=quiet)
    assert [ln for ln in y.lines() if " nginx " in ln] == [
        "bench: yardstick nginx not run: nginx not found (Debian: nginx-light); not installing (--no-install)"]


def test_nginx_missing_and_apt_failing_is_one_line(tmp_path: Path) -> None:
    tried = []

    def apt(pkgs):
        tried.append(list(pkgs))
        return "apt-get install nginx-light failed: E: Unable to locate package nginx-light"

    y = Yardsticks()
    y.prepare(["mesh"], install=True, path=str(tmp_path), apt=apt, log=quiet)
    assert tried == [["nginx-light"]]
    assert y.lines() == ["bench: yardstick nginx not run: nginx not found and apt-get install nginx-light failed: "
                         "E: Unable to locate package nginx-light"]


def test_apt_installs_and_the_check_passes_then_nothing_is_reported(tmp_path: Path) -> None:
    fake = tmp_path / "nginx"

    def apt(pkgs):  # stands in for apt-get: "installs" nginx on the searched path
        fake.write_text("#!/bin/sh\n")
        fake.chmod(0o755)
        return None

    y = Yardsticks()
    y.prepare(["mesh"], install=True, path=str(tmp_path), apt=apt, log=quiet)
    assert y.lines() == []


def test_openssh_missing_is_one_line_even_for_two_cases(tmp_path: Path) -> None:
    y = Yardsticks()
    y.prepare(["loopback", "memory"], install=False, path=str(tmp_path), log=quiet)
    lines = [ln for ln in y.lines() if "OpenSSH" in ln]
    assert len(lines) == 1 and lines[0].startswith("bench: yardstick OpenSSH ssh -D not run: ")
    assert "\n" not in lines[0]


def test_no_cluster_names_each_cluster_yardstick_once(monkeypatch) -> None:
    why = "no cluster (.cluster/kubeconfig missing: make cluster-up)"
    monkeypatch.setattr(yardsticks, "check_cluster", lambda: why)
    y = Yardsticks()
    y.prepare(["cluster-dataplane", "cluster-dns", "cluster-startup", "cluster-reverse"], install=False, log=quiet)
    assert y.lines() == [f"bench: yardstick {n} not run: no cluster (.cluster/kubeconfig missing: make cluster-up)"
                         for n in ("kubectl port-forward", "kt-connect v0.3.7", "CoreDNS")]


def test_ktconnect_build_failure_is_its_reason(monkeypatch) -> None:
    monkeypatch.setattr(yardsticks, "check_cluster", lambda: None)
    y = Yardsticks()
    y.prepare(["cluster-startup"], install=True, log=quiet,
              ktconnect_available=lambda: (False, "kt-connect could not be built: no 'go' on PATH"))
    assert y.lines() == ["bench: yardstick kt-connect v0.3.7 not run: kt-connect could not be built: no 'go' on PATH"]


def test_the_run_reports_each_yardstick_once_first_reason_first(tmp_path: Path) -> None:
    from benchmarks.harness import Case, Context, Skip

    ctx = Context(tmp_path, quick=True, repeat=1, log=quiet)
    ctx.yardsticks.prepare(["mesh"], install=False, path=str(tmp_path), log=quiet)

    def loopback(c: Context) -> None:
        c.yardstick_missing(yardsticks.OPENSSH, "sshd did not start:\nport in use")
        c.yardstick_missing(yardsticks.OPENSSH, "again")

    def mesh(c: Context) -> None:
        raise Skip("nginx not found (Debian: nginx-light)")

    ctx.run([Case("loopback", "t", loopback, "loopback"), Case("memory", "t", loopback, "loopback"),
             Case("mesh", "t", mesh, "loopback")])
    assert ctx.yardsticks.lines() == [
        "bench: yardstick nginx not run: nginx not found (Debian: nginx-light); not installing (--no-install)",
        "bench: yardstick OpenSSH ssh -D not run: sshd did not start: port in use"]
    assert "OpenSSH ssh -D yardstick skipped: sshd did not start:\nport in use" in ctx.results["loopback"].notes
