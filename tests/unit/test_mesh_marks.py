"""Mesh marks (issue 10 item 6): what `ktctl mesh --auto-header` publishes and how connect's proxy reads it.

Real files in a temporary directory and real processes for liveness (a child that publishes, then is
SIGKILLed); no mocks of the file system.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from ktproxy.mesh import marks as mesh_marks
from ktproxy.mesh.marks import Mark, MeshMarks, publish, withdraw

HEADER = ("version", "abcde")


@pytest.fixture
def marks_dir(tmp_path: Path) -> Path:
    return tmp_path / "state" / "mesh-marks"


def _publish(d: Path, namespace: str = "default", service: str = "tomcat", cluster_ip: str | None = "10.96.5.5",
             ports: list[int] | None = None, key: str = "version", value: str = "abcde") -> Path:
    return publish(namespace, service, cluster_ip, ports or [8080], key, value, directory=d)


def _age(d: Path, seconds: float = 60) -> None:
    """Make the directory's mtime old: a listing of it is then trusted until the mtime changes."""
    st = os.stat(d)
    old = st.st_mtime_ns - int(seconds * 1e9)
    os.utime(d, ns=(old, old))


# -- publish / withdraw -----------------------------------------------------------------------------------
def test_publish_writes_a_private_file_with_this_pid(marks_dir: Path) -> None:
    old = os.umask(0o022)
    try:
        path = _publish(marks_dir)
    finally:
        os.umask(old)
    assert path.parent == marks_dir
    assert stat.S_IMODE(os.stat(marks_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(marks_dir.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    data = json.loads(path.read_text())
    assert data["pid"] == os.getpid() and data["started"] == mesh_marks.process_start(os.getpid())
    mark = Mark.from_json(path.read_text())
    assert (mark.namespace, mark.service, mark.cluster_ip, mark.ports, mark.header) == \
        ("default", "tomcat", "10.96.5.5", (8080,), HEADER)
    assert [p.name for p in marks_dir.iterdir()] == [path.name]  # no temporary file left
    withdraw(path)
    assert not path.exists()
    withdraw(path)  # already gone: fine


def test_publish_tightens_an_existing_directory(marks_dir: Path) -> None:
    marks_dir.mkdir(parents=True, mode=0o755)
    os.chmod(marks_dir, 0o755)
    _publish(marks_dir)
    assert stat.S_IMODE(os.stat(marks_dir).st_mode) == 0o700


@pytest.mark.parametrize("kwargs", [
    {"key": "version\r\nx-evil"}, {"value": "abc\r\nX-Evil: 1"}, {"value": "ABCDE"}, {"value": ""},
    {"key": ""}, {"key": "Version"}, {"namespace": "Bad_NS"}, {"service": "a.b"}, {"ports": [0]},
    {"ports": [70000]}, {"cluster_ip": "10.96.5"},
])
def test_publish_refuses_what_no_proxy_would_apply(marks_dir: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        _publish(marks_dir, **kwargs)
    assert not marks_dir.exists()  # nothing left behind, not even the directory


def test_publish_accepts_a_service_without_cluster_ip(marks_dir: Path) -> None:
    for none in (None, "", "None"):  # headless services: kubectl shows "None"
        assert Mark.from_json(_publish(marks_dir, cluster_ip=none).read_text()).cluster_ip is None


def test_publish_is_atomic_a_failed_write_leaves_the_old_mark_whole(marks_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = _publish(marks_dir)
    before = path.read_text()

    def broken(fd: int, mode: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fchmod", broken)
    with pytest.raises(OSError):
        _publish(marks_dir, ports=[8080, 9090])  # the same file name: an in-place write would truncate it
    assert path.read_text() == before
    assert sorted(p.name for p in marks_dir.iterdir()) == [path.name]  # the temporary file is gone too


def test_publish_refuses_a_directory_that_is_a_symlink(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "state").mkdir(mode=0o700)
    (tmp_path / "state" / "mesh-marks").symlink_to(elsewhere)
    with pytest.raises(PermissionError):
        _publish(tmp_path / "state" / "mesh-marks")
    assert list(elsewhere.iterdir()) == []


# -- matching ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("host", [
    "tomcat", "TOMCAT", "tomcat.", "tomcat.default", "tomcat.default.svc", "tomcat.default.svc.cluster.local",
    "tomcat.default.svc.cluster.local.", "10.96.5.5",
])
def test_names_of_the_service_in_connects_namespace(marks_dir: Path, host: str) -> None:
    _publish(marks_dir)
    assert MeshMarks("default", "cluster.local", marks_dir).header_for(host, 8080) == HEADER


@pytest.mark.parametrize("host,port", [
    ("tomcat", 9090), ("tomcat2", 8080), ("other.default", 8080), ("tomcat.default.svc.other.domain", 8080),
    ("tomcat.other", 8080), ("10.96.5.6", 8080), ("tomcat.default.cluster.local", 8080), ("example.com", 80),
])
def test_other_targets_get_nothing(marks_dir: Path, host: str, port: int) -> None:
    _publish(marks_dir)
    assert MeshMarks("default", "cluster.local", marks_dir).header_for(host, port) is None


def test_short_name_only_in_connects_namespace(marks_dir: Path) -> None:
    _publish(marks_dir, namespace="team-a")
    in_default = MeshMarks("default", "cluster.local", marks_dir)
    assert in_default.header_for("tomcat", 8080) is None  # connect's `tomcat` is default's tomcat
    assert in_default.header_for("tomcat.team-a", 8080) == HEADER
    assert MeshMarks("team-a", "cluster.local", marks_dir).header_for("tomcat", 8080) == HEADER


def test_cluster_domain_and_ipv6_and_several_ports(marks_dir: Path) -> None:
    _publish(marks_dir, cluster_ip="fd00:10:96::5", ports=[80, 8443])
    marks = MeshMarks("default", "corp.internal", marks_dir)
    assert marks.header_for("tomcat.default.svc.corp.internal", 80) == HEADER
    assert marks.header_for("tomcat.default.svc.cluster.local", 80) is None
    assert marks.header_for("[FD00:10:96:0::5]", 8443) == HEADER
    assert marks.header_for("fd00:10:96::5", 8080) is None


def test_newest_mark_of_a_service_wins(marks_dir: Path) -> None:
    older = _publish(marks_dir, value="first")
    os.utime(older, ns=(1, 1))
    _publish(marks_dir, value="second")
    assert MeshMarks("default", "cluster.local", marks_dir).header_for("tomcat", 8080) == ("version", "second")


# -- reading: cheap and current ------------------------------------------------------------------------------
def test_directory_is_listed_only_when_its_mtime_changes(marks_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loads = []
    real = MeshMarks._load

    def counting(self: MeshMarks) -> list:
        loads.append(1)
        return real(self)

    monkeypatch.setattr(MeshMarks, "_load", counting)
    marks = MeshMarks("default", "cluster.local", marks_dir)
    assert marks.header_for("tomcat", 8080) is None  # no directory yet: nothing listed
    path = _publish(marks_dir)
    _age(marks_dir)
    for _ in range(50):
        assert marks.header_for("tomcat", 8080) == HEADER
    assert len(loads) == 1
    withdraw(path)  # the directory's mtime moves: listed again
    assert marks.header_for("tomcat", 8080) is None
    assert len(loads) == 2


def test_a_change_in_the_same_mtime_tick_is_still_seen(marks_dir: Path) -> None:
    """Directory mtimes are coarse: a mark published in the same tick as the last listing leaves the
    mtime as it was; a listing that recent is not trusted."""
    _publish(marks_dir, service="first")
    marks = MeshMarks("default", "cluster.local", marks_dir)
    assert marks.header_for("first", 8080) == HEADER
    tick = os.stat(marks_dir).st_mtime_ns
    _publish(marks_dir, service="second")
    os.utime(marks_dir, ns=(tick, tick))
    assert marks.header_for("second", 8080) == HEADER


def test_unreadable_or_foreign_files_are_ignored(marks_dir: Path, tmp_path: Path) -> None:
    _publish(marks_dir, service="good")
    good = json.loads(next(marks_dir.glob("*.json")).read_text())
    injected = {**good, "service": "evil", "value": "abc\r\nX-Evil: 1"}
    (marks_dir / "evil.json").write_text(json.dumps(injected))
    (marks_dir / "broken.json").write_text("{not json")
    (marks_dir / "big.json").write_text(json.dumps({**good, "service": "big", "pad": "x" * 20000}))
    (marks_dir / ".hidden.json.tmp").write_text(json.dumps({**good, "service": "hidden"}))
    (marks_dir / ".hidden.json").write_text(json.dumps({**good, "service": "hidden"}))
    target = tmp_path / "linked.json"
    target.write_text(json.dumps({**good, "service": "linked"}))
    (marks_dir / "linked.json").symlink_to(target)
    marks = MeshMarks("default", "cluster.local", marks_dir)
    assert marks.header_for("good", 8080) == HEADER
    for name in ("evil", "big", "hidden", "linked"):
        assert marks.header_for(name, 8080) is None, name


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")
def test_another_users_file_is_ignored(marks_dir: Path) -> None:
    path = _publish(marks_dir)
    os.chown(path, 65534, 65534)
    assert MeshMarks("default", "cluster.local", marks_dir).header_for("tomcat", 8080) is None


def test_logs_once_when_a_mark_starts_applying_and_once_when_it_ends(marks_dir: Path,
                                                                    kt_log: pytest.LogCaptureFixture) -> None:
    path = _publish(marks_dir)
    marks = MeshMarks("default", "cluster.local", marks_dir)
    for _ in range(3):
        marks.header_for("tomcat", 8080)
    marks.header_for("other", 8080)
    # kt_log's handler may see a record twice (on ktproxy and, propagated, on the root): count records.
    started = list({id(r): r for r in kt_log.records if "now carry 'version: abcde'" in r.getMessage()}.values())
    assert len(started) == 1 and started[0].levelno == logging.INFO
    assert "tomcat.default" in started[0].getMessage()
    withdraw(path)
    marks.header_for("tomcat", 8080)
    marks.header_for("tomcat", 8080)
    assert len({id(r) for r in kt_log.records if "no longer added" in r.getMessage()}) == 1


# -- liveness ----------------------------------------------------------------------------------------------
@pytest.fixture
def child_mark(marks_dir: Path) -> Iterator[tuple[subprocess.Popen, Path]]:
    """A separate process (a stand-in for `ktctl mesh`) that published a mark and keeps running."""
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from ktproxy.mesh.marks import publish
        print(publish("default", "tomcat", "10.96.5.5", [8080], "version", "abcde", directory=Path({str(marks_dir)!r})),
              flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    path = Path(proc.stdout.readline().strip())
    yield proc, path
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_a_sigkilled_publisher_stops_applying_at_once(child_mark: tuple[subprocess.Popen, Path],
                                                      marks_dir: Path) -> None:
    proc, path = child_mark
    marks = MeshMarks("default", "cluster.local", marks_dir)
    assert marks.header_for("tomcat", 8080) == HEADER
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert path.exists()  # a SIGKILLed mesh cannot withdraw its mark...
    assert marks.header_for("tomcat", 8080) is None  # ...which is ignored from the next request on


def test_a_killed_but_unreaped_publisher_counts_as_gone(child_mark: tuple[subprocess.Popen, Path],
                                                        marks_dir: Path) -> None:
    proc, _ = child_mark
    marks = MeshMarks("default", "cluster.local", marks_dir)
    os.kill(proc.pid, signal.SIGKILL)
    # Not waited for: a zombie still answers signal 0.
    fields = None
    for _ in range(1000):
        fields = mesh_marks._proc_stat(proc.pid)
        if fields and fields[0] == "Z":
            break
        os.sched_yield()
    assert fields and fields[0] == "Z"
    assert mesh_marks.pid_running(proc.pid)
    assert marks.header_for("tomcat", 8080) is None


def test_a_reused_pid_is_not_the_publisher(marks_dir: Path) -> None:
    path = _publish(marks_dir)
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "started": data["started"] + 1}))  # the same pid, another process
    assert MeshMarks("default", "cluster.local", marks_dir).header_for("tomcat", 8080) is None


def test_publish_sweeps_marks_of_processes_that_are_gone(child_mark: tuple[subprocess.Popen, Path],
                                                         marks_dir: Path) -> None:
    proc, dead = child_mark
    proc.kill()
    proc.wait()
    mine = _publish(marks_dir, value="fghij")
    assert sorted(marks_dir.iterdir()) == [mine]
    assert not dead.exists()


# -- Windows (issue 18 G10) -------------------------------------------------------------------------------
def test_publish_and_read_without_os_getuid(marks_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows has no os.getuid: its AttributeError escaped mesh's (OSError, ValueError) and --auto-header
    crashed mesh at its last step. Without it, ownership is not compared (st_uid is always 0 there)."""
    monkeypatch.delattr(os, "getuid")
    path = _publish(marks_dir)
    assert MeshMarks("default", "cluster.local", marks_dir).header_for("tomcat", 8080) == HEADER
    withdraw(path)


class _FakeKernel32:
    """OpenProcess / GetExitCodeProcess / CloseHandle as kernel32 answers them for `processes`
    (pid -> exit code; STILL_ACTIVE while running); `denied` pids exist but may not be opened."""

    def __init__(self, processes: dict[int, int], denied: tuple[int, ...] = ()) -> None:
        self.processes = processes
        self.denied = denied
        self.closed: list[int] = []
        self.error = 0

    def OpenProcess(self, access: int, inherit: bool, pid: int) -> int:
        assert access == 0x1000 and inherit is False
        if pid in self.processes:
            return 1000 + pid
        self.error = 5 if pid in self.denied else 87  # ERROR_ACCESS_DENIED, ERROR_INVALID_PARAMETER
        return 0

    def GetExitCodeProcess(self, handle: int, code: object) -> int:
        code._obj.value = self.processes[handle - 1000]  # type: ignore[attr-defined]
        return 1

    def CloseHandle(self, handle: int) -> int:
        self.closed.append(handle)
        return 1


def test_liveness_on_windows_asks_openprocess_never_sends_a_signal(monkeypatch: pytest.MonkeyPatch) -> None:
    """On Windows os.kill(pid, 0) sends CTRL_C_EVENT to the process group: it must never be the probe."""
    kernel32 = _FakeKernel32({10: 259, 11: 0}, denied=(12,))
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(mesh_marks, "_kernel32", lambda: kernel32)
    monkeypatch.setattr(mesh_marks, "_last_error", lambda: kernel32.error)

    def no_kill(*_a: object) -> None:
        raise AssertionError("os.kill called on Windows")

    monkeypatch.setattr(os, "kill", no_kill)
    assert mesh_marks.pid_running(10) is True  # STILL_ACTIVE
    assert mesh_marks.pid_running(11) is False  # exited, handle still held somewhere
    assert mesh_marks.pid_running(12) is True  # exists, not ours to open
    assert mesh_marks.pid_running(13) is False  # no such process
    assert kernel32.closed == [1010, 1011]
