"""Copy bytes both ways between two streams, with half-close and back-pressure.

Half-close: EOF from one side becomes write_eof on the other, and the opposite direction keeps
flowing until it ends too. Back-pressure: each chunk is drained before the next read, so a slow
reader stalls its writer instead of growing a buffer (asyncio streams and SSH channel windows
then push back to the sender).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol

CHUNK = 256 * 1024


class Reader(Protocol):
    async def read(self, n: int = -1) -> bytes: ...


class Writer(Protocol):
    def write(self, data: Any) -> None: ...
    async def drain(self) -> None: ...
    def can_write_eof(self) -> bool: ...
    def write_eof(self) -> None: ...
    def close(self) -> None: ...


async def pipe(reader: Reader, writer: Writer) -> int:
    """Copy until EOF, then half-close the writer. Returns the byte count."""
    total = 0
    while True:
        data = await reader.read(CHUNK)
        if not data:
            break
        total += len(data)
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        with contextlib.suppress(OSError, RuntimeError):
            writer.write_eof()
    return total


async def relay(a_reader: Reader, a_writer: Writer, b_reader: Reader, b_writer: Writer) -> None:
    """Both directions until both end or either side fails; then both are closed."""
    tasks = [asyncio.ensure_future(pipe(a_reader, b_writer)), asyncio.ensure_future(pipe(b_reader, a_writer))]
    try:
        pending: set[asyncio.Future[int]] = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
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
