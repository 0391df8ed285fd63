"""asyncio on the per-message paths without a getpid() syscall per call.

CPython 3.11's C `asyncio.get_running_loop()` checks that the running loop was set in this process: one
getpid() syscall per call (glibc no longer caches the pid). Everything that finds the loop or task by
itself pays it: `asyncio.timeout()` three times (the loop, `current_task()`, the loop again to arm it),
`asyncio.ensure_future`/`create_task`, `asyncio.wait`, `wait_for`, `current_task()` without a loop.
On the data plane that was 17 of the ~47 syscalls per new connection.

Here the loop is found once per thread and remembered (`running_loop`): the cached loop is trusted
while it is running, as only one loop runs per thread, and forgotten in a forked child (the reason for
asyncio's pid check). `Deadline` is `asyncio.timeout` on that loop, with the task found through the loop
(`current_task(loop)` makes no syscall); `create_task` and `wait_first` replace `ensure_future` and
`asyncio.wait(FIRST_COMPLETED)`.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine, Iterable
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")

_local = threading.local()


def _forget() -> None:
    _local.__dict__.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget)


def running_loop() -> asyncio.AbstractEventLoop:
    """asyncio.get_running_loop(), asked once per thread while that loop runs (RuntimeError without one)."""
    loop = getattr(_local, "loop", None)
    if loop is None or not loop.is_running():
        loop = _local.loop = asyncio.get_running_loop()
    return loop


def create_task(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """asyncio.create_task(coro), on the remembered loop."""
    return running_loop().create_task(coro)


Futures = set[asyncio.Future[Any]]


async def wait_first(futures: Iterable[asyncio.Future[Any]]) -> tuple[Futures, Futures]:
    """asyncio.wait(futures, return_when=FIRST_COMPLETED): (done, pending) once one is done."""
    pending = set(futures)
    done = {f for f in pending if f.done()}
    if done:
        return done, pending - done
    waiter = running_loop().create_future()

    def wake(_: asyncio.Future[Any]) -> None:
        if not waiter.done():
            waiter.set_result(None)

    for f in pending:
        f.add_done_callback(wake)
    try:
        await waiter
    finally:
        for f in pending:
            f.remove_done_callback(wake)
    done = {f for f in pending if f.done()}
    return done, pending - done


class Deadline:
    """`async with Deadline(seconds):` is `async with asyncio.timeout(seconds):` (None: no deadline):
    the task is cancelled when the time comes and the block raises TimeoutError. `expire()` ends it now.

    The semantics are asyncio's (3.12's Timeout, which 3.11 has less exactly): a cancellation from
    elsewhere that arrives meanwhile stays a CancelledError, and nested deadlines each raise their own.
    """

    __slots__ = ("_cancelling", "_expired", "_handle", "_loop", "_task", "when")

    def __init__(self, seconds: float | None, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop if loop is not None else running_loop()
        self.when = None if seconds is None else self._loop.time() + seconds
        self._handle: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[Any] | None = None
        self._expired = False
        self._cancelling = 0

    def expired(self) -> bool:
        return self._expired

    def expire(self) -> None:
        """Cancel the block's task now; the block raises TimeoutError (unless it ends first)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._task is not None and not self._expired and not self._task.done():
            self._expired = True
            self._task.cancel()

    async def __aenter__(self) -> Deadline:
        task = asyncio.current_task(self._loop)
        if task is None:
            raise RuntimeError("Deadline should be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        if self.when is not None:
            self._handle = self._loop.call_at(self.when, self.expire)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._expired:
            assert self._task is not None
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc
        self._task = None
