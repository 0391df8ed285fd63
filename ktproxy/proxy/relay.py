"""Copy bytes both ways between two streams, with half-close, back-pressure and an inactivity timeout.

Half-close: EOF from one side becomes write_eof on the other, and the opposite direction keeps
flowing until it ends too. Back-pressure: each chunk is drained before the next read, so a slow
reader stalls its writer instead of growing a buffer (asyncio streams and SSH channel windows
then push back to the sender). Inactivity: a stream with no byte either way for IDLE_TIMEOUT seconds
is closed, so forgotten connections do not hold their SSH channels for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Any, Protocol

from ktproxy import aio

CHUNK = 256 * 1024
# Long: an idle database or SSH session through the proxy is legitimate; a day-old dead one is not.
IDLE_TIMEOUT = 3600.0


class Reader(Protocol):
    async def read(self, n: int = -1) -> bytes: ...


class Writer(Protocol):
    def write(self, data: Any) -> None: ...
    async def drain(self) -> None: ...
    def can_write_eof(self) -> bool: ...
    def write_eof(self) -> None: ...
    def close(self) -> None: ...


class Idle:
    """`async with Idle(s) as idle:` raises TimeoutError once `idle.touch()` has not been called for s seconds.

    touch() is one float store, cheap enough for every chunk; the timer only wakes up once per period.
    Any task may touch; the task that entered the block is the one cancelled.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._loop = aio.running_loop()
        self._deadline = aio.Deadline(None, self._loop)
        self.last = self._loop.time()
        self._check_handle: asyncio.TimerHandle | None = None

    def touch(self) -> None:
        self.last = self._loop.time()

    def _check(self) -> None:
        deadline = self.last + self.seconds
        if self._loop.time() >= deadline:
            self._deadline.expire()  # cancels the task; the block raises TimeoutError
        else:
            self._check_handle = self._loop.call_at(deadline, self._check)

    async def __aenter__(self) -> Idle:
        await self._deadline.__aenter__()
        self.touch()
        self._check_handle = self._loop.call_at(self.last + self.seconds, self._check)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        if self._check_handle is not None:
            self._check_handle.cancel()
        await self._deadline.__aexit__(exc_type, exc, tb)
        return None


class Touching:
    """A writer that tells an Idle about every write and counts what went through it."""

    def __init__(self, writer: Any, idle: Idle) -> None:
        self.writer = writer
        self.idle = idle
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)
        self.idle.touch()
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()


async def pipe(reader: Reader, writer: Writer, idle: Idle | None = None) -> int:
    """Copy until EOF, then half-close the writer. Returns the byte count."""
    total = 0
    while True:
        data = await reader.read(CHUNK)
        if not data:
            break
        total += len(data)
        if idle is not None:
            idle.touch()
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        with contextlib.suppress(OSError, RuntimeError):
            writer.write_eof()
    return total


async def relay(a_reader: Reader, a_writer: Writer, b_reader: Reader, b_writer: Writer) -> None:
    """Both directions until both end, either side fails or nothing moves for IDLE_TIMEOUT (then
    TimeoutError); both are closed in every case."""
    tasks: list[asyncio.Task[int]] = []
    try:
        async with Idle(IDLE_TIMEOUT) as idle:
            tasks = [aio.create_task(pipe(a_reader, b_writer, idle)), aio.create_task(pipe(b_reader, a_writer, idle))]
            pending: set[asyncio.Future[Any]] = set(tasks)
            while pending:
                done, pending = await aio.wait_first(pending)
                # A reset on one side makes the other direction pointless: stop it rather than leave it hanging.
                if any(t.exception() is not None for t in done if not t.cancelled()):
                    break
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        for w in (a_writer, b_writer):
            with contextlib.suppress(Exception):
                w.close()
