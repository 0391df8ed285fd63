"""ktproxy.aio: asyncio's timeout/task/wait semantics without a getpid() syscall per call (issue 15, lever 4)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ktproxy import aio

ROOT = Path(__file__).resolve().parents[2]


# -- Deadline: asyncio.timeout's behaviour -------------------------------------------------------------
async def test_deadline_raises_timeout_error_and_none_never_expires() -> None:
    with pytest.raises(TimeoutError):
        async with aio.Deadline(0.01) as d:
            await asyncio.sleep(1)
    assert d.expired()
    async with aio.Deadline(None) as d:
        await asyncio.sleep(0.02)
    assert not d.expired()
    async with aio.Deadline(1) as d:
        await asyncio.sleep(0)
    assert not d.expired()
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_deadline_in_the_past_expires_at_the_next_await() -> None:
    with pytest.raises(TimeoutError):
        async with aio.Deadline(-1):
            await asyncio.sleep(0.5)


async def test_expire_ends_the_block_now() -> None:
    loop = asyncio.get_running_loop()
    with pytest.raises(TimeoutError):
        async with aio.Deadline(None) as d:
            loop.call_later(0.01, d.expire)
            await asyncio.sleep(1)


async def test_outside_cancellation_stays_a_cancellation() -> None:
    async def body() -> None:
        async with aio.Deadline(10):
            await asyncio.sleep(10)

    task = asyncio.ensure_future(body())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_cancelled_from_outside_while_expiring_stays_cancelled() -> None:
    # The deadline and an outside cancel in the same loop turn: the outside one must win (asyncio's rule).
    async def body() -> None:
        async with aio.Deadline(0) as d:
            await asyncio.sleep(1)
        raise AssertionError(f"not reached {d}")

    task = asyncio.ensure_future(body())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_nested_deadlines_each_raise_their_own() -> None:
    inner_fired = False
    with pytest.raises(TimeoutError):
        async with aio.Deadline(0.05):
            try:
                async with aio.Deadline(0.01):
                    await asyncio.sleep(1)
            except TimeoutError:
                inner_fired = True
            await asyncio.sleep(1)
    assert inner_fired
    async with aio.Deadline(1):
        with pytest.raises(TimeoutError):
            async with aio.Deadline(0.01):
                await asyncio.sleep(1)


async def test_wait_first_and_create_task() -> None:
    slow = aio.create_task(asyncio.sleep(1, "slow"))
    fast = aio.create_task(asyncio.sleep(0.01, "fast"))
    done, pending = await aio.wait_first([slow, fast])
    assert done == {fast} and pending == {slow}
    done, pending = await aio.wait_first([fast, slow])  # one already done: at once
    assert done == {fast} and pending == {slow}
    slow.cancel()
    done, pending = await aio.wait_first([slow])
    assert done == {slow} and slow.cancelled()


def test_running_loop_follows_the_loop_of_each_run_and_thread() -> None:
    async def which() -> tuple[asyncio.AbstractEventLoop, asyncio.AbstractEventLoop]:
        return aio.running_loop(), asyncio.get_running_loop()

    for _ in range(2):  # a new loop per run, same thread
        mine, real = asyncio.run(which())
        assert mine is real
    out: list[bool] = []
    thread = threading.Thread(target=lambda: out.append(len({id(x) for x in asyncio.run(which())}) == 1))
    thread.start()
    thread.join()
    assert out == [True]
    with pytest.raises(RuntimeError):
        aio.running_loop()  # no loop running here


# -- the point of it: no getpid() per connection ------------------------------------------------------
def _getpids(n: int) -> int:
    trace = ROOT / f".getpid-{os.getpid()}-{n}.strace"
    try:
        subprocess.run(["strace", "-f", "-qq", "-e", "trace=getpid", "-o", str(trace), sys.executable,
                        str(ROOT / "tests" / "unit" / "getpid_probe.py"), str(n), "uvloop"],
                       check=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
        return trace.read_text().count("getpid()")
    finally:
        trace.unlink(missing_ok=True)


@pytest.mark.skipif(not shutil.which("strace"), reason="strace not installed")
def test_new_connections_make_no_getpid_syscalls() -> None:
    """Proxied connections through ProxyServer, Dialer, SSHTunnel (asyncssh, in-process server) and the
    relay, counted with strace: the difference between 10 and 40 connections is 30 connections' share.

    Before ktproxy.aio it was 19 per connection (asyncio.timeout x3 twice, wait_for, ensure_future,
    asyncio.wait, current_task, ...). What remains is asyncssh's own SSHConnection.create_task
    (asyncio.ensure_future), once per channel on each end: the data plane and the in-process server."""
    try:
        few, many = _getpids(10), _getpids(40)
    except (subprocess.CalledProcessError, OSError) as exc:
        pytest.skip(f"strace cannot trace here: {exc}")
    per_connection = (many - few) / 30
    assert per_connection <= 2.5, per_connection
