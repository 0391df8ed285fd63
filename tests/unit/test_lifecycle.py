"""The one lifecycle every command shares: stop signals, clean-up that cannot skip a step, second signal."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ktproxy import lifecycle
from ktproxy.errors import KtError
from ktproxy.lifecycle import Lifecycle

ROOT = Path(__file__).resolve().parents[2]
POSIX = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

# A command in a subprocess: registers a clean-up step that writes a file, says "ready", then either
# waits for a stop (served) or is stopped during start-up (starting).
COMMAND = textwrap.dedent("""
    import asyncio, pathlib, sys
    from ktproxy import lifecycle
    from ktproxy.log import setup_logging

    setup_logging()
    mark, phase = pathlib.Path(sys.argv[1]), sys.argv[2]

    async def main(life):
        life.on_cleanup("mark", mark.write_text, "cleaned")
        if phase == "slow-cleanup":
            async def slow():
                print("cleaning", flush=True)
                await asyncio.sleep(3600)
            life.on_cleanup("slow", slow)
        if phase == "interruptible-cleanup":
            async def wait_for_replicas():
                print("waiting", flush=True)
                done = await life.interruptible(asyncio.sleep(3600))
                print("waited" if done else "cut short", flush=True)
            life.on_cleanup("wait", wait_for_replicas)
        print("ready", flush=True)
        if phase == "starting":
            await life.until_stopped(asyncio.sleep(3600))
        await life.wait()
        return 0

    sys.exit(lifecycle.run(main))
""")


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[[str], tuple[subprocess.Popen[str], Path]]]:
    """Start the command in a subprocess (waits for "ready"); a test that fails leaves no process behind."""
    procs: list[subprocess.Popen[str]] = []

    def _start(phase: str) -> tuple[subprocess.Popen[str], Path]:
        mark = tmp_path / "mark"
        proc = subprocess.Popen([sys.executable, "-c", COMMAND, str(mark), phase], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.stderr else ""
        return proc, mark

    yield _start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@POSIX
@pytest.mark.parametrize("sig", ["SIGHUP", "SIGINT", "SIGTERM"])
def test_stop_signal_cleans_up(start: Any, sig: str) -> None:
    # SIGHUP is what a closed terminal sends: it must clean up like Ctrl-C (R7), not kill the process.
    proc, mark = start("served")
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert mark.read_text() == "cleaned"
    assert f"shutting down ({sig})" in err


@POSIX
def test_stop_during_start_up_cleans_up_and_exits_130(start: Any) -> None:
    proc, mark = start("starting")
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert mark.read_text() == "cleaned"


@POSIX
def test_second_signal_exits_at_once_naming_ktctl_clean(start: Any) -> None:
    proc, mark = start("slow-cleanup")
    proc.send_signal(signal.SIGINT)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "cleaning"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "`ktctl clean` removes leftovers" in err
    assert not mark.exists()  # exited at once: the remaining steps did not run


@POSIX
def test_a_signal_during_an_interruptible_wait_ends_only_that_wait(start: Any) -> None:
    # Scale mode waits at exit for the deployment's pods; a second Ctrl-C must stop the wait, not skip
    # the rest of the clean-up (the shadow pod's deletion) by exiting at once.
    proc, mark = start("interruptible-cleanup")
    proc.send_signal(signal.SIGINT)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "waiting"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert out.strip() == "cut short", err
    assert mark.read_text() == "cleaned"  # the steps after the wait still ran
    assert "removes leftovers" not in err


async def test_a_raising_step_does_not_skip_the_next(kt_log: pytest.LogCaptureFixture) -> None:
    ran: list[str] = []

    async def broken() -> None:
        ran.append("tunnel")
        raise RuntimeError("tunnel close failed")

    async with Lifecycle() as life:
        life.on_cleanup("kube client", ran.append, "kube")  # registered first: runs last
        life.on_cleanup("shadow pod", ran.append, "shadow")
        life.on_cleanup("tunnel", broken)
        life.on_cleanup("proxy", ran.append, "proxy")
    assert ran == ["proxy", "tunnel", "shadow", "kube"]
    assert life.failed == ["tunnel"]
    assert any("tunnel close failed" in r.getMessage() for r in kt_log.records)
    assert any("`ktctl clean`" in r.getMessage() for r in kt_log.records)


async def test_the_commands_own_error_still_propagates_after_clean_up() -> None:
    ran: list[str] = []
    with pytest.raises(KtError, match="no permission"):
        async with Lifecycle() as life:
            life.on_cleanup("shadow pod", ran.append, "shadow")
            raise KtError("no permission to create pods")
    assert ran == ["shadow"]


async def test_until_stopped_returns_the_result_or_raises_stopped() -> None:
    async with Lifecycle() as life:
        assert await life.until_stopped(asyncio.sleep(0, "done")) == "done"
        slow = asyncio.ensure_future(asyncio.sleep(3600))
        life.stopping.set()
        with pytest.raises(lifecycle.Stopped):
            await life.until_stopped(slow)
        assert slow.cancelled()


@POSIX
async def test_without_loop_signal_handlers_ctrl_c_still_means_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    # Windows event loops have no add_signal_handler: Ctrl-C must set the stop event (clean-up runs on
    # the loop), not raise KeyboardInterrupt in the middle of a delete.
    loop = asyncio.get_running_loop()

    def unsupported(*_args: object) -> None:
        raise NotImplementedError

    monkeypatch.setattr(loop, "add_signal_handler", unsupported)
    before = signal.getsignal(signal.SIGINT)
    async with Lifecycle() as life:
        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.wait_for(life.wait(), 10)
    assert signal.getsignal(signal.SIGINT) is before  # the previous handler is back


def test_run_uses_uvloop_where_it_exists() -> None:
    pytest.importorskip("uvloop")

    async def main(life: Lifecycle) -> int:
        return 7 if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else 1

    assert lifecycle.run(main) == 7
